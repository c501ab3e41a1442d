"""A model a stage loads once per process, or the reason it could not be loaded."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import PermanentStageError
from .models import ModelUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")


class ModelSlot(Generic[T]):
    """Loaded at startup off the event loop. A missing model does not crash the process:
    jobs that need it fail at once with `model_unavailable` and a message naming the
    setting to fix (a crash loop would hide that message from every client)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.value: T | None = None
        self.error: ModelUnavailableError | None = None

    async def load(self, loader: Callable[[], T]) -> None:
        try:
            self.value = await asyncio.to_thread(loader)
        except ModelUnavailableError as exc:
            self.error = exc
            log.error("%s unavailable: %s", self.label, exc)

    @property
    def available(self) -> bool:
        return self.value is not None

    def not_ready_reason(self) -> str | None:
        """For `/readyz`: None once loaded."""
        if self.value is not None:
            return None
        return str(self.error) if self.error else f"{self.label} is loading"

    def require(self) -> T:
        if self.value is None:
            raise PermanentStageError(
                str(self.error or f"{self.label} is not loaded yet"), code="model_unavailable"
            )
        return self.value
