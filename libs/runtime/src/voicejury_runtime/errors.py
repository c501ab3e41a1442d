"""How a stage tells the runtime what went wrong, and so how the message is acknowledged."""

from __future__ import annotations


class StageError(Exception):
    """Base: `code` is stable and machine-readable, the message is for people."""

    code = "stage_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class PermanentStageError(StageError):
    """Retrying cannot help (bad input, missing model): the job fails on this delivery."""

    code = "permanent_error"


class InvalidAudioError(PermanentStageError):
    code = "invalid_audio"


class TransientStageError(StageError):
    """Worth retrying with backoff (store or broker unavailable); any other exception is too."""

    code = "transient_error"


class JobCancelledError(Exception):
    """Raised at a checkpoint when the client cancelled the job: stop, publish nothing."""
