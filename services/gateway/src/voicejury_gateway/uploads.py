"""Takes an uploaded recording to disk and checks it before any job exists.

Everything the gateway can see about an upload is checked here, so a job never fails
later for a reason visible at submission: size, format, duration, channels, rate, NaN,
silence, truncation.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import UploadFile
from starlette.types import ASGIApp, Receive, Scope, Send

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
    "FLAC": "audio/flac",
    "OGG": "audio/ogg",
    "MP3": "audio/mpeg",
    "AIFF": "audio/aiff",
}


async def receive_audio(
    upload: UploadFile, name: str, workdir: Path, limits: AudioLimits, max_bytes: int
) -> tuple[Path, AudioInfo, str]:
    """Writes `upload` under `workdir` and validates it; returns (path, info, content type)."""
    path = workdir / name
    size = 0
    with path.open("wb") as out:
        while chunk := await upload.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise ProblemError(
                    413, "upload_too_large", f"{name} is larger than {max_bytes // (1 << 20)} MB"
                )
            out.write(chunk)
    if size == 0:
        raise ProblemError(422, "empty_audio", f"{name} is an empty file")
    try:
        info = await asyncio.to_thread(probe_audio, path, limits)
        await asyncio.to_thread(check_audio_content, path, limits)
    except AudioRejectedError as exc:
        raise ProblemError(exc.status, exc.code, f"{name}: {exc.detail}") from exc
    return path, info, CONTENT_TYPES.get(info.format, "application/octet-stream")


class UploadLimitMiddleware:
    """Refuses an oversized body from its Content-Length, before anything reads it."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            headers = dict(scope["headers"])
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                response = problem_response(
                    413,
                    "upload_too_large",
                    f"request body of {int(length)} bytes exceeds {self.max_body_bytes} bytes",
                    scope.get("path"),
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
