"""The one interface every device engine implements, and the one record of the active user.

- :class:`Engine`: verify a user's blob against the engine's base, make it the active user, and go back to the
  base bit-exactly. The numpy :class:`~lowra.device_runtime.runtime.DeviceRuntime` is an Engine only: it merges
  weights for an inference engine that runs them and has no forward pass of its own.
- :class:`GeneratingEngine`: an Engine that also runs the model (ONNX Runtime, ExecuTorch).

Every engine raises the same errors: an unknown mode is a ConfigError, a blob for another base a
BaseMismatchError, a blob whose shapes do not fit a BlobContentError, a corrupt blob a ChecksumMismatchError (or
another BlobError).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, TypeVar, runtime_checkable

from lowra.device_runtime.engines.generation import GenerationConfig
from lowra.device_runtime.errors import ConfigError
from lowra.device_runtime.formats.constants import USER_MODES

__all__ = ["Engine", "GeneratingEngine", "UserInfo", "check_mode", "serialized"]

F = TypeVar("F", bound=Callable[..., Any])


def serialized(method: F) -> F:
    """Run an engine method under the engine's ``_lock`` (a ``threading.RLock`` made in ``__init__``).

    An engine's session, KV cache and program are one mutable state: a user swap in one thread and a generation in
    another must not interleave. Every public method that touches that state is serialized, so an app may call
    an engine from a UI thread and a background loader without its own locking (calls wait for each other).
    """

    @functools.wraps(method)
    def locked(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


@dataclass(frozen=True)
class UserInfo:
    """What ``load_user`` activated, and what it cost."""

    adapter_id: str
    mode: str  # "merge" or "side"
    modules: tuple[str, ...]  # the modules the user changes (components all dropped: not listed)
    file_bytes: int  # size of the user's file
    effective_bits: float  # every byte of the file over the adapter's parameters (docs/FORMAT.md)
    load_ms: float  # load_user wall time: read + verify + decode + apply
    apply_ms: float  # the apply part alone: merge, data composition or adapter conversion


def check_mode(mode: str, supported: Sequence[str], engine: str, hint: str = "") -> None:
    """Refuse a mode that is not one of the user modes ``engine`` runs; ``hint`` says what to do instead."""
    if mode not in supported:
        known = "" if mode in USER_MODES else f" (the user modes are {list(USER_MODES)})"
        raise ConfigError(f"mode={mode!r}{known}; {engine} runs users in mode {' or '.join(map(repr, supported))}"
                          + (f"; {hint}" if hint else ""))


@runtime_checkable
class Engine(Protocol):
    """Verify, activate and deactivate one user at a time on a fixed base."""

    @property
    def user(self) -> UserInfo | None:
        """The active user, or None on the base."""
        ...

    def load_user(self, blob: str | Path | bytes, mode: str = ..., *, user_id: str | None = None,
                  decryption_key: bytes | None = None) -> UserInfo:
        """Verify ``blob`` (a path or the file's bytes) against the base and the engine's trust policy, and make it
        the active user. ``user_id`` names who the load is for (a signed blob for another user is refused);
        ``decryption_key`` opens an encrypted blob."""
        ...

    def unload_user(self) -> None:
        """Back to the base, bit for bit."""
        ...


@runtime_checkable
class GeneratingEngine(Engine, Protocol):
    """An Engine that runs the model itself."""

    def generate(self, prompt: str, config: GenerationConfig = GenerationConfig(), chat: bool = False) -> str:
        """Text after ``prompt``; ``chat=True`` wraps it in the export's prompt template first."""
        ...
