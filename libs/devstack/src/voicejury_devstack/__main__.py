"""`python -m voicejury_devstack up`: the whole system in the foreground until Ctrl-C."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from .stack import DEFAULT_SERVICES, LocalStack, StackError, tail


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM and SIGHUP tear down like Ctrl-C does


def up(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir or Path(tempfile.gettempdir()) / f"voicejury-{args.namespace}"
    services = tuple(s for s in args.services.split(",") if s) if args.services else ()
    stack = LocalStack(
        args.namespace,
        workdir,
        gateway_port=args.gateway_port,
        services=services,
        keep_data=args.keep_data,
        ready_timeout_s=args.ready_timeout_s,
    )
    try:
        with stack:
            print(f"VoiceJury local stack '{args.namespace}' is up (logs in {workdir})")
            print(f"  NATS        {stack.nats_url}")
            print(f"  PostgreSQL  {stack.database_url}")
            print(f"  S3 (moto)   http://{stack.s3_endpoint}  bucket {stack.bucket}")
            for name, port in stack.iter_services():
                print(f"  {name:<11} http://127.0.0.1:{port}")
            if "gateway" in services:
                print(f"\n  API         {stack.base_url}/v1   (OpenAPI: {stack.base_url}/docs)")
                print(f"  API key     {stack.api_key}")
                print(
                    f"  try:        curl -H 'Authorization: Bearer {stack.api_key}' "
                    f"{stack.base_url}/v1/jobs"
                )
            print("\nCtrl-C stops everything.", flush=True)
            reported: set[str] = set()
            while True:
                # A crashed service is reported once, not restarted: the log says why.
                for name, _ in stack.iter_services():
                    code = stack.process(name).poll()
                    if code is not None and name not in reported:
                        reported.add(name)
                        print(
                            f"\n{name} exited with code {code}; its log ends with:\n"
                            f"{tail(stack.log(name), 20)}",
                            file=sys.stderr,
                            flush=True,
                        )
                time.sleep(1.0)
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # after SIGHUP the terminal may be gone
            print("\nstopped; everything torn down", file=sys.stderr)
        return 0
    except StackError as exc:
        print(f"could not bring the stack up: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voicejury_devstack")
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="start the stack and stay in the foreground")
    up_parser.add_argument(
        "--namespace",
        default="dev",
        help="names its database, streams and bucket; one running stack per namespace",
    )
    up_parser.add_argument("--workdir", type=Path)
    up_parser.add_argument("--gateway-port", type=int, default=0, help="0 picks a free port")
    up_parser.add_argument(
        "--services",
        default=",".join(DEFAULT_SERVICES),
        help="comma-separated; empty for the infrastructure only",
    )
    up_parser.add_argument(
        "--keep-data", action="store_true", help="keep the database and streams on exit"
    )
    up_parser.add_argument("--ready-timeout-s", type=float, default=180.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  [devstack] %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per readiness poll otherwise
    # SIGHUP: the terminal was closed. The services lead their own sessions, so without this
    # nothing would stop them.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
    return up(args)


if __name__ == "__main__":
    sys.exit(main())
