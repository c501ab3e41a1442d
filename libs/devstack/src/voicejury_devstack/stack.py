"""The whole system on one machine: infrastructure plus each service as its own process.

`LocalStack` is what `make demo`, `python -m voicejury_devstack up` and the end-to-end
tests share. It reuses NATS and PostgreSQL when they already run (this project's machines
have both) and starts them otherwise; the S3 server is always a private process, so every
stack has an empty store. Everything a run creates is named after its `namespace`
(streams, bucket, database), so stacks started side by side do not see each other.

The fault tests need infrastructure they may kill: `own_nats=True` and `own_postgres=True`
start private servers (never the shared ones), and `s3="s3rver"` runs an S3 server that
keeps objects on disk (moto keeps them in memory, so a restart would lose them). Each of
those can then be stopped and started again on the same port with the same data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

log = logging.getLogger("voicejury_devstack")

DEFAULT_SERVICES: tuple[str, ...] = ("separator", "pitch", "asr", "scorer", "jury", "gateway")
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
NATS_SERVER_BIN = "/usr/sbin/nats-server"
S3RVER_SCRIPT = Path("tools/s3rver/node_modules/s3rver/bin/s3rver.js")
# s3rver accepts one fixed key pair; with --allow-mismatched-signatures any secret works.
S3RVER_ACCESS_KEY = "S3RVER"

S3Server = Literal["moto", "s3rver"]

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


def _without_password(url: str) -> str:
    """`url` fit for a log line: its password, if any, replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{netloc[-1]}"))


def postgres_bin(tool: str) -> str:
    """Path of a PostgreSQL server tool (`initdb`, `pg_ctl`), newest installed version first."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), reverse=True):
        return str(candidate)
    found = shutil.which(tool)
    if found is None:
        raise StackError(f"{tool} not found (install the PostgreSQL server package)")
    return found


def _as_postgres_user(command: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; on these machines tests run as root.
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *command]
    return command


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


# Mirrors `CommonSettings.stream_max_bytes`, the jobs stream's bound unless overridden.
_DEFAULT_STREAM_MAX_BYTES = 1 << 30


def _check_stream_fits_store(env: Mapping[str, str], max_file_store: int) -> None:
    """nats-server reserves a stream's `max_bytes` in its store when the stream is created,
    and refuses one that does not fit (10047 "insufficient storage resources available"):
    every service would then fail its start-up, far from the cause."""
    stream_max_bytes = (
        int(env.get("VJ_STREAM_MAX_BYTES") or os.environ.get("VJ_STREAM_MAX_BYTES") or 0)
        or _DEFAULT_STREAM_MAX_BYTES
    )
    if stream_max_bytes > max_file_store:
        raise ValueError(
            f"the jobs stream's bound ({stream_max_bytes} bytes, VJ_STREAM_MAX_BYTES) exceeds "
            f"nats_max_file_store ({max_file_store}): nats-server cannot create the stream"
        )


class LocalStack:
    """NATS, PostgreSQL, an S3 server and the services, for one `namespace`.

    Use as a context manager (or call `start()` / `stop()`). `services=()` brings up the
    infrastructure only. Migrations and the API key need the gateway package, so they run
    only when `"gateway"` is among the services (override with `migrate=`).
    `service_commands` replaces the command of a service (tests use it to run a stand-in).
    A service named `gateway_<x>` is another gateway replica (same command, own port).

    For fault tests: `own_nats` / `own_postgres` start private servers instead of reusing
    the shared ones (`nats_max_file_store` caps the private JetStream store), `s3` picks the
    S3 server; `kill_nats`/`start_nats`, `stop_postgres`/`start_postgres` and
    `kill_s3`/`start_s3` take them down and bring them back on the same port and data.
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
        own_nats: bool = False,
        nats_max_file_store: int | None = None,
        own_postgres: bool = False,
        s3: S3Server = "moto",
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
        if nats_max_file_store is not None:
            _check_stream_fits_store(self._env_overrides, nats_max_file_store)
        self._service_commands = {k: list(v) for k, v in (service_commands or {}).items()}
        self._requested_gateway_port = gateway_port
        self._nats_url = nats_url
        self._admin_postgres_url = postgres_url
        self._nats_process: subprocess.Popen[bytes] | None = None
        self._own_nats = own_nats
        self._nats_max_file_store = nats_max_file_store
        self._nats_port: int | None = None
        self._own_postgres = own_postgres
        self._pg_dir: Path | None = None
        self._pg_port: int | None = None
        self._s3_kind: S3Server = s3
        self._moto_process: subprocess.Popen[bytes] | None = None
        self._moto_port: int | None = None
        self._planned_env: dict[str, dict[str, str]] = {}
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
    def s3_access_key(self) -> str:
        return S3RVER_ACCESS_KEY if self._s3_kind == "s3rver" else "test"

    @property
    def admin_postgres_url(self) -> str:
        return self._admin_postgres_url

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

    def restart(
        self,
        name: str,
        *,
        wait_ready: bool = True,
        env_overrides: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Starts the service again on the same port (stopping it first).

        `env_overrides` replaces the environment with the planned one plus these values
        (`{}` restores the planned environment); None keeps the current environment.
        """
        service = self._service(name)
        if service.process is not None and service.process.poll() is None:
            _terminate([service.process], self.stop_grace_s)
        if env_overrides is not None:
            service.env = {**self._planned_env[name], **env_overrides}
        self._spawn(service)
        if wait_ready:
            self.wait_ready([name])
        return self.process(name)

    # -- infrastructure faults (private servers only) -------------------------------------

    def kill_nats(self, sig: int = signal.SIGKILL) -> None:
        """Stops the private nats-server (a crash with SIGKILL); its store stays on disk."""
        process = self._require_own(self._nats_process, "nats-server", "own_nats")
        _signal_group(process, sig)
        process.wait(timeout=30)

    def start_nats(self) -> None:
        """Starts the private nats-server again on its port, with the same store."""
        self._require_own(self._nats_process, "nats-server", "own_nats")
        self._start_own_nats()

    def stop_postgres(self, mode: Literal["immediate", "fast"] = "immediate") -> None:
        """Stops the private PostgreSQL; `immediate` is a crash (recovery replays the WAL)."""
        if self._pg_dir is None:
            raise StackError("PostgreSQL is shared here; start the stack with own_postgres=True")
        self._pg_ctl("stop", "-m", mode)

    def start_postgres(self) -> None:
        if self._pg_dir is None:
            raise StackError("PostgreSQL is shared here; start the stack with own_postgres=True")
        self._pg_ctl("start")

    def kill_s3(self, sig: int = signal.SIGKILL) -> None:
        process = self._require_own(self._moto_process, "S3 server", "s3=...")
        _signal_group(process, sig)
        process.wait(timeout=30)

    def start_s3(self) -> None:
        """Starts the S3 server again on its port (s3rver finds its objects on disk again)."""
        self._require_own(self._moto_process, "S3 server", "s3=...")
        self._start_s3()

    @staticmethod
    def _require_own(
        process: subprocess.Popen[bytes] | None, what: str, option: str
    ) -> subprocess.Popen[bytes]:
        if process is None:
            raise StackError(f"{what} is not this stack's own process (start it with {option})")
        return process

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
            if self._own_postgres:
                self._start_own_postgres()
            else:
                self._ensure_postgres()
            self._create_database()
            self._start_s3()
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
        if self._pg_dir is not None:
            with contextlib.suppress(StackError, subprocess.TimeoutExpired):
                self._pg_ctl("stop", "-m", "fast")
            shutil.rmtree(self._pg_dir, ignore_errors=True)
            self._pg_dir = None
            self._database_created = False  # dropped with the whole cluster
        if self._s3_kind == "s3rver" and not self.keep_data:
            shutil.rmtree(self.workdir / "s3", ignore_errors=True)
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
        if not self._own_nats and tcp_open(host, port):
            log.info("using NATS at %s", self._nats_url)
            return
        if not Path(NATS_SERVER_BIN).exists() and shutil.which("nats-server") is None:
            raise StackError(f"NATS is not running at {self._nats_url} and nats-server is absent")
        self._nats_port = free_port()
        self._nats_url = f"nats://127.0.0.1:{self._nats_port}"
        self._start_own_nats()

    def _start_own_nats(self) -> None:
        assert self._nats_port is not None
        binary = NATS_SERVER_BIN if Path(NATS_SERVER_BIN).exists() else "nats-server"
        store = self.workdir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "nats-server.conf"
        limit = (
            f"  max_file_store: {self._nats_max_file_store}\n"
            if self._nats_max_file_store is not None
            else ""
        )
        config.write_text(
            f"listen: 127.0.0.1:{self._nats_port}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(store))}\n{limit}}}\n"
        )
        log_file = (self.workdir / "nats-server.log").open("ab")
        self._nats_process = subprocess.Popen(
            [binary, "-c", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()  # the child holds its own descriptor
        port = self._nats_port
        self._wait_for(
            lambda: tcp_open("127.0.0.1", port, 0.2),
            self._nats_process,
            "nats-server",
            self.workdir / "nats-server.log",
            timeout_s=15.0,
        )
        log.info("started nats-server (JetStream) at %s", self._nats_url)

    def _start_own_postgres(self) -> None:
        """A private cluster in a temporary directory (initdb, trust auth, loopback only)."""
        # Not under `workdir`: the postgres OS user must own it and reach it, and pytest's
        # temporary directories are private to the user running the tests.
        self._pg_dir = Path(tempfile.mkdtemp(prefix=f"vj-pg-{self.namespace}-"))
        if os.geteuid() == 0:
            shutil.chown(self._pg_dir, "postgres", "postgres")
        self._pg_port = free_port()
        command = [
            postgres_bin("initdb"),
            "-D",
            str(self._pg_dir / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "-E",
            "UTF8",
        ]
        done = subprocess.run(
            _as_postgres_user(command), capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise StackError(f"initdb failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        self._admin_postgres_url = f"postgresql://postgres@127.0.0.1:{self._pg_port}/postgres"
        self._pg_ctl("start")
        log.info("started a private PostgreSQL at %s", self._admin_postgres_url)

    def _pg_ctl(self, action: str, *args: str) -> None:
        assert self._pg_dir is not None
        options = f"-p {self._pg_port} -k {self._pg_dir} -c listen_addresses=127.0.0.1"
        command = [postgres_bin("pg_ctl"), "-D", str(self._pg_dir / "data"), "-w", "-t", "60"]
        if action == "start":
            command += ["-o", options, "-l", str(self._pg_dir / "postgres.log")]
        command += [action, *args]
        done = subprocess.run(
            _as_postgres_user(command), capture_output=True, text=True, timeout=90, check=False
        )
        if done.returncode != 0:
            log_text = (self._pg_dir / "postgres.log").read_text(errors="replace")
            raise StackError(
                f"pg_ctl {action} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}"
                f"\n{tail(log_text)}"
            )

    def _ensure_postgres(self) -> None:
        """Uses PostgreSQL at the configured URL, or starts a private cluster when none answers.

        As with NATS: a private server on a free port, never the machine's own cluster (which
        may need root, systemd or a port another user owns). Its data lives as long as the
        stack does, so `keep_data` cannot keep a private cluster's jobs across runs.
        """
        if self._postgres_answers():
            log.info("using PostgreSQL at %s", _without_password(self._admin_postgres_url))
            return
        log.warning(
            "PostgreSQL does not answer at %s; starting a private cluster for this run%s",
            _without_password(self._admin_postgres_url),
            " (its jobs go with it: keep_data cannot keep them)" if self.keep_data else "",
        )
        try:
            self._start_own_postgres()
        except StackError as exc:
            raise StackError(
                f"PostgreSQL does not answer at {_without_password(self._admin_postgres_url)} "
                f"and a private cluster could not be started: {exc}"
            ) from exc

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

    def _start_s3(self) -> None:
        if self._s3_kind == "s3rver":
            self._start_s3rver()
        else:
            self._start_moto()

    def _start_s3rver(self) -> None:
        script = find_repo_root() / S3RVER_SCRIPT
        node = shutil.which("node")
        if node is None or not script.is_file():
            raise StackError(f"s3rver needs node and {script} (run `npm ci` in tools/s3rver)")
        if self._moto_port is None:
            self._moto_port = free_port()
        data = self.workdir / "s3"
        data.mkdir(parents=True, exist_ok=True)
        log_path = self.workdir / "s3.log"
        log_file = log_path.open("ab")
        self._moto_process = subprocess.Popen(
            [
                node,
                str(script),
                "--directory",
                str(data),
                "--address",
                "127.0.0.1",
                "--port",
                str(self._moto_port),
                "--silent",
                "--no-vhost-buckets",
                "--allow-mismatched-signatures",
                "--configure-bucket",
                self.bucket,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        port = self._moto_port
        self._wait_for(
            lambda: tcp_open("127.0.0.1", port, 0.2),
            self._moto_process,
            "s3rver",
            log_path,
            timeout_s=30.0,
        )
        log.info("S3 server (s3rver, on disk) at %s, bucket %s", self.s3_endpoint, self.bucket)

    def _start_moto(self) -> None:
        if self._moto_port is None:
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
                "VJ_S3_ACCESS_KEY": self.s3_access_key,
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
            is_gateway = name == "gateway" or name.startswith("gateway_")
            default = [
                sys.executable,
                "-m",
                "voicejury_gateway" if is_gateway else f"voicejury_{name}",
            ]
            if is_gateway:
                default.append("serve")
            self._planned_env[name] = {**base, "VJ_HTTP_PORT": str(port)}
            self._services[name] = _Service(
                name=name,
                command=self._service_commands.get(name, default),
                port=port,
                env=dict(self._planned_env[name]),
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
