"""The ``lowra`` argument parser: every subcommand, its flags and their defaults.

It imports only the torch-free config dataclasses (their defaults are the flags' defaults, so the two cannot
drift), never torch, transformers or tqdm: ``lowra --help`` and ``lowra inspect`` must answer in well under a
second, and the commands that need torch import it when they run (:mod:`lowra.sdk.cli.commands`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import re

from lowra.device_runtime.formats.constants import CODEBOOK_FORMATS
from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.cli.demo_config import DemoConfig
from lowra.sdk.fleet.gate import GateConfig
from lowra.sdk.quant.base.config import SENSITIVITIES, QuantizeConfig, RecoveryConfig
from lowra.sdk.quant.config import CompressConfig
from lowra.sdk.training.config import TrainConfig

DESCRIPTION = """\
lowra: personalize a small LLM per user on the server, ship each user a sub-2-bit adapter blob,
merge it on the device.

typical flow:
  lowra train    --user samples/users/terse_notes --out out/terse_notes/adapter
  lowra compress --adapter out/terse_notes/adapter --bits 1.0 --out out/terse_notes/user.lowra
  lowra inspect  out/terse_notes/user.lowra
  lowra generate --blob out/terse_notes/user.lowra --prompt "Lunch with Ana on Monday at noon."
  lowra demo     (all of the above for the three sample users, with a report)

low-bit base (docs/FORMAT.md, Quantized base):
  lowra quantize-base --bits 2 --out base-2bit.safetensors
  lowra recover --quantized-base base-2bit.safetensors --out base-2bit-rec.safetensors
  lowra eval --quantized-base base-2bit-rec.safetensors

signing (docs/SECURITY.md):
  lowra keys new --dir keys --name server-2026
  lowra sign out/terse_notes/user.lowra --key keys/server-2026.key.pem --user-id terse_notes --out user.signed
  lowra inspect user.signed --trust keys

--base defaults to the embedded SmolLM2-135M-Instruct (converted once into ~/.cache/lowra or $LOWRA_CACHE);
pass a local Hugging Face causal-LM folder to use another model.
"""


def _add_base(p: argparse.ArgumentParser, quantized: bool = True, threads: bool = True) -> None:
    if threads:
        p.add_argument("--threads", type=int, default=None,
                       help="intra-op threads (default: the cores this process may use: CPU affinity capped by the "
                       "cgroup quota, or OMP_NUM_THREADS when exported)")
    p.add_argument(
        "--base",
        default=None,
        help="base model: a local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)",
    )
    if quantized:
        p.add_argument(
            "--quantized-base",
            default=None,
            metavar="FILE",
            help="a low-bit base written by `lowra quantize-base` from this --base: its linears (packed) and dense "
            "tensors replace the base's, and adapters bind to it (use the same file in train, compress, merge, "
            "generate)",
        )


def _add_lora_train(p: argparse.ArgumentParser) -> None:
    lc, tc = LoraConfig(), TrainConfig()
    g = p.add_argument_group("adapter")
    g.add_argument("--rank", type=int, default=lc.rank, help=f"LoRA rank (default {lc.rank})")
    g.add_argument("--alpha", type=float, default=lc.alpha, help=f"LoRA alpha; scaling = alpha/rank (default {lc.alpha})")
    g.add_argument(
        "--targets",
        default=lc.targets,
        help=f"{lc.targets!r} (every linear but the output head) or comma-separated names, e.g. q_proj,v_proj",
    )
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=tc.steps, help=f"optimizer steps (default {tc.steps})")
    g.add_argument("--batch-size", type=int, default=tc.batch_size, help=f"examples per step (default {tc.batch_size})")
    g.add_argument("--lr", type=float, default=tc.learning_rate, help=f"peak learning rate (default {tc.learning_rate})")
    g.add_argument("--max-len", type=int, default=tc.max_len, help=f"tokens per example (default {tc.max_len})")
    g.add_argument("--seed", type=int, default=tc.seed, help="random seed; same seed + data = same adapter")


def _add_compress(p: argparse.ArgumentParser, bits_default: float) -> None:
    g = p.add_argument_group("compression")
    g.add_argument(
        "--bits",
        type=float,
        default=bits_default,
        help=f"budget in effective bits per adapter parameter, counting every stored byte (default {bits_default})",
    )
    g.add_argument("--unweighted", action="store_true", help="ignore recorded input statistics (plain SVD and MSE)")


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> _dt.timedelta:
    """``30d``, ``12h``, ``90m``, ``3600s``, ``2w`` -> a timedelta (a bad value is argparse's usage error, exit 2)."""
    match = _DURATION.match(text.strip())
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration like 30d, 12h, 90m, 3600s or 2w")
    return _dt.timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2]])


def _sequence(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1 or int(text) >= 2**53:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer in [1, 2**53)")
    return int(text)


def _recovery_bits(text: str) -> float | None:
    if text.lower() in ("float16", "none"):
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 16:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bits in (0, 16] or 'float16'")
    return value


def _add_device_trust(p: argparse.ArgumentParser) -> None:
    """How the device side trusts the blob it loads (signed files, docs/SECURITY.md)."""
    g = p.add_argument_group("trust (signed and encrypted blobs)")
    g.add_argument("--trust", default=None, metavar="KEYS",
                   help="pin these keys (a key folder with its revocations.json, or one .pub.pem): the blob must be "
                   "signed by one of them. Without it, unsigned blobs are accepted and signed ones refused")
    g.add_argument("--user-id", default=None, help="the user this load is for: a blob signed for another is refused")
    g.add_argument("--decryption-key", default=None, metavar="KEYFILE",
                   help="the user's 32-byte key file, for an encrypted blob")


def _add_claims(p: argparse.ArgumentParser, title: str) -> None:
    """What a signature binds the file to (docs/FORMAT.md, Signed files)."""
    g = p.add_argument_group(title)
    g.add_argument("--user-id", default=None, metavar="USER",
                   help="the user the adapter belongs to; a device loading it for another user refuses it "
                   "(required for adapters, omitted for a base)")
    g.add_argument("--device-id", default=None, metavar="DEVICE",
                   help="bind the file to one device (default: any device of that user)")
    g.add_argument("--expires-in", type=_duration, default=None, metavar="DURATION",
                   help="validity from now, e.g. 30d, 12h, 90m (default: no expiry)")
    g.add_argument("--sequence", type=_sequence, default=None, metavar="N",
                   help="version of this adapter for this user, strictly increasing across re-issues; devices "
                   "refuse an older one (default: the current Unix time in milliseconds)")
    g.add_argument("--encrypt-key-file", default=None, metavar="FILE",
                   help="also encrypt the file (AES-256-GCM) with this 32-byte user key from "
                   "`lowra keys new-encryption-key`; the device needs the same key to load it")


def _add_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keys",
        help="make, list and revoke signing keys; make per-user encryption keys",
        description="Manage the server's Ed25519 signing keys in a key folder (NAME.key.pem, private, mode 0600; "
        "NAME.pub.pem, public, pinned by apps; revocations.json, shipped to apps) and per-user AES-256 keys. "
        "Rotation and revocation steps: docs/SECURITY.md.",
    )
    actions = p.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    a = actions.add_parser("new", help="make a new signing key pair",
                           description="Make a new Ed25519 key pair in --dir; prints its key id and both paths. "
                           "An existing key of that name is never overwritten.")
    a.add_argument("--dir", required=True, help="key folder (made, owner-only, if missing)")
    a.add_argument("--name", required=True, help="key name, e.g. server-2026 (a plain file name)")
    a = actions.add_parser("list", help="list the keys of a key folder",
                           description="List every key of --dir: name, key id, whether its private key is there, "
                           "whether it is revoked.")
    a.add_argument("--dir", required=True, help="key folder")
    a = actions.add_parser("revoke", help="add a key id to the folder's revocation list",
                           description="Add KEY_ID to --dir/revocations.json. Ship that file to apps "
                           "(TrustPolicy(revoked_keys=...)): files signed by the key are then refused.")
    a.add_argument("--dir", required=True, help="key folder")
    a.add_argument("key_id", metavar="KEY_ID", help="the 32-hex-digit key id (see `lowra keys list`)")
    a = actions.add_parser("new-encryption-key", help="write a random 32-byte per-user encryption key",
                           description="Write a random AES-256 key (32 raw bytes, mode 0600) for one user. The app "
                           "keeps it in its own key store; never ship it beside the blob.")
    a.add_argument("--out", required=True, help="key file to write")
    a.add_argument("--force", action="store_true", help="replace an existing key file")


def _add_fleet(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet",
        help="personalize many users on Ray: train, gate and register their adapters, resumably",
        description="Train, compress, evaluate, gate and register an adapter for every user of a folder (or JSONL "
        "manifest) on Ray, with the adapter registry (SQLite file or database URL) as the job's state: kill it at "
        "any point and run the same command again. How-to and what resumes how: docs/FLEET.md.",
    )
    actions = p.add_subparsers(dest="fleet_command", metavar="ACTION", required=True)
    a = actions.add_parser(
        "train", help="train every queued user of the inputs",
        description="Queue the users of --users (a folder of user folders, or a JSONL manifest of {\"path\": ...}) "
        "and train every queued user: K users per step on each worker, then per user compress, evaluate held-out "
        "loss (base, fp adapter, compressed), gate, write the blob under --out/blobs and register it. Writes "
        "--out/report.md, report.json and report.png.",
    )
    a.add_argument("--users", required=True, metavar="DIR|MANIFEST.jsonl", help="the users' dataset folders")
    a.add_argument("--registry", required=True, metavar="PATH_OR_URL",
                   help="registry database: a SQLite file path, or a URL such as postgresql+psycopg://host/db")
    a.add_argument("--out", required=True, help="folder for the blobs and the report")
    g = a.add_argument_group("workers")
    g.add_argument("--address", default=None, metavar="RAY_ADDR",
                   help="join this Ray cluster (default: start Ray on this machine, no set-up)")
    g.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: cores / threads; one per GPU on a GPU cluster)")
    g.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per worker (default: what the cores allow; workers x threads <= cores)")
    g.add_argument("--batch-users", type=int, default=4, metavar="K", help="users trained together (default 4)")
    g.add_argument("--lease-seconds", type=float, default=600.0,
                   help="how long a worker holds its users between heartbeats; a killed worker's users are "
                   "retrained after it (default 600)")
    gc = GateConfig()
    g = a.add_argument_group("gate")
    g.add_argument("--min-gain-over-base", type=float, default=gc.min_gain_over_base,
                   help=f"share the compressed adapter must lower held-out loss by (default {gc.min_gain_over_base})")
    g.add_argument("--min-gain-kept", type=float, default=gc.min_gain_kept,
                   help=f"share of the fp adapter's gain it must keep (default {gc.min_gain_kept})")
    g = a.add_argument_group("signing")
    g.add_argument("--sign-key", default=None, metavar="KEY.pem", help="sign every blob (`lowra keys new`)")
    g.add_argument("--user-id-from", default=None, choices=("dataset",),
                   help="with --sign-key: each blob is signed for the user id of its dataset")
    _add_base(a, threads=False)  # the fleet sizes threads per worker (--workers/--threads above)
    _add_lora_train(a)
    _add_compress(a, bits_default=DemoConfig().bits)

    a = actions.add_parser("status", help="counts by status, and every failed or gated-out user with its reason")
    a.add_argument("--registry", required=True, metavar="PATH_OR_URL", help="registry database")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a = actions.add_parser("retry", help="queue failed (or the named) users again",
                           description="Queue the named users again (failed, gated-out or retired ones), or every "
                           "failed user when none is named; `lowra fleet train` then trains them.")
    a.add_argument("--registry", required=True, metavar="PATH_OR_URL", help="registry database")
    a.add_argument("users", nargs="*", metavar="USER", help="user ids (default: every failed user)")
    a = actions.add_parser("retire", help="retire every adapter bound to an old base and queue its users",
                           description="Mark every adapter trained against base OLD_FINGERPRINT retired and queue "
                           "its users for retraining on the new base.")
    a.add_argument("--registry", required=True, metavar="PATH_OR_URL", help="registry database")
    a.add_argument("--base", required=True, metavar="OLD_FINGERPRINT", help="the retired base's fingerprint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowra", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="train a LoRA adapter for one user on the frozen base",
        description="Train a LoRA adapter on a user folder (train.jsonl / heldout.jsonl of prompt/response pairs) and "
        "save it as a PEFT-compatible folder plus the input statistics compression uses. Prints held-out loss of "
        "the base and of the adapter.",
    )
    p.add_argument("--user", required=True, help="user dataset folder, e.g. samples/users/terse_notes")
    p.add_argument("--out", required=True, help="adapter folder to write (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--loftq", action="store_true",
                   help="with --quantized-base: start the adapter on the low-bit base's quantization residual (the "
                   "best rank-r approximation of W_fp - W_base, LoftQ's factor step with the shared base held fixed) "
                   "instead of B = 0")
    _add_base(p)
    _add_lora_train(p)

    p = sub.add_parser(
        "compress",
        help="compress a trained adapter into a sub-2-bit lowra blob",
        description="Compress a trained adapter folder into a lowra blob (docs/FORMAT.md) that fits --bits effective "
        "bits per parameter with every byte counted, bound to the base it was trained on. With --user, also "
        "reports held-out loss of base, fp adapter and compressed adapter and stores it in the adapter card. With "
        "--sign-key, writes the blob signed (and with --encrypt-key-file encrypted) for one user (docs/SECURITY.md).",
    )
    p.add_argument("--adapter", required=True, help="adapter folder written by `lowra train` (or PEFT)")
    p.add_argument("--out", required=True, help="blob file to write, e.g. user.lowra")
    p.add_argument("--id", default=None, help="adapter id stored in the blob (default: the adapter folder's name)")
    p.add_argument("--user", default=None, help="user folder to evaluate held-out loss on (optional)")
    p.add_argument("--force", action="store_true", help="replace an existing blob")
    p.add_argument("--sign-key", default=None, metavar="KEY.pem",
                   help="sign the blob with this private key (`lowra keys new`); the claims below then apply, and "
                   "with --quantized-base the signature also names that base's content")
    _add_base(p)
    _add_compress(p, bits_default=CompressConfig().bits)
    _add_claims(p, "signature claims (with --sign-key)")

    p = sub.add_parser(
        "inspect",
        help="show a blob's (or a quantized base's) metadata, effective bits and bit-width histogram",
        description="Verify a blob (format, version, checksum) and print its metadata, effective bits (every byte) "
        "beside code bits, the byte breakdown and the histogram of channel widths; a quantized base file shows its "
        "fingerprint, effective bits, row widths and recovery adapter. A signed file also shows its "
        "key id, every claim and whether it is encrypted (an encrypted blob's content is not shown); with "
        "--trust its signature is verified.",
    )
    p.add_argument("blob", help="blob file (or quantized base file)")
    p.add_argument("--trust", default=None, metavar="KEYS",
                   help="verify the signature with a key folder (its *.pub.pem and revocations.json) or one "
                   ".pub.pem file; exits 2 when it does not verify")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--modules", action="store_true", help="also list every module with its widths")

    p = sub.add_parser(
        "merge",
        help="merge a blob into the base (device runtime) and save the merged model",
        description="Load the base with the torch-free device runtime, verify the blob against it, merge at load "
        "time and write the merged weights as a Hugging Face model folder (config and tokenizer copied).",
    )
    p.add_argument("--blob", required=True, help="blob file")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    _add_base(p)
    _add_device_trust(p)

    p = sub.add_parser(
        "generate",
        help="generate a reply with a user's blob merged on the device runtime",
        description="Merge the blob with the device runtime (verify, decode, W += up @ down) and generate a greedy "
        "reply with the merged weights. Without --blob, the base model answers.",
    )
    p.add_argument("--prompt", required=True, help="the user's message")
    p.add_argument("--blob", default=None, help="blob file (omit for the plain base)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="reply length limit (default 64)")
    _add_base(p)
    _add_device_trust(p)

    p = sub.add_parser(
        "sign",
        help="sign (and optionally encrypt) an adapter blob or a quantized base",
        description="Wrap FILE in the signed envelope (docs/FORMAT.md, Signed files): an Ed25519 signature over "
        "every byte, and claims binding it to its user, device, base and validity. Devices that pin the key "
        "refuse any change to it.",
    )
    p.add_argument("file", metavar="FILE", help="an unsigned adapter blob or quantized base file")
    p.add_argument("--key", required=True, metavar="KEY.pem", help="private key from `lowra keys new`")
    p.add_argument("--out", required=True, help="signed file to write")
    p.add_argument("--quantized-base", default=None, metavar="BASEFILE",
                   help="for an adapter: the quantized base it was compressed against; its content digest (every "
                   "tensor, dense ones too) becomes a claim, so an edited base is refused even with a recomputed "
                   "checksum")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    _add_claims(p, "signature claims")

    _add_keys(sub)

    qc = QuantizeConfig()
    p = sub.add_parser(
        "quantize-base",
        help="quantize the base model's linear layers below 2 bits (LowRA) into one lowra-base file",
        description="Quantize every linear layer of the base (not embeddings/norms/head, kept in float16) with "
        "per-row learned codebooks and 1/2/4-bit rows chosen under --bits effective bits per parameter, every byte "
        "of the file counted except the dense tensors. Prints effective bits, error (MSE / weight variance) and "
        "the width histogram. Format: docs/FORMAT.md (Quantized base).",
    )
    p.add_argument("--out", required=True, help="file to write, e.g. out/base-1.5bit.safetensors")
    p.add_argument("--bits", type=float, default=qc.bits,
                   help=f"budget in effective bits per parameter (default {qc.bits})")
    p.add_argument("--group-size", type=int, default=qc.group_size,
                   help=f"inputs per absmax scale group; 0 = none, one codebook per row (default {qc.group_size}, "
                   "the measured best)")
    p.add_argument("--calibration", default=qc.calibration, metavar="default|DIR|none",
                   help="calibration text: 'default' (the sample users' training examples + CPython's pydoc topics), "
                   "a folder of .txt/.jsonl files, or 'none' for an uncalibrated base (weight error only). "
                   f"Calibrated, rows compete for bits by their expected output error (default {qc.calibration})")
    p.add_argument("--sensitivity", default=qc.sensitivity, choices=SENSITIVITIES,
                   help="per-layer sensitivity weighting the output error: 'fisher' (mean squared loss gradient of "
                   f"the layer's outputs on the calibration text) or 'none' (default {qc.sensitivity})")
    p.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=qc.error_feedback,
                   help="round each layer's columns against the calibration inputs, feeding each rounding error "
                   "forward (GPTQ-style, with the rows' own codebooks); needs calibration (default on)")
    p.add_argument("--codebook-format", default=qc.codebook_format, choices=CODEBOOK_FORMATS,
                   help="how each row's levels are stored: 'int' (integers times a power of two per row, 6 bits a "
                   "level, 8 in 4-bit rows; format version 4: about half the bits of float16 levels, spent on wider "
                   "rows) or 'float16' (version 1, for lowra readers older than version 4) "
                   f"(default {qc.codebook_format})")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    _add_base(p, quantized=False)

    rc = RecoveryConfig()
    p = sub.add_parser(
        "recover",
        help="train a low-bit base's accuracy-recovery adapter (distilled from the fp base) into a new base file",
        description="Train one LoRA adapter on the quantized base so its next-token distribution matches the full-"
        "precision --base (KL divergence on the calibration text), and write base + adapter as a new base file "
        "(format version 3: the adapter compressed like a user's, --recovery-bits; version 2 with float16 factors). "
        "The recovery adapter is then part of the base: train, compress, eval, merge and the "
        "device runtime use it with that file, users' adapters bind to it, and a user swap never touches it. "
        "Prints held-out NLL of the plain and the recovered base. docs/FORMAT.md (Quantized base, versions 2 and 3).",
    )
    p.add_argument("--quantized-base", required=True, metavar="FILE",
                   help="the plain base `lowra quantize-base` wrote from this --base")
    p.add_argument("--out", required=True, help="file to write, e.g. out/base-2bit-recovered.safetensors")
    p.add_argument("--steps", type=int, default=rc.steps, help=f"optimizer steps (default {rc.steps})")
    p.add_argument("--rank", type=int, default=rc.rank, help=f"adapter rank (default {rc.rank})")
    p.add_argument("--alpha", type=float, default=rc.alpha, help=f"LoRA alpha; scaling = alpha/rank (default {rc.alpha})")
    p.add_argument("--lr", type=float, default=rc.learning_rate, help=f"peak learning rate (default {rc.learning_rate})")
    p.add_argument("--batch-size", type=int, default=rc.batch_size,
                   help=f"sequences per step (default {rc.batch_size})")
    p.add_argument("--length", type=int, default=rc.length, help=f"tokens per sequence (default {rc.length})")
    p.add_argument("--sequences", type=int, default=rc.sequences,
                   help=f"distinct calibration windows, cycled through (default {rc.sequences})")
    p.add_argument("--text", default=rc.source, metavar="default|DIR",
                   help="distillation text: 'default' (sample users' training examples + pydoc topics) or a folder "
                   "of .txt/.jsonl files")
    p.add_argument("--seed", type=int, default=rc.seed, help="random seed")
    p.add_argument("--recovery-bits", type=_recovery_bits, default=rc.bits, metavar="BITS|float16",
                   help=f"store the adapter compressed at BITS effective bits per adapter parameter (default "
                   f"{rc.bits:g}: ~0.05 bits per quantized weight on SmolLM2), or 'float16' to keep its factors as "
                   "trained (~0.74 bits per quantized weight)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out NLL of both bases")
    p.add_argument("--user", action="append", default=None, metavar="DIR",
                   help="user folder whose held-out answers the NLL is measured on (repeatable; default: the sample "
                   "users)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    _add_base(p, quantized=False)

    tc = TrainConfig()
    p = sub.add_parser(
        "eval",
        help="held-out NLL of the base, a quantized base, or a user's blob on it",
        description="Mean negative log-likelihood per answer token of the users' held-out examples (default: the "
        "three sample users), computed with exactly the weights the device runtime produces: the base (or the "
        "--quantized-base file, decoded) and, with --blob, the user's adapter merged into it. Reproduces the "
        "base-quality tables in docs/RESULTS.md.",
    )
    p.add_argument("--user", action="append", default=None, metavar="DIR",
                   help="a user folder with heldout.jsonl (repeatable; default: the sample users)")
    p.add_argument("--blob", default=None, help="also evaluate this user's blob merged into the base")
    p.add_argument("--max-len", type=int, default=tc.max_len,
                   help=f"tokens per example, as in training (default {tc.max_len})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    _add_base(p)
    _add_device_trust(p)

    dc = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="the main job: train, compress, ship and merge an adapter for each sample user, with a report",
        description="For each sample user: train a short adapter, compress it to --bits effective bits, write the "
        "blob, load it through the device runtime, merge, and generate a reply to a held-out prompt. Prints one "
        "table and writes report.md, report.json and retained_gain.png under --out.",
    )
    p.add_argument("--out", default=dc.out, help=f"output folder (default {dc.out})")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output folder (the new one replaces it atomically when the run ends)")
    p.add_argument("--users", default=None, help="comma-separated user folders (default: the three sample users)")
    p.add_argument("--steps", type=int, default=dc.steps, help=f"training steps per user (default {dc.steps})")
    p.add_argument(
        "--sweep",
        default=",".join(str(b) for b in dc.sweep),
        help="extra budgets (effective bits) evaluated for the plot (default %(default)s; '' to skip)",
    )
    p.add_argument(
        "--base-bits",
        type=float,
        default=dc.base_bits,
        help=f"quantize the base to this many effective bits per parameter before training (LowRA; cached in "
        f"~/.cache/lowra/quantized after the first run, ~1 min); 0 = train on the full-precision base "
        f"(default {dc.base_bits})",
    )
    p.add_argument("--base-codebook-format", default=dc.base_codebook_format, choices=CODEBOOK_FORMATS,
                   help="how the quantized base stores its codebook levels (see quantize-base --codebook-format; "
                   f"default {dc.base_codebook_format}: at 4 bits float16 levels measure better after a user adapter)")
    _add_base(p, quantized=False)
    _add_compress(p, bits_default=dc.bits)

    _add_fleet(sub)
    return parser
