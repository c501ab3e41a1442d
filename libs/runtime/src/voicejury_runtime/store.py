"""The object store: any S3-compatible server (MinIO in production) through the `minio` client.

Keys are deterministic per (job, role, artefact), and an object once written is never
replaced: a redelivered stage that writes a key again gets the first write's reference
back. That keeps the object equal to what the first (deduplicated) event announced, even
when a model is not bit-for-bit deterministic (GPU kernels). Writers racing for one key (two
jobs separating the same new reference on two GPU replicas) are settled by the server, not
by a look before the write: every write is conditional (`If-None-Match: *`, honoured by AWS
S3, MinIO and moto), so one wins and the others get the winner's reference. The client is
synchronous; every call runs in a worker thread so the event loop (heartbeats, NATS pings)
keeps flowing.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import urllib3
from minio import Minio
from minio.commonconfig import REPLACE, CopySource
from minio.deleteobjects import DeleteObject
from minio.error import S3Error
from minio.helpers import DictType

from voicejury_contracts import ObjectRef

from .errors import PermanentStageError
from .settings import CommonSettings

_SHA_META = "sha256"
# A cache entry found older than this when reused has its age restarted (see `reuse`).
CACHE_REFRESH_S = 24 * 3600.0
_CHUNK = 1 << 20
# A conditional write that meets a concurrent write still under way (409) is tried again
# after a pause, a few times.
_CONDITIONAL_ATTEMPTS = 3
_CONDITIONAL_BACKOFF_S = 0.2


class ObjectIntegrityError(PermanentStageError):
    """A downloaded object does not match the sha256 its reference promised.

    Objects are written once, so a mismatch is damage or tampering: retrying cannot help.
    """

    code = "corrupt_object"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ObjectStore:
    def __init__(self, settings: CommonSettings) -> None:
        self.bucket = settings.s3_bucket
        # Bounded timeouts and retries: an unreachable store is an error, never a hang.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=120.0),
            retries=urllib3.Retry(
                total=3, backoff_factor=0.3, status_forcelist=(500, 502, 503, 504)
            ),
            maxsize=16,
        )
        self._client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )
        # Presigning is local arithmetic (no request: the region is given), but the URL's
        # host is signed, so URLs handed to clients are made for the address they can reach.
        self._signer = self._client
        if settings.s3_public_endpoint:
            self._signer = Minio(
                settings.s3_public_endpoint,
                access_key=settings.s3_access_key.get_secret_value(),
                secret_key=settings.s3_secret_key.get_secret_value(),
                secure=settings.s3_secure
                if settings.s3_public_secure is None
                else settings.s3_public_secure,
                region=settings.s3_region,
            )

    @property
    def client(self) -> Minio:
        return self._client

    async def ensure_bucket(self) -> None:
        def _ensure() -> None:
            if not self._client.bucket_exists(self.bucket):
                try:
                    self._client.make_bucket(self.bucket)
                except S3Error as exc:  # another replica won the race
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

        await asyncio.to_thread(_ensure)

    async def ping(self) -> bool:
        return await asyncio.to_thread(self._client.bucket_exists, self.bucket)

    async def put_file(self, key: str, path: Path, content_type: str) -> ObjectRef:
        """Stores `path` at `key` unless an object is there already (see the module doc)."""

        def _put() -> ObjectRef:
            if (existing := self._stat(key)) is not None:
                return existing
            # One PUT of the whole body: only a single request can carry the condition
            # through this client (stems of a 10-minute song are about 160 MB; S3 takes up
            # to 5 GiB in one PUT).
            return self._put_once(key, path.read_bytes(), content_type)

        return await asyncio.to_thread(_put)

    async def put_bytes(self, key: str, data: bytes, content_type: str) -> ObjectRef:
        """Stores `data` at `key` unless an object is there already (see the module doc)."""

        def _put() -> ObjectRef:
            if (existing := self._stat(key)) is not None:
                return existing
            return self._put_once(key, data, content_type)

        return await asyncio.to_thread(_put)

    def _put_once(self, key: str, data: bytes, content_type: str) -> ObjectRef:
        """PUTs `data` on condition that `key` is free; when another writer got there first,
        its object's reference. The look before the write (`_stat`) only saves uploads: two
        writers can both find the key free, and the condition decides between them."""
        sha = hashlib.sha256(data).hexdigest()
        ref = ObjectRef(
            bucket=self.bucket, key=key, sha256=sha, size=len(data), content_type=content_type
        )
        headers: DictType = {"Content-Type": content_type, f"x-amz-meta-{_SHA_META}": sha}
        for _ in range(_CONDITIONAL_ATTEMPTS):
            try:
                # minio-py 7.2 turns unknown `metadata` keys into x-amz-meta-*, so the
                # condition cannot go through `put_object`; `_put_object` is its single PUT.
                self._client._put_object(self.bucket, key, data, {**headers, "If-None-Match": "*"})
                return ref
            except S3Error as exc:
                if exc.code == "PreconditionFailed":  # 412: the key is taken
                    if (existing := self._stat(key)) is not None:
                        return existing
                    # By an object this store did not write (no checksum, so unusable as
                    # ours): replaced, as it always was.
                    self._client._put_object(self.bucket, key, data, headers)
                    return ref
                if exc.code != "ConditionalRequestConflict":  # 409: a write under way (AWS)
                    raise
            time.sleep(_CONDITIONAL_BACKOFF_S)
        if (existing := self._stat(key)) is not None:
            return existing
        raise RuntimeError(f"{key}: concurrent writes kept conflicting")  # transient: retried

    async def stat(self, key: str) -> ObjectRef | None:
        """The reference of an existing object (sha256 from its metadata), or None."""
        return await asyncio.to_thread(self._stat, key)

    async def reuse(self, key: str, refresh_after_s: float = CACHE_REFRESH_S) -> ObjectRef | None:
        """`stat` for a cache hit: the object is about to be used again, so its age (which
        the cache retention sweeps by) restarts when it is older than `refresh_after_s`:
        a cache entry expires when unused for the retention, not when written that long
        ago while in daily use. The refresh is a server-side copy onto itself."""

        def _reuse() -> ObjectRef | None:
            found = self._stat_with_age(key)
            if found is None:
                return None
            ref, modified = found
            if modified is not None and modified < datetime.now(UTC) - timedelta(
                seconds=refresh_after_s
            ):
                self._client.copy_object(
                    self.bucket,
                    key,
                    CopySource(self.bucket, key),
                    metadata={"Content-Type": ref.content_type, _SHA_META: ref.sha256},
                    metadata_directive=REPLACE,
                )
            return ref

        return await asyncio.to_thread(_reuse)

    def _stat(self, key: str) -> ObjectRef | None:
        found = self._stat_with_age(key)
        return found[0] if found else None

    def _stat_with_age(self, key: str) -> tuple[ObjectRef, datetime | None] | None:
        try:
            st = self._client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                return None
            raise
        meta = {k.lower(): v for k, v in (st.metadata or {}).items()}
        sha = meta.get(f"x-amz-meta-{_SHA_META}")
        if sha is None:  # not written by this store (no checksum): treated as absent
            return None
        ref = ObjectRef(
            bucket=self.bucket,
            key=key,
            sha256=sha,
            size=int(st.size or 0),
            content_type=st.content_type or "application/octet-stream",
        )
        return ref, st.last_modified

    async def download(self, ref: ObjectRef, path: Path) -> Path:
        """Fetches `ref` to `path` and checks its sha256."""

        def _get() -> Path:
            self._client.fget_object(ref.bucket, ref.key, str(path))
            if sha256_file(path) != ref.sha256:
                raise ObjectIntegrityError(f"object {ref.key} does not match its sha256")
            return path

        return await asyncio.to_thread(_get)

    async def get_bytes(self, ref: ObjectRef) -> bytes:
        def _get() -> bytes:
            resp = self._client.get_object(ref.bucket, ref.key)
            try:
                data = resp.read()
            finally:
                resp.close()
                resp.release_conn()
            if hashlib.sha256(data).hexdigest() != ref.sha256:
                raise ObjectIntegrityError(f"object {ref.key} does not match its sha256")
            return data

        return await asyncio.to_thread(_get)

    async def delete_prefix(self, prefix: str, older_than_s: float | None = None) -> int:
        """Deletes every object under `prefix` (only those last modified more than
        `older_than_s` ago, when given); returns how many were deleted."""

        def _delete() -> int:
            cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s or 0)
            names = [
                DeleteObject(o.object_name)
                for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
                if o.object_name
                and (older_than_s is None or (o.last_modified and o.last_modified < cutoff))
            ]
            if names:
                errors = list(self._client.remove_objects(self.bucket, names))
                if errors:
                    raise RuntimeError(f"could not delete {len(errors)} objects under {prefix}")
            return len(names)

        return await asyncio.to_thread(_delete)

    async def presigned_get(self, key: str, expires_s: int) -> str:
        """A GET URL for `key`, valid `expires_s` seconds, on the public endpoint."""
        return await asyncio.to_thread(
            self._signer.presigned_get_object, self.bucket, key, timedelta(seconds=expires_s)
        )


def job_key(job_id: object, *parts: str) -> str:
    """`jobs/<job_id>/<parts...>`: all a job owns sits under one prefix, deleted together."""
    return "/".join(("jobs", str(job_id), *parts))


def reference_key(sha256: str, *parts: str) -> str:
    """`references/<sha256>/<parts...>`: a stored reference's original, shared by every
    tenant holding that audio; outside `jobs/`, so no job's deletion or retention takes it."""
    return "/".join(("references", sha256, *parts))
