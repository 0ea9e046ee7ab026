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


class OnnxModelError(UnsupportedFormatError):
    """An ONNX model directory is missing, malformed, or needs an onnxruntime this device does not have."""


class OnnxAdapterError(BlobContentError):
    """An adapter's parameters do not match the ONNX model's LoRA inputs (missing, extra or misshapen)."""


class KernelLibraryError(LowraError, OSError):
    """The native kernel library a program needs is missing, cannot be loaded, or does not provide its ops."""


class OutputExistsError(LowraError, FileExistsError):
    """An output path already holds something and the caller did not ask to replace it."""


# ------------------------------------------------------------------------------------------------ trust
# One class per reason a signed or encrypted file is refused, so an app can tell them apart (and tests do).
class TrustError(BlobError):
    """A file's origin, binding or freshness cannot be trusted under the app's policy."""


class ForgedSignatureError(TrustError):
    """The signature does not verify: the bytes were changed after signing, or were never signed by that key."""


class UntrustedKeyError(TrustError):
    """The file is signed by a key the app did not pin."""


class RevokedKeyError(TrustError):
    """The file is signed by a key on the app's revocation list."""


class UnsignedFileError(TrustError):
    """The app requires signed files and this one is not signed (a v1 file)."""


class ExpiredFileError(TrustError):
    """The file's validity ended (``expires_at``), or it claims to be issued in the future."""


class ReplayedFileError(TrustError):
    """The file's sequence number is not newer than one already accepted for the same user: a replay or rollback."""


class WrongRecipientError(TrustError):
    """The file is bound to another user or device than the one loading it."""


class DecryptionKeyError(TrustError):
    """The file is encrypted and no key, or not the key it was sealed with, was given."""


class PayloadTamperedError(TrustError):
    """The encrypted payload (or the body it decrypts to) does not authenticate: it was changed."""


class SigningUnavailableError(LowraError, ImportError):
    """Signing, verification or encryption needs the optional ``cryptography`` package."""
