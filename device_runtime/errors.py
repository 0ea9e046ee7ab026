"""Errors raised by the device runtime. Every message says what was wrong, what was expected, and what to do.

The sdk re-exports these (its own errors derive from :class:`LowraError` too), so an app can catch
``LowraError`` for anything lowra refuses.
"""
from __future__ import annotations


class LowraError(Exception):
    """Base class of every error lowra raises on purpose."""


class ConfigError(LowraError, ValueError):
    """A configuration value, mode, target name or tensor shape is invalid (sdk, exporters and engines alike)."""


class BlobError(LowraError, ValueError):
    """A user blob (or base file) cannot be used as it is."""


class BlobTruncatedError(BlobError):
    """The file ends before the data its header announces."""


class ChecksumMismatchError(BlobError):
    """The payload checksum stored in the blob does not match its content (corruption or tampering)."""


class UnsupportedFormatError(BlobError):
    """Not a lowra adapter blob, or a format version this runtime does not read."""


class BlobContentError(BlobError):
    """The blob parses but its tensors are inconsistent: wrong shapes, dtypes, widths or non-finite values."""


class BaseMismatchError(LowraError, ValueError):
    """The adapter was trained against another base model than the one loaded."""


class BaseNotFoundError(LowraError, FileNotFoundError):
    """The base model directory or its weights file does not exist."""


class ProgramError(LowraError, ValueError):
    """An exported program (.pte), its data file (.ptd) or its manifest is corrupt or belongs to another export."""


class KernelLibraryError(LowraError, OSError):
    """The native kernel library a program needs is missing, cannot be loaded, or does not provide its ops."""


class OutputExistsError(LowraError, FileExistsError):
    """An output path already holds something and the caller did not ask to replace it."""
