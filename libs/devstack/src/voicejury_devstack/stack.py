"""The whole system on one machine: infrastructure plus each service as its own process.

`LocalStack` is what `make demo`, `python -m voicejury_devstack up` and the end-to-end
tests share. It reuses NATS and PostgreSQL when they already run (this project's machines
have both) and starts them otherwise; the S3 server is always a private process, so every
stack has an empty store. Everything a run creates is named after its `namespace`
(streams, bucket, database), so stacks started side by side do not see each other; one
namespace serves one stack at a time (a PostgreSQL advisory lock refuses a second), and
unless `keep_data` is set the stack deletes its database, streams and KV buckets on stop.

The fault tests need infrastructure they may kill: `own_nats=True` and `own_postgres=True`
start private servers (never the shared ones), and `s3="s3rver"` runs an S3 server that
keeps objects on disk (moto keeps them in memory, so a restart would lose them). Each of
those can then be stopped and started again on the same port with the same data.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import hashlib
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
import threading
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
# `CommonSettings.namespace`'s default, the deployments' namespace: a local stack, which
# deletes its namespace's streams on stop, never takes it.
_DEPLOYED_NAMESPACE = "vj"
# Mirrors `Topology.cancel_bucket` / `join_bucket` and the bus's effects bucket: the KV
# buckets the services create, each a stream `KV_<bucket>` on the nats-server.
_KV_BUCKETS: tuple[str, ...] = ("cancelled", "joins", "effects")


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


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server listens on `port` (a socket in TIME_WAIT does not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn does: without SO_REUSEADDR a port just closed would look taken.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def namespace_streams(namespace: str) -> tuple[str, ...]:
    """The JetStream streams the services create for `namespace`: the jobs stream and the
    streams behind its KV buckets (mirrors `voicejury_contracts.topology`)."""
    return (f"{namespace.upper()}_JOBS", *(f"KV_{namespace}_{b}" for b in _KV_BUCKETS))


async def delete_namespace(nats_url: str, namespace: str) -> list[str]:
    """Deletes the namespace's streams and KV buckets from a nats-server; returns those found.

    Each stream reserves its `max_bytes` (1 GiB for the jobs stream) in the server's store
    for as long as it exists, so a namespace left behind shrinks what every other user of a
    shared nats-server may create (10047 "insufficient storage resources available").
    """
    import nats
    import nats.js.errors

    nc = await nats.connect(
        nats_url, connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0
    )
    deleted: list[str] = []
    failure: Exception | None = None
    try:
        js = nc.jetstream(timeout=10)
        for name in namespace_streams(namespace):
            try:
                await js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                continue
            except Exception as exc:  # the others are still worth deleting
                failure = failure or exc
                continue
            deleted.append(name)
    finally:
        await nc.close()
    if failure is not None:
        raise failure
    return deleted


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
    """SIGTERM every process group, wait up to `grace_s` in total, then SIGKILL the rest.

    However the wait ends (the grace period, or a second Ctrl-C cutting it short), every
    group gets SIGKILL before this returns or raises: no process outlives the call.
    """
    alive = [p for p in processes if p.poll() is None]
    completed = False
    try:
        for p in alive:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        completed = True
    finally:
        for p in alive:
            if completed and grace_s > 0 and p.poll() is None:
                log.warning("pid %d ignored SIGTERM for %.0f s; killing it", p.pid, grace_s)
            # Also when the leader is gone: no orphan in its group keeps a port or a GPU.
            _signal_group(p, signal.SIGKILL)
        for p in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)  # reaps it; SIGKILL cannot be ignored


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` making a Linux child receive SIGKILL when this process dies.

    The children lead their own sessions (so a Ctrl-C meant for the stack does not hit
    them first), so nothing else would stop them if the stack's process is SIGKILLed.
    The kernel sends the signal when the *thread* that forked exits, so it is set only for
    children started from the main thread (a fault test may restart one from a worker).
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the setting took effect
            os.kill(os.getpid(), sigkill)

    return preexec


def _popen(command: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """`Popen` for the stack's children: each leads its own session and dies with us."""
    return subprocess.Popen(
        list(command), start_new_session=True, preexec_fn=_die_with_parent(), **kwargs
    )


def describe_exit(code: int) -> str:
    """`3`, or `-9 (SIGKILL)` for a process killed by a signal."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


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


class _NamespaceLock:
    """A PostgreSQL advisory lock on a namespace, held by one connection for a stack's life.

    Two stacks with one namespace share a database, streams and KV buckets: the second
    would drop the first's database (WITH FORCE) and, on its way out, its streams. The lock
    is session-level, so PostgreSQL releases it when the connection closes, including when
    the stack's process is killed: a crash never leaves a namespace locked.
    """

    _APP = "voicejury-devstack"

    def __init__(self, admin_url: str, database: str) -> None:
        self._url = admin_url
        digest = hashlib.sha256(f"{self._APP}:{database}".encode()).digest()
        self.key = int.from_bytes(digest[:8], "big", signed=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._conn: Any = None

    def _call(self, coro: Coroutine[Any, Any, _T], timeout_s: float = 30.0) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def acquire(self, label: str) -> str | None:
        """Takes the lock; None when taken, otherwise who holds it (`application_name`)."""
        # The connection must outlive any one call: it gets a loop of its own, in a thread.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="devstack-namespace-lock", daemon=True
        )
        self._thread.start()
        try:
            self._conn = self._call(
                asyncpg.connect(
                    self._url,
                    timeout=10,
                    server_settings={"application_name": f"{self._APP} {label}"[:63]},
                )
            )
            got = self._call(self._conn.fetchval("SELECT pg_try_advisory_lock($1)", self.key))
            if got:
                return None
            holder = self._call(
                self._conn.fetchval(
                    "SELECT a.application_name FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.classid::bigint = $1 AND l.objid::bigint = $2 LIMIT 1",
                    (self.key >> 32) & 0xFFFFFFFF,
                    self.key & 0xFFFFFFFF,
                )
            )
        except BaseException:
            self.release()
            raise
        self.release()
        return str(holder or "another process")

    def release(self) -> None:
        """Closes the connection (which releases the lock) and stops the loop's thread."""
        loop, thread, conn = self._loop, self._thread, self._conn
        self._loop, self._thread, self._conn = None, None, None
        if loop is None:
            return
        try:
            if conn is not None:
                try:
                    asyncio.run_coroutine_threadsafe(conn.close(timeout=5), loop).result(10)
                except Exception as exc:  # a lost connection has released the lock already
                    log.debug("closing the namespace lock's connection: %s", exc)
                    loop.call_soon_threadsafe(conn.terminate)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
                if not thread.is_alive():
                    loop.close()


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

    `stop()` (and a failed `start()`) terminates every child, drops the database and
    deletes the namespace's streams and KV buckets from the nats-server (each stream holds
    a reservation in its store), all unless `keep_data`; a second interrupt during it kills
    what is left instead of abandoning it. The children also get SIGKILL if this process
    dies without a teardown (Linux), and a stack refuses a namespace another one holds.
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
        if namespace == _DEPLOYED_NAMESPACE:
            # A stack deletes its namespace's streams on stop: never a deployment's.
            raise ValueError(
                f"namespace {namespace!r} is the deployments' default; pick another for a "
                "local stack"
            )
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
        self._lock: _NamespaceLock | None = None
        # Set once this stack holds the namespace: only then may it delete what is named
        # after it (a stack refused for a namespace in use must not wreck the other one's).
        self._owns_namespace = False
        # Set by a second interrupt during `stop()`: what is left is killed, not waited for.
        self._hurry = False

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
        self._hurry = False
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._check_requested_port()
            self._ensure_nats()
            if self._own_postgres:
                self._start_own_postgres()
            else:
                self._ensure_postgres()
            self._lock_namespace()
            if not self.keep_data:
                # Streams left by a run killed before its teardown, as for its database.
                self._delete_streams()
            self._create_database()
            self._start_s3()
            self._plan_services()
            if self.migrate:
                self._run_gateway_cli("migrate")
            if "gateway" in self.services:
                self._api_key = self._create_api_key()
            for service in self._services.values():
                self._ensure_port_free(service)
                self._spawn(service)
            self.wait_ready(list(self._services))
        except BaseException:
            # Also on Ctrl-C during a long model load: never leave processes or a DB behind.
            self.stop()
            raise

    def stop(self) -> None:
        """Tears everything down; each step runs whatever happened in the ones before.

        A second Ctrl-C (or SIGTERM) while it waits for the services to exit does not
        abandon the rest: the remaining processes get SIGKILL at once, the interrupted step
        is finished the fast way, the others still run, and the interrupt is raised after.
        """
        if not self._started:
            return
        self._started = False
        interrupt: BaseException | None = None
        steps: tuple[tuple[str, Callable[[], None]], ...] = (
            ("the services", self._stop_services),
            ("the S3 server", self._stop_s3),
            ("the nats-server", self._stop_own_nats),
            ("the namespace's streams", self._delete_streams_on_stop),
            ("the private PostgreSQL", self._stop_own_postgres),
            (f"database {self.database}", self._drop_database_on_stop),
            ("the namespace lock", self._unlock_namespace),
        )
        for what, step in steps:
            for attempt in (1, 2):
                try:
                    step()
                except KeyboardInterrupt as exc:
                    interrupt = interrupt or exc
                    if not self._hurry:
                        log.warning("interrupted again: killing what is left, then cleaning up")
                    self._hurry = True
                    if attempt == 1:
                        continue  # once more, the fast way (SIGKILL, no grace period)
                except Exception as exc:  # the next steps run regardless
                    log.warning("teardown: could not stop %s: %s", what, exc)
                break
        if interrupt is not None:
            raise interrupt

    def _grace_s(self) -> float:
        return 0.0 if self._hurry else self.stop_grace_s

    def _stop_services(self) -> None:
        try:
            running = [s.process for s in self._services.values() if s.process is not None]
            _terminate(running, self._grace_s())
        finally:
            for service in self._services.values():
                if service.log_file is not None:
                    service.log_file.close()
                    service.log_file = None

    def _stop_s3(self) -> None:
        if self._moto_process is not None:
            _terminate([self._moto_process], self._grace_s())
            self._moto_process = None
        if self._s3_kind == "s3rver" and not self.keep_data:
            shutil.rmtree(self.workdir / "s3", ignore_errors=True)

    def _stop_own_nats(self) -> None:
        if self._nats_process is not None:
            _terminate([self._nats_process], self._grace_s())
            self._nats_process = None
            if not self.keep_data:
                shutil.rmtree(self.workdir / "nats", ignore_errors=True)

    def _delete_streams_on_stop(self) -> None:
        # A private nats-server's store went with it (or stays, with keep_data).
        if self._owns_namespace and not self.keep_data and self._nats_port is None:
            self._delete_streams()

    def _stop_own_postgres(self) -> None:
        if self._pg_dir is None:
            return
        try:
            self._pg_ctl("stop", "-m", "immediate" if self._hurry else "fast")
        except (StackError, subprocess.TimeoutExpired) as exc:
            log.warning("could not stop the private PostgreSQL: %s", exc)
        shutil.rmtree(self._pg_dir, ignore_errors=True)
        self._pg_dir = None
        self._database_created = False  # dropped with the whole cluster

    def _drop_database_on_stop(self) -> None:
        if self._database_created and not self.keep_data:
            try:
                _run_coroutine(self._drop_database())
            except Exception as exc:  # teardown goes on; a leftover DB is only disk space
                log.warning("could not drop database %s: %s", self.database, exc)
            self._database_created = False

    def _lock_namespace(self) -> None:
        if self._pg_dir is not None:
            # A private cluster is this stack's alone (and a fault test may restart it,
            # which would cut the lock's connection).
            self._owns_namespace = True
            return
        lock = _NamespaceLock(self._admin_postgres_url, self.database)
        holder = lock.acquire(f"{self.namespace} pid {os.getpid()}")
        if holder is not None:
            raise StackError(
                f"namespace {self.namespace!r} is in use by another stack ({holder}) on "
                f"{_without_password(self._admin_postgres_url)}: two stacks with one namespace "
                f"would drop each other's database and streams. Stop that one, or pass another "
                f"namespace (--namespace NAME)"
            )
        self._lock = lock
        self._owns_namespace = True

    def _unlock_namespace(self) -> None:
        self._owns_namespace = False
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def _delete_streams(self) -> None:
        try:
            deleted = _run_coroutine(delete_namespace(self._nats_url, self.namespace))
        except Exception as exc:  # the services recreate what they need; only space is lost
            log.warning("could not delete the streams of %s: %s", self.namespace, exc)
            return
        if deleted:
            log.info("deleted %s", ", ".join(deleted))

    def _check_requested_port(self) -> None:
        port = self._requested_gateway_port
        if port and "gateway" in self.services and port_in_use(port):
            raise StackError(
                f"gateway port {port} is already in use (another stack or server listens "
                f"there, and its /readyz would be taken for this gateway's): pass another "
                f"--gateway-port, or 0 for a free one"
            )

    def _ensure_port_free(self, service: _Service) -> None:
        """Just before the first spawn: an explicit port must be free; a picked one is
        picked again if someone took it since (a few seconds of migrations went by)."""
        if service.name == "gateway" and self._requested_gateway_port:
            self._check_requested_port()
            return
        if not port_in_use(service.port):
            return
        service.port = free_port()
        service.env["VJ_HTTP_PORT"] = str(service.port)
        self._planned_env[service.name]["VJ_HTTP_PORT"] = str(service.port)

    def check_services(self) -> None:
        """Raises `StackError` naming a service whose process has exited: its exit code and
        the tail of its log. For clients that follow a job: a dead stage never answers."""
        for name, service in self._services.items():
            process = service.process
            if process is not None and (code := process.poll()) is not None:
                raise StackError(
                    f"{name} exited with code {describe_exit(code)}; "
                    f"{service.log_path} ends with:\n{tail(self.log(name), 30)}"
                )

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
                            f"{name} exited with code {describe_exit(code)} before it was ready; "
                            f"{service.log_path} ends with:\n{tail(self.log(name))}"
                        )
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{self.http_url(name)}/readyz").status_code == 200:
                            if process.poll() is not None:
                                # Someone else answered on its port: it failed to bind.
                                continue
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
        self._nats_process = _popen(
            [binary, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
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
        self._moto_process = _popen(
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
        self._moto_process = _popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self._moto_port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
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
        service.process = _popen(
            service.command,
            env=service.env,
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=service.log_file,
            stderr=subprocess.STDOUT,
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
