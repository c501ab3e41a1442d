"""Helpers shared by the model-carrying stages (separator, pitch, asr).

torch is imported lazily: this library is also used by stages that carry no model
(gateway, scorer, jury), and those must not pay for, or even have, torch.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from typing import Final, Protocol, TypeVar

DEVICE_CHOICES: Final = ("auto", "cpu", "cuda")


class ModelUnavailableError(Exception):
    """A model's weights cannot be loaded (not found locally and not downloadable).

    `setting` is the environment variable an operator changes to fix it, so the
    message the service logs and publishes tells them exactly where to look.
    """

    def __init__(self, model: str, setting: str, reason: str, fix: str | None = None) -> None:
        self.model = model
        self.setting = setting
        self.reason = reason
        fix = fix or "to a local model (directory or name) that exists on this machine"
        super().__init__(f"model {model!r} is unavailable: {reason}. Set {setting} {fix}.")


class LoadedModel(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...


M = TypeVar("M", bound=LoadedModel)


def pinned(model: M, expected_version: str | None, setting: str) -> M:
    """`model` when no version is pinned or its weights are the pinned version.

    A model name (or a directory, a hub cache) can come to hold other weights than the
    ones a deployment was validated with; a platform team pins the version a result's
    provenance reports (`model_version`) and a replica loading anything else refuses to
    serve, naming the setting, rather than scoring with unvalidated weights.
    """
    if expected_version and model.version != expected_version:
        raise ModelUnavailableError(
            model.name,
            setting,
            f"its weights are version {model.version!r}, not the pinned {expected_version!r}",
            fix="to the version to serve, or deploy the weights it names",
        )
    return model


def torch_has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str, cuda_available: Callable[[], bool] = torch_has_cuda) -> str:
    """Map a device setting to a device string: "auto" → "cuda" when present, else "cpu".

    `cuda_available` asks the library that will run the model (torch by default; the asr
    asks CTranslate2, and its image has no torch). An explicit "cuda" without a GPU raises
    `ValueError` rather than silently running on the CPU (a misconfigured GPU node should
    be loud, not slow).
    """
    if device not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    if device == "cpu":
        return "cpu"
    has_cuda = cuda_available()
    if device == "cuda" and not has_cuda:
        raise ValueError("device 'cuda' was requested but no CUDA device is available")
    return "cuda" if has_cuda else "cpu"


def release_accelerator_memory() -> None:
    """Return cached GPU memory to the driver after a delivery (no-op on the CPU, and in a
    process that never imported torch: the scorer and the jury do not pay its import)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def host_reachable(host: str, port: int = 443, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to `host:port` opens within `timeout_s` seconds.

    Used before a download so that a machine without network fails in seconds instead
    of hanging. The probe runs in a daemon thread because name resolution
    (getaddrinfo) ignores socket timeouts and can block far longer than `timeout_s`.
    """
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, name=f"probe-{host}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])
