/* liblowra: the C ABI a mobile app links to verify, decode and apply lowra adapter blobs on device.
 *
 * The spec is docs/FORMAT.md ("Adapter blob" v1, "Quantized base", "Signed files"); the numpy reference in
 * lowra.device_runtime.formats is the truth this library is tested against byte for byte.
 *
 * Conventions: every function returns a lowra_status (LOWRA_OK = 0) and never lets a C++ exception cross the
 * boundary; on failure lowra_last_error() returns a one-line message naming what was wrong and what was expected
 * (thread-local, valid until the next liblowra call on the same thread). Handles are opaque. A base handle is not
 * thread-safe: the app serializes calls on one handle (loading a user on a background thread is fine as long as no
 * other thread reads weights of that handle meanwhile).
 */
#ifndef LOWRA_H
#define LOWRA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define LOWRA_API __declspec(dllexport)
#else
#define LOWRA_API __attribute__((visibility("default")))
#endif

#define LOWRA_ABI_VERSION 1

/* One code per error kind of the Python runtime (lowra.device_runtime.errors), so an app can tell them apart. */
typedef enum lowra_status {
  LOWRA_OK = 0,
  LOWRA_ERR_ARGUMENT = 1,           /* a null pointer, a buffer too small, an unknown name (ValueError) */
  LOWRA_ERR_BLOB = 2,               /* the container itself is malformed (BlobError) */
  LOWRA_ERR_TRUNCATED = 3,          /* the file ends before the data its header announces (BlobTruncatedError) */
  LOWRA_ERR_CHECKSUM = 4,           /* payload sha256 or base fingerprint differs (ChecksumMismatchError) */
  LOWRA_ERR_UNSUPPORTED_FORMAT = 5, /* not this format, or a version this library does not read */
  LOWRA_ERR_CONTENT = 6,            /* parses, but tensors/metadata are inconsistent (BlobContentError) */
  LOWRA_ERR_BASE_MISMATCH = 7,      /* the adapter was trained against another base (BaseMismatchError) */
  LOWRA_ERR_BASE_NOT_FOUND = 8,     /* the base path or its weights file does not exist (BaseNotFoundError) */
  LOWRA_ERR_IO = 9,                 /* the operating system refused a read or a mapping */
  LOWRA_ERR_NO_USER = 10,           /* an operation needs a loaded user and none is */
  LOWRA_ERR_INTERNAL = 11,          /* out of memory or a bug: the message says which */
  LOWRA_ERR_PROGRAM = 12,           /* ExecuTorch refused a program or its data (ProgramError; lowra_program.h) */
  LOWRA_ERR_KERNEL = 13,            /* a program's operator has no kernel loaded (KernelLibraryError) */
  /* Signed files (docs/FORMAT.md "Signed files"), one code per TrustError subclass: */
  LOWRA_ERR_FORGED = 14,          /* the signature does not match the bytes (ForgedSignatureError) */
  LOWRA_ERR_UNTRUSTED_KEY = 15,   /* signed by a key the app did not pin (UntrustedKeyError) */
  LOWRA_ERR_REVOKED_KEY = 16,     /* signed by a key on the app's revocation list (RevokedKeyError) */
  LOWRA_ERR_UNSIGNED = 17,        /* an unsigned file where the app only accepts signed ones (UnsignedFileError) */
  LOWRA_ERR_EXPIRED = 18,         /* expired, or issued in the future (ExpiredFileError) */
  LOWRA_ERR_REPLAYED = 19,        /* an older sequence than one accepted before (ReplayedFileError) */
  LOWRA_ERR_WRONG_RECIPIENT = 20, /* made for another user or device (WrongRecipientError) */
  LOWRA_ERR_DECRYPTION_KEY = 21,  /* encrypted, and no key or another key was given (DecryptionKeyError) */
  LOWRA_ERR_TAMPERED = 22         /* the payload fails authentication or its signed digest (PayloadTamperedError) */
} lowra_status;

typedef struct lowra_base lowra_base; /* a base model's weights, the pristine copy, plus at most one active user */
typedef struct lowra_trust lowra_trust; /* an app's trust policy for signed files (lowra.device_runtime.TrustPolicy) */

/* What lowra_user_load loaded. Strings point into the base handle and stay valid until the next load/unload. */
typedef struct lowra_user_info {
  const char* adapter_id;
  const char* base_fingerprint; /* "sha256:<hex>" the blob names (and the base matched) */
  size_t n_modules;             /* modules whose weights the user changes */
  size_t file_bytes;
  double effective_bits; /* 8 * file bytes / parameters of the uncompressed LoRA adapter */
  double load_ms;        /* verify + decode + merge */
  double apply_ms;       /* merge alone */
} lowra_user_info;

/* The message of the last failed call on this thread ("" after a success). */
LOWRA_API const char* lowra_last_error(void);
/* The library's version string and LOWRA_ABI_VERSION it was built with. */
LOWRA_API const char* lowra_version(void);
LOWRA_API int lowra_abi_version(void);

/* ---- Trust: which signed files the app accepts (lowra.device_runtime.trust.TrustPolicy, docs/FORMAT.md "Reading").
 * A new policy pins no key: unsigned (v1) files are accepted and every signed file is LOWRA_ERR_UNTRUSTED_KEY. Once
 * a key is pinned, unsigned files are LOWRA_ERR_UNSIGNED unless lowra_trust_allow_unsigned(trust, 1). Configure a
 * policy before handing it to a base or model; it is shared with them (freeing it while they are open is safe), and
 * its replay store is safe to use from several threads. */
LOWRA_API lowra_status lowra_trust_new(lowra_trust** out);
LOWRA_API void lowra_trust_free(lowra_trust* trust);
/* Pin a public key: 32 raw Ed25519 bytes or a PEM "PUBLIC KEY" file's bytes (`lowra keys new` writes one).
 * `key_id_out` (may be null) receives its 32-hex-digit id and a NUL (33 bytes). */
LOWRA_API lowra_status lowra_trust_pin_key(lowra_trust* trust, const uint8_t* key, size_t key_size, char* key_id_out,
                                           size_t key_id_size);
/* Add the key ids of a revocation list (the bytes of `revocations.json`, `lowra keys revoke`). */
LOWRA_API lowra_status lowra_trust_revoke(lowra_trust* trust, const uint8_t* list, size_t list_size);
/* 1: accept unsigned files even with keys pinned; 0: never; -1: the default (only while no key is pinned). */
LOWRA_API lowra_status lowra_trust_allow_unsigned(lowra_trust* trust, int allow);
/* This device's id: a file bound to another device is LOWRA_ERR_WRONG_RECIPIENT. Null: no id (such files refused). */
LOWRA_API lowra_status lowra_trust_set_device(lowra_trust* trust, const char* device_id);
/* Keep the accepted sequences in this file (JSON, rewritten atomically after each accepted file; the format
 * FileSequenceStore writes), so restarting the app cannot replay an old file. Read now; missing is empty. */
LOWRA_API lowra_status lowra_trust_set_sequence_file(lowra_trust* trust, const char* path);
/* The time the checks use, in seconds since the Unix epoch (an app with a trusted clock; tests); LOWRA_SYSTEM_TIME
 * goes back to the system clock. */
#define LOWRA_SYSTEM_TIME INT64_MIN
LOWRA_API lowra_status lowra_trust_set_time(lowra_trust* trust, int64_t unix_seconds);

/* Open a base: a quantized base file written by `lowra quantize-base` (every layer decoded to float32, dense float
 * tensors widened, tied tensors under every name) or a Hugging Face model folder holding model.safetensors
 * (F32/F16/BF16 weights widened to float32). Verifies the file as the Python reader does. */
LOWRA_API lowra_status lowra_base_open(const char* path, lowra_base** out);
/* lowra_base_open under `trust` (null: the default policy): a signed base file is authenticated before any of it is
 * parsed, and its claims must name its own fingerprint and content. The base keeps the policy for its users. */
LOWRA_API lowra_status lowra_base_open_trusted(const char* path, lowra_trust* trust, lowra_base** out);
/* Free the base and its user's buffers. Null is accepted. */
LOWRA_API void lowra_base_close(lowra_base* base);

/* The fingerprint a blob targeting these modules must name: "sha256:" + 64 hex digits and a NUL (72 bytes).
 * Each module's weight is "<module>.weight"; a module the base lacks is LOWRA_ERR_BASE_MISMATCH. */
LOWRA_API lowra_status lowra_base_fingerprint(lowra_base* base, const char* const* modules, size_t n_modules,
                                              char* out, size_t out_size);

/* Verify a blob (container, format/version, checksum, structure, codebooks ascending and finite, base binding),
 * decode its factors and merge W = pristine + up @ down into fresh per-user buffers, replacing the current user.
 * On any failure the previous user (or the pristine base) stays active, unchanged. `info` may be null. */
LOWRA_API lowra_status lowra_user_load(lowra_base* base, const uint8_t* blob, size_t blob_size,
                                       lowra_user_info* info);
/* lowra_user_load of a blob that may be signed and encrypted, under the base's trust policy: `user_id` (may be null)
 * names the user this load is for, so a signed blob of another user is refused; `decryption_key` (32 bytes, may be
 * null) opens an encrypted blob, in memory. A signed blob's claims must name the blob inside, and a non-null
 * base_content claim must be this base's payload_sha256 (LOWRA_ERR_BASE_MISMATCH on a model folder, which cannot
 * prove its content). lowra_user_load(b, blob, n, info) is lowra_user_load_signed(b, blob, n, NULL, NULL, 0, info). */
LOWRA_API lowra_status lowra_user_load_signed(lowra_base* base, const uint8_t* blob, size_t blob_size,
                                              const char* user_id, const uint8_t* decryption_key, size_t key_size,
                                              lowra_user_info* info);
/* Back to the pristine base, bit-exactly (the user's buffers are dropped; the base was never written). */
LOWRA_API lowra_status lowra_user_unload(lowra_base* base);
/* The active user's id ("" when none) through `info` as lowra_user_load fills it; LOWRA_ERR_NO_USER when none. */
LOWRA_API lowra_status lowra_user_current(lowra_base* base, lowra_user_info* info);

/* A float32 tensor as the model should compute with it now: the user's merged buffer where the user changes it,
 * else the base's. `shape` receives up to `max_dims` dimensions and `ndim` their count. The pointer stays valid
 * until the next lowra_user_load / lowra_user_unload / lowra_base_close on this handle. Tensors that are not
 * floating point (e.g. int64 position ids) are refused with LOWRA_ERR_ARGUMENT. */
LOWRA_API lowra_status lowra_weight(lowra_base* base, const char* name, const float** data, int64_t* shape,
                                    size_t max_dims, size_t* ndim);
/* sha256 (64 hex digits and a NUL: 65 bytes) of lowra_weight(name)'s float32 little-endian bytes: the digest
 * formats.tensor_digest computes, so an app or a test compares weights without copying them out. */
LOWRA_API lowra_status lowra_weight_digest(lowra_base* base, const char* name, char* out, size_t out_size);
/* Number of tensors and the i-th tensor's name (in the order of the file; aliases after), for listing. */
LOWRA_API size_t lowra_tensor_count(lowra_base* base);
LOWRA_API const char* lowra_tensor_name(lowra_base* base, size_t index);

#ifdef __cplusplus
}
#endif

#endif /* LOWRA_H */
