"""Takes an uploaded recording to disk and checks it before any job exists.

Everything the gateway can see about an upload is checked here, so a job never fails
later for a reason visible at submission: size, format, duration, channels, rate, NaN,
silence, truncation. The cheap checks come first: the body size as it streams in, then
the header (`probe_audio`), and only then a bounded decode (`check_audio_content`).

The header check includes the decoded size, channels x frames (`AudioLimits.max_samples`):
a FLAC of near-constant samples packs 8 channels x 192 kHz x 10 min (3.7 GB as float32)
into a few MB, within every other limit, and would take the separator down on each
delivery. It is refused here with 413 `audio_too_large`, before decoding.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Mapping
from pathlib import Path

from fastapi import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voicejury_runtime.audio import (
    AudioInfo,
    AudioLimits,
    AudioRejectedError,
    check_audio_content,
    probe_audio,
)

from .problems import ProblemError, problem_response

_CHUNK = 1 << 20

CONTENT_TYPES = {
    "WAV": "audio/wav",
    "WAVEX": "audio/wav",
    "RF64": "audio/wav",
    "FLAC": "audio/flac",
    "OGG": "audio/ogg",
    "MP3": "audio/mpeg",
    "AIFF": "audio/aiff",
}

EXTENSIONS = {
    "audio/wav": "wav",
    "audio/flac": "flac",
    "audio/ogg": "ogg",
    "audio/mpeg": "mp3",
    "audio/aiff": "aiff",
}
"""The file extension an accepted upload is stored under, by its detected content type."""


async def receive_audio(
    upload: UploadFile, name: str, workdir: Path, limits: AudioLimits, max_bytes: int
) -> tuple[Path, AudioInfo, str]:
    """Writes `upload` under `workdir` and validates it; returns (path, info, content type).

    The client's file name and content type are ignored: the file is named `name` and its
    type is what its bytes are.
    """
    path = workdir / name
    size = 0
    with path.open("wb") as out:
        while chunk := await upload.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ProblemError(
                    413, "upload_too_large", f"{name} is larger than {max_bytes} bytes"
                )
            out.write(chunk)
    if size == 0:
        raise ProblemError(422, "empty_audio", f"{name} is an empty file")
    try:
        info = await asyncio.to_thread(probe_audio, path, limits)
        content = await asyncio.to_thread(check_audio_content, path, limits)
    except AudioRejectedError as exc:
        raise ProblemError(exc.status, exc.code, f"{name}: {exc.detail}") from exc
    # The decoded length is the truth: an MP3 header only estimates it, a FLAC may omit it.
    info = dataclasses.replace(info, frames=content.frames)
    return path, info, CONTENT_TYPES.get(info.format, "application/octet-stream")


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


class UploadLimitMiddleware:
    """Bounds every request body before the multipart parser spools it to disk.

    The bound is the path's in `per_path` (what its uploads add up to: one recording for a
    reference, two for a job, plus fields and framing), else `max_body_bytes`. A declared
    Content-Length over the bound is refused before anything is read; a body without one
    (chunked) or longer than declared is cut off the moment it passes the bound.
    """

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, per_path: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.per_path = dict(per_path or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"].rstrip("/"), self.max_body_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await self._refuse(scope, receive, send, f"request body of {int(length)} bytes", limit)
            return

        received = 0
        too_large = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    raise _BodyTooLarge(limit)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if too_large:
                # Whatever the app makes of the cut-off body (FastAPI: a 400 "error parsing
                # the body"), the client hears 413, sent by `_refuse` below.
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        with contextlib.suppress(_BodyTooLarge):
            await self.app(scope, counting_receive, guarded_send)
        if too_large and not started:
            await self._refuse(scope, receive, send, "request body", limit)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, what: str, limit: int) -> None:
        response = problem_response(
            413, "upload_too_large", f"{what} exceeds {limit} bytes", scope.get("path")
        )
        await response(scope, receive, send)
