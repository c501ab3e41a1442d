"""The whole system on one machine: infrastructure plus each service as its own process.

`LocalStack` is what `make demo`, `python -m voicejury_devstack up` and the end-to-end
tests share. It reuses NATS and PostgreSQL when they already run (this project's machines
have both) and starts them otherwise; the S3 server is always a private moto process, so
every stack has an empty store. Everything a run creates is named after its `namespace`
(streams, bucket, database), so stacks started side by side do not see each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

log = logging.getLogger("voicejury_devstack")

DEFAULT_SERVICES: tuple[str, ...] = ("separator", "pitch", "asr", "scorer", "jury", "gateway")
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NATS_SERVER_BIN = "/usr/sbin/nats-server"

_T = TypeVar("_T")
_NAMESPACE = re.compile(r"[a-z][a-z0-9_]{0,30}")


class StackError(RuntimeError):
    """The local stack could not be brought up; the message says what to fix."""


# ----------------------------------------------------------------------------- helpers


def find_repo_root(start: Path | None = None) -> Path:
    """The workspace root: the nearest directory above `start` that holds `uv.lock`."""
    here = (start or Path(__file__)).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "uv.lock").is_file():
            return candidate
    raise StackError(f"no uv.lock above {here}: run from inside the VoiceJury checkout")


def shared_dir() -> Path | None:
    """`../shared` beside the checkout (model stand-ins, demo audio), when it exists."""
    with contextlib.suppress(StackError):
        candidate = find_repo_root().parent / "shared"
        if candidate.is_dir():
            return candidate
    return None


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS may hand it out again later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _run_coroutine(coro: Coroutine[Any, Any, _T]) -> _T:
    # A private thread with its own loop: `LocalStack` is synchronous but may be used from
    # code (or a pytest-asyncio test) that already runs an event loop in this thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def model_env_defaults(shared: Path | None) -> dict[str, str]:
    """Model settings pointing at the random-weight stand-ins in `../shared/models`.

    No weights can be downloaded on these machines; without these settings the ML stages
    would try the network and fail. A real deployment sets them (or the environment does:
    `os.environ` wins over these defaults).
    """
    if shared is None or not (shared / "models").is_dir():
        return {}
    models = shared / "models"
    return {
        "VJ_SEPARATOR_MODEL": "tiny_randinit",
        "VJ_SEPARATOR_MODEL_DIR": str(models / "demucs-tiny-random"),
        "VJ_PITCH_MODEL_PERFORMANCE": "tiny",
        "VJ_PITCH_MODEL_REFERENCE": "tiny",
        "VJ_ASR_MODEL": str(models / "whisper-micro-random"),
        "VJ_JURY_MODELS": "[]",
    }


@dataclass
class _Service:
    name: str
    command: list[str]
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = field(default=None, repr=False)


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    # Each child leads its own process group, so a signal also reaches whatever it forked
    # (uvicorn workers, torch helper processes) and never the caller's own group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


def _terminate(processes: Sequence[subprocess.Popen[bytes]], grace_s: float) -> None:
    """SIGTERM every process group, wait up to `grace_s` in total, then SIGKILL the rest."""
    alive = [p for p in processes if p.poll() is None]
    for p in alive:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in alive:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
    for p in alive:
        if p.poll() is None:
            log.warning("pid %d ignored SIGTERM for %.0f s; killing it", p.pid, grace_s)
            _signal_group(p, signal.SIGKILL)
            p.wait()
        else:
            # The leader is gone; make sure no orphan in its group keeps a port or a GPU.
            _signal_group(p, signal.SIGKILL)


# ----------------------------------------------------------------------------- the stack


class LocalStack:
    """NATS, PostgreSQL, an S3 server and the services, for one `namespace`.

    Use as a context manager (or call `start()` / `stop()`). `services=()` brings up the
    infrastructure only. Migrations and the API key need the gateway package, so they run
    only when `"gateway"` is among the services (override with `migrate=`).
    `service_commands` replaces the command of a service (tests use it to run a stand-in).
    """

    def __init__(
        self,
        namespace: str,
        workdir: Path,
        *,
        gateway_port: int = 0,
        env_overrides: Mapping[str, str] | None = None,
        services: Sequence[str] = DEFAULT_SERVICES,
        service_commands: Mapping[str, Sequence[str]] | None = None,
        tenant: str = "demo",
        keep_data: bool = False,
        migrate: bool | None = None,
        ready_timeout_s: float = 180.0,
        stop_grace_s: float = 10.0,
        nats_url: str = DEFAULT_NATS_URL,
        postgres_url: str = DEFAULT_POSTGRES_URL,
    ) -> None:
        # Mirrors `CommonSettings.namespace`: it becomes part of stream, bucket and DB names.
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError(f"namespace {namespace!r} must match ^[a-z][a-z0-9_]{{0,30}}$")
        self.namespace = namespace
        self.workdir = Path(workdir).resolve()
        self.services = tuple(services)
        self.tenant = tenant
        self.keep_data = keep_data
        self.migrate = ("gateway" in self.services) if migrate is None else migrate
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self.database = f"voicejury_{namespace}"
        self.bucket = "vj-" + namespace.replace("_", "-")
        self._env_overrides = dict(env_overrides or {})
        self._service_commands = {k: list(v) for k, v in (service_commands or {}).items()}
        self._requested_gateway_port = gateway_port
        self._nats_url = nats_url
        self._admin_postgres_url = postgres_url
        self._nats_process: subprocess.Popen[bytes] | None = None
        self._moto_process: subprocess.Popen[bytes] | None = None
        self._moto_port: int | None = None
        self._database_created = False
        self._services: dict[str, _Service] = {}
        self._api_key: str | None = None
        self._started = False

    # ------------------------------------------------------------------ public surface

    @property
    def nats_url(self) -> str:
        return self._nats_url

    @property
    def database_url(self) -> str:
        return _with_database(self._admin_postgres_url, self.database)

    @property
    def s3_endpoint(self) -> str:
        """`host:port` as the `minio` client wants it (no scheme)."""
        if self._moto_port is None:
            raise StackError("the S3 server is not running")
        return f"127.0.0.1:{self._moto_port}"

    @property
    def api_key(self) -> str:
        if self._api_key is None:
            raise StackError("no API key: the stack was started without the gateway")
        return self._api_key

    @property
    def base_url(self) -> str:
        return self.http_url("gateway")

    def http_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._service(name).port}"

    def process(self, name: str) -> subprocess.Popen[bytes]:
        service = self._service(name)
        if service.process is None:
            raise StackError(f"{name} was never started")
        return service.process

    def service_env(self, name: str) -> dict[str, str]:
        return dict(self._service(name).env)

    def log_path(self, name: str) -> Path:
        return self._service(name).log_path

    def log(self, name: str) -> str:
        path = self._service(name).log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to the service's process group (a crash, when SIGKILL) and reaps it."""
        process = self.process(name)
        _signal_group(process, sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=self.stop_grace_s)

    def restart(self, name: str, *, wait_ready: bool = True) -> subprocess.Popen[bytes]:
        """Starts the service again with the same environment and port (stopping it first)."""
        service = self._service(name)
        if service.process is not None and service.process.poll() is None:
            _terminate([service.process], self.stop_grace_s)
        self._spawn(service)
        if wait_ready:
            self.wait_ready([name])
        return self.process(name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._ensure_nats()
            self._ensure_postgres()
            self._create_database()
            self._start_moto()
            self._plan_services()
            if self.migrate:
                self._run_gateway_cli("migrate")
            if "gateway" in self.services:
                self._api_key = self._create_api_key()
            for service in self._services.values():
                self._spawn(service)
            self.wait_ready(list(self._services))
        except BaseException:
            # Also on Ctrl-C during a long model load: never leave processes or a DB behind.
            self.stop()
            raise

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        running = [s.process for s in self._services.values() if s.process is not None]
        _terminate(running, self.stop_grace_s)
        for service in self._services.values():
            if service.log_file is not None:
                service.log_file.close()
                service.log_file = None
        if self._moto_process is not None:
            _terminate([self._moto_process], self.stop_grace_s)
            self._moto_process = None
        if self._nats_process is not None:
            _terminate([self._nats_process], self.stop_grace_s)
            self._nats_process = None
            if not self.keep_data:
                shutil.rmtree(self.workdir / "nats", ignore_errors=True)
        if self._database_created and not self.keep_data:
            try:
                _run_coroutine(self._drop_database())
            except Exception as exc:  # teardown goes on; a leftover DB is only disk space
                log.warning("could not drop database %s: %s", self.database, exc)
            self._database_created = False

    def wait_ready(self, names: Sequence[str], timeout_s: float | None = None) -> None:
        """Polls `GET /readyz` until every named service answers 200.

        Fails fast when a process exits, and on timeout, with the tail of its log: a model
        that does not load or a wrong setting shows up there.
        """
        deadline = time.monotonic() + (self.ready_timeout_s if timeout_s is None else timeout_s)
        pending = list(names)
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for name in list(pending):
                    service = self._service(name)
                    process = self.process(name)
                    code = process.poll()
                    if code is not None:
                        raise StackError(
                            f"{name} exited with code {code} before it was ready; "
                            f"{service.log_path} ends with:\n{tail(self.log(name))}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{self.http_url(name)}/readyz").status_code == 200:
                            pending.remove(name)
                            log.info("%s ready on port %d", name, service.port)
                if not pending:
                    return
                if time.monotonic() > deadline:
                    name = pending[0]
                    raise StackError(
                        f"{', '.join(pending)} not ready after "
                        f"{self.ready_timeout_s if timeout_s is None else timeout_s:.0f} s; "
                        f"{self._service(name).log_path} ends with:\n{tail(self.log(name))}"
                    )
                time.sleep(0.5)

    # ------------------------------------------------------------------ infrastructure

    def _ensure_nats(self) -> None:
        parts = urlsplit(self._nats_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 4222
        if tcp_open(host, port):
            log.info("using NATS at %s", self._nats_url)
            return
        if not Path(NATS_SERVER_BIN).exists() and shutil.which("nats-server") is None:
            raise StackError(f"NATS is not running at {self._nats_url} and nats-server is absent")
        binary = NATS_SERVER_BIN if Path(NATS_SERVER_BIN).exists() else "nats-server"
        own_port = free_port()
        store = self.workdir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        log_file = (self.workdir / "nats-server.log").open("ab")
        self._nats_process = subprocess.Popen(
            [binary, "-a", "127.0.0.1", "-p", str(own_port), "-js", "-sd", str(store)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()  # the child holds its own descriptor
        self._nats_url = f"nats://127.0.0.1:{own_port}"
        self._wait_for(
            lambda: tcp_open("127.0.0.1", own_port, 0.2),
            self._nats_process,
            "nats-server",
            self.workdir / "nats-server.log",
            timeout_s=15.0,
        )
        log.info("started nats-server (JetStream) at %s", self._nats_url)

    def _ensure_postgres(self) -> None:
        if self._postgres_answers():
            return
        versions = (
            sorted(Path("/etc/postgresql").glob("*")) if Path("/etc/postgresql").is_dir() else []
        )
        if not versions or shutil.which("pg_ctlcluster") is None:
            raise StackError(
                f"PostgreSQL does not answer at {self._admin_postgres_url} and no local cluster "
                "was found to start (expected /etc/postgresql/<version>/main and pg_ctlcluster)"
            )
        command = ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1].name, "main", "start"]
        log.info("PostgreSQL is down; running %s", " ".join(command))
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise StackError(
                f"`{' '.join(command)}` failed (exit {done.returncode}; it needs root):\n"
                f"{done.stdout}{done.stderr}"
            )
        deadline = time.monotonic() + 30.0
        while not self._postgres_answers():
            if time.monotonic() > deadline:
                raise StackError(
                    f"PostgreSQL started but does not answer at {self._admin_postgres_url}"
                )
            time.sleep(0.5)

    def _postgres_answers(self) -> bool:
        async def probe() -> None:
            conn = await asyncpg.connect(self._admin_postgres_url, timeout=5)
            await conn.close()

        try:
            _run_coroutine(probe())
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            log.debug("PostgreSQL probe failed: %s", exc)
            return False
        return True

    def _create_database(self) -> None:
        async def create() -> None:
            conn = await asyncpg.connect(self._admin_postgres_url, timeout=10)
            try:
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", self.database
                )
                if exists and self.keep_data:
                    return  # `up --keep-data` twice with one namespace continues where it was
                if exists:
                    # A leftover of a run that was killed before its teardown.
                    await conn.execute(f'DROP DATABASE "{self.database}" WITH (FORCE)')
                await conn.execute(f'CREATE DATABASE "{self.database}"')
            finally:
                await conn.close()

        _run_coroutine(create())
        self._database_created = True
        log.info("database %s ready", self.database)

    async def _drop_database(self) -> None:
        conn = await asyncpg.connect(self._admin_postgres_url, timeout=10)
        try:
            # FORCE: a service killed with SIGKILL may leave a backend holding a connection.
            await conn.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        finally:
            await conn.close()

    def _start_moto(self) -> None:
        self._moto_port = free_port()
        log_path = self.workdir / "s3.log"
        log_file = log_path.open("ab")
        self._moto_process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._moto_port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        url = f"http://{self.s3_endpoint}"

        def answers() -> bool:
            try:
                httpx.get(url + "/", timeout=1.0)
            except httpx.HTTPError:
                return False
            return True

        self._wait_for(answers, self._moto_process, "moto S3 server", log_path, timeout_s=60.0)
        # Readiness probes check that the bucket exists; creating it here means no service
        # depends on another having started first. moto accepts unsigned requests.
        response = httpx.put(f"{url}/{self.bucket}", timeout=10.0)
        if response.status_code not in (200, 409):
            raise StackError(f"could not create bucket {self.bucket}: {response.status_code}")
        log.info("S3 server (moto) at %s, bucket %s", url, self.bucket)

    def _wait_for(
        self,
        check: Callable[[], bool],
        process: subprocess.Popen[bytes],
        what: str,
        log_path: Path,
        timeout_s: float,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            output = log_path.read_text(errors="replace") if log_path.exists() else ""
            if process.poll() is not None:
                raise StackError(f"{what} exited with code {process.returncode}:\n{tail(output)}")
            if time.monotonic() > deadline:
                raise StackError(f"{what} did not answer within {timeout_s:.0f} s:\n{tail(output)}")
            time.sleep(0.1)

    # ------------------------------------------------------------------ services

    def base_env(self) -> dict[str, str]:
        """What every service process sees, before its own `VJ_HTTP_PORT`."""
        env = {**model_env_defaults(shared_dir()), **os.environ}
        env.update(
            {
                "VJ_NATS_URL": self._nats_url,
                "VJ_NAMESPACE": self.namespace,
                "VJ_S3_ENDPOINT": self.s3_endpoint,
                "VJ_S3_ACCESS_KEY": "test",
                "VJ_S3_SECRET_KEY": "test",
                "VJ_S3_BUCKET": self.bucket,
                "VJ_S3_SECURE": "false",
                "VJ_DATABASE_URL": self.database_url,
                "VJ_HTTP_HOST": "127.0.0.1",
                "VJ_LOG_JSON": "true",
                # Logs reach the file as they happen, not when a buffer fills or at exit.
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self._env_overrides)
        return env

    def _plan_services(self) -> None:
        base = self.base_env()
        for name in self.services:
            if name == "gateway" and self._requested_gateway_port:
                port = self._requested_gateway_port
            else:
                port = free_port()
            default = [sys.executable, "-m", f"voicejury_{name}"]
            if name == "gateway":
                default.append("serve")
            self._services[name] = _Service(
                name=name,
                command=self._service_commands.get(name, default),
                port=port,
                env={**base, "VJ_HTTP_PORT": str(port)},
                log_path=self.workdir / f"{name}.log",
            )

    def _spawn(self, service: _Service) -> None:
        if service.log_file is None:
            service.log_file = service.log_path.open("ab")
        banner = f"--- devstack: starting {' '.join(service.command)} at {time.strftime('%X')}\n"
        service.log_file.write(banner.encode())
        service.log_file.flush()
        service.process = subprocess.Popen(
            service.command,
            env=service.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=service.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.info("started %s (pid %d, port %d)", service.name, service.process.pid, service.port)

    def _run_gateway_cli(self, *args: str) -> str:
        command = [sys.executable, "-m", "voicejury_gateway", *args]
        done = subprocess.run(
            command,
            env=self.base_env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        with (self.workdir / "gateway-cli.log").open("a") as f:
            f.write(f"$ {' '.join(args)}\n{done.stdout}{done.stderr}\n")
        if done.returncode != 0:
            raise StackError(
                f"`python -m voicejury_gateway {' '.join(args)}` failed with exit "
                f"{done.returncode}:\n{tail(done.stdout + done.stderr)}"
            )
        return done.stdout

    def _create_api_key(self) -> str:
        lines = [
            line.strip() for line in self._run_gateway_cli("create-key", self.tenant).splitlines()
        ]
        lines = [line for line in lines if line]
        if not lines:
            raise StackError("`voicejury_gateway create-key` printed no key")
        return lines[-1]

    def _service(self, name: str) -> _Service:
        try:
            return self._services[name]
        except KeyError:
            raise StackError(
                f"no service {name!r} in this stack ({', '.join(self._services)})"
            ) from None

    def iter_services(self) -> Iterator[tuple[str, int]]:
        for name, service in self._services.items():
            yield name, service.port
