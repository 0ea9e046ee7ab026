"""ONNX Runtime engine: a model directory written by ``lowra.export.onnx``, per-user adapters, generation.

numpy + onnxruntime + tokenizers only (never torch). Two ways to run a user (``load_user(blob, mode=...)``):

- ``"adapter"``: the user's LoRA factors become an ONNX Runtime adapter (``.onnx_adapter``; a lowra blob is
  converted on load) activated per run with ``RunOptions.add_active_adapter``. The low-bit session is shared by
  every user; switching is a file write + memory map.
- ``"merge"``: the user's delta is added to the *dequantized* base weight (``DeviceRuntime``'s merge: pristine +
  up @ down, never subtract) and a session over ``model_merge.onnx`` is created with those float32 weights
  supplied for its placeholder initializers. Re-quantizing the merged weight would change the user's model, so
  the merged linears are float32; switching costs a session creation.

Every user is checked against the model's base first (the blob's base fingerprint, or an adapter file's model
version) and every adapter parameter against the graph's LoRA inputs.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lowra.device_runtime import formats as fmt
from lowra.device_runtime.errors import BaseMismatchError, BlobContentError, LowraError, UnsupportedFormatError
from lowra.device_runtime.engines.generation import GenerationConfig, Tokenizer, generate

__all__ = [
    "OnnxAdapterError",
    "OnnxEngine",
    "OnnxModelError",
    "OnnxUserInfo",
    "model_version_of",
    "write_onnx_adapter",
]

MANIFEST_NAME = "lowra_onnx.json"
MANIFEST_FORMAT = "lowra-onnx"
MANIFEST_VERSION = 1
WEIGHTS_NAME = "weights.bin"
# Location of the merge graph's float32 weights: never read, because the engine always overrides them.
MERGE_PLACEHOLDER = "supplied-by-the-runtime-at-session-creation.bin"
LORA_DOWN = "lora.{module}.down_t"  # [in, rank]: LoRA A transposed, so the graph multiplies x @ down_t @ up_t
LORA_UP = "lora.{module}.up_t"  # [rank, out]: LoRA B transposed, scaling folded in (as in the blob)
ADAPTER_VERSION = 1
# The newest default-domain opset an onnxruntime release accepts, where measured (1.32 loads opset 28 and refuses
# 30). A manifest above it is refused up front; for releases not listed, ONNX Runtime's own opset error at
# session creation is translated into the same OnnxModelError.
MAX_OPSET_BY_ORT = {(1, 32): 28}
MODES = ("adapter", "merge")


class OnnxModelError(UnsupportedFormatError):
    """The ONNX model directory is missing, malformed, or needs an onnxruntime this device does not have."""


class OnnxAdapterError(BlobContentError):
    """An adapter's parameters do not match the model's LoRA inputs (missing, extra or misshapen)."""


def model_version_of(digests: Mapping[str, str], shapes: Mapping[str, Any]) -> int:
    """The integer an ``.onnx_adapter`` carries as its model version: the first 28 bits of the base fingerprint
    over every linear of the model. AdapterFormat stores a 32-bit int, not a string, so this catches an adapter
    for another model (1 in 2**28 chance of a miss); a lowra blob is always checked on its full fingerprint."""
    fingerprint = fmt.base_fingerprint(dict(digests), {k: tuple(v) for k, v in shapes.items()})
    return int(fingerprint.split(":", 1)[1][:7], 16)


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def _ort_version() -> tuple[int, int]:
    major, minor = _ort().__version__.split(".")[:2]
    return int(major), int(minor)


def max_supported_opset() -> int | None:
    """The newest opset the installed onnxruntime runs, or None when this table does not know the release."""
    return MAX_OPSET_BY_ORT.get(_ort_version())


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """Read and check ``lowra_onnx.json``: format, version, files present, opset runnable here."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise OnnxModelError(
            f"{model_dir} has no {MANIFEST_NAME}; expected a directory written by `python -m lowra.export.onnx`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OnnxModelError(f"{path} is not valid JSON ({exc}); re-export the model") from exc
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("format_version") != MANIFEST_VERSION:
        raise OnnxModelError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}; this runtime "
            f"reads {MANIFEST_FORMAT!r} version {MANIFEST_VERSION}. Re-export the model or upgrade lowra"
        )
    opset = int(manifest.get("opset", 0))
    supported = max_supported_opset()
    if supported is not None and opset > supported:
        raise OnnxModelError(
            f"{model_dir} needs ONNX opset {opset} but the installed onnxruntime {_ort().__version__} runs opsets "
            f"up to {supported}; install onnxruntime>=1.32 or re-export with a lower opset"
        )
    for key in ("lowbit", "merge"):
        name = manifest.get("graphs", {}).get(key)
        if name and not (model_dir / name).is_file():
            raise OnnxModelError(f"{model_dir}: the manifest names {name} but the file is missing")
    return manifest


def _check_factor_pairs(params: Mapping[str, tuple[int, ...]], manifest: Mapping[str, Any], what: str) -> None:
    """Adapter parameter names/shapes against the graph's LoRA inputs: no extra, no half pairs, ranks agree."""
    lora = manifest["lora_inputs"]
    by_name = {}
    for module, spec in lora.items():
        by_name[spec["down"]] = (module, "down")
        by_name[spec["up"]] = (module, "up")
    extra = sorted(n for n in params if n not in by_name)
    if extra:
        raise OnnxAdapterError(
            f"{what}: parameters {extra[:3]}{'...' if len(extra) > 3 else ''} are not LoRA inputs of this model "
            f"(expected names like {next(iter(by_name), '?')!r}); the adapter was made for another model"
        )
    modules = {by_name[n][0] for n in params}
    for module in sorted(modules):
        spec = lora[module]
        missing = [spec[s] for s in ("down", "up") if spec[s] not in params]
        if missing:
            raise OnnxAdapterError(
                f"{what}: module {module!r} has its {'down' if spec['down'] in params else 'up'} factor only; "
                f"missing parameter {missing[0]!r} (an adapter sets both factors of every module it adapts)"
            )
        down, up = tuple(params[spec["down"]]), tuple(params[spec["up"]])
        if len(down) != 2 or len(up) != 2 or down[0] != spec["in"] or up[1] != spec["out"] or down[1] != up[0]:
            raise OnnxAdapterError(
                f"{what}: module {module!r} factors are {list(down)} and {list(up)}; expected [{spec['in']}, r] and "
                f"[r, {spec['out']}] with the same rank r"
            )


def _check_blob_base(blob: fmt.Blob, manifest: Mapping[str, Any], model_dir: Path) -> None:
    digests, shapes = manifest["base"]["digests"], manifest["base"]["shapes"]
    names = [m.name for m in blob.modules]
    unknown = [n for n in names if n not in digests]
    if unknown:
        raise BaseMismatchError(
            f"adapter {blob.adapter_id!r} targets module {unknown[0]!r}, which the model at {model_dir} does not have; "
            "it was trained for another base model"
        )
    for m in blob.modules:
        if list(shapes[m.name]) != [m.out_features, m.in_features]:
            raise BlobContentError(
                f"adapter module {m.name} is [{m.out_features}, {m.in_features}] but the model's weight is "
                f"{shapes[m.name]}; the adapter was made for another model"
            )
    expected = fmt.base_fingerprint({n: digests[n] for n in names}, {n: tuple(shapes[n]) for n in names})
    if blob.base_fingerprint != expected:
        raise BaseMismatchError(
            f"adapter {blob.adapter_id!r} was trained against base {blob.base_fingerprint[:23]}..., but the ONNX model "
            f"at {model_dir} is {expected[:23]}...; export the base it was trained on or retrain the adapter"
        )


def blob_adapter_parameters(blob: fmt.Blob, manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The blob's factors as the graph's LoRA inputs (components dropped to width 0 are left out)."""
    params: dict[str, np.ndarray] = {}
    for module, (up, down) in blob.all_factors(drop_empty=True).items():
        if up.shape[1] == 0:
            continue  # nothing kept: the zero-rank default is exact
        spec = manifest["lora_inputs"].get(module)
        if spec is None:
            raise BaseMismatchError(f"adapter module {module!r} is not a low-bit linear of this ONNX model")
        params[spec["down"]] = np.ascontiguousarray(down.T, dtype=np.float32)
        params[spec["up"]] = np.ascontiguousarray(up.T, dtype=np.float32)
    return params


def write_onnx_adapter(model_dir: str | Path, blob: str | Path | fmt.Blob, out_path: str | Path) -> Path:
    """Convert a lowra blob into an ``.onnx_adapter`` for the model at ``model_dir`` (checked against its base).

    The adapter's model version binds it to this base (:func:`model_version_of`). Written atomically.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    manifest = read_manifest(model_dir)
    parsed = blob if isinstance(blob, fmt.Blob) else fmt.read_blob(blob)
    _check_blob_base(parsed, manifest, model_dir)
    params = blob_adapter_parameters(parsed, manifest)
    _export_adapter(params, int(manifest["model_version"]), out_path)
    return out_path


def _export_adapter(params: Mapping[str, np.ndarray], model_version: int, out_path: Path) -> None:
    ort = _ort()
    fmt_ = ort.AdapterFormat()
    fmt_.set_adapter_version(ADAPTER_VERSION)
    fmt_.set_model_version(model_version)
    fmt_.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    fmt_.export_adapter(str(tmp))
    tmp.replace(out_path)


# ------------------------------------------------------------------------------------------------ base decode
def _rebuild_quantized(data: np.ndarray, spec: Mapping[str, Any]) -> Any:
    """A module's QuantizedWeight from the export's per-width tensors in weights.bin (merge mode needs the
    decoded base; the numpy reference decode in QuantizedWeight is the one place that decodes)."""
    from lowra.device_runtime.formats.quantized_weight import QuantizedWeight

    def tensor(entry: Mapping[str, Any], dtype: str) -> np.ndarray:
        raw = data[entry["offset"] : entry["offset"] + entry["length"]]
        return raw.view(dtype)

    out_f, in_f, group = int(spec["out"]), int(spec["in"]), int(spec["group_size"])
    widths = np.zeros(out_f, dtype=np.uint8)
    rows_of = {}
    for g in spec["groups"]:
        rows = tensor(g["rows"], "<i4").astype(np.int64)
        widths[rows] = g["width"]
        rows_of[g["width"]] = rows
    if np.any(widths == 0):
        raise OnnxModelError("the manifest's row groups do not cover every row (exported with MatMulNBits groups?); "
                             "merge mode needs a model exported with --matmulnbits never")
    n_groups = -(-in_f // group) if group else 0
    qw = QuantizedWeight(out_f, in_f, group, widths, np.zeros(0, np.uint8), np.zeros(0, np.float16),
                         np.zeros((out_f, n_groups), np.float16))
    codes = np.zeros(int(qw.row_code_offsets[-1]), dtype=np.uint8)
    levels = np.zeros(int(qw.row_level_offsets[-1]), dtype=np.float16)
    for g in spec["groups"]:
        w, rows = int(g["width"]), rows_of[g["width"]]
        nbytes = fmt.packed_bytes(in_f, w)
        raw = tensor(g["codes"], "u1")
        # UINT2/UINT4 pack the flat [rows, in] tensor; rows are re-packed on byte boundaries as the layer wants
        per_row = raw.reshape(rows.size, nbytes) if w == 1 else fmt.pack_codes(
            fmt.unpack_codes(raw[None, :], w, rows.size * in_f).reshape(rows.size, in_f), w)
        codes[qw.row_code_offsets[rows][:, None] + np.arange(nbytes)[None, :]] = per_row
        lv = tensor(g["codebooks"], "<f2").reshape(rows.size, 1 << w)
        levels[qw.row_level_offsets[rows][:, None] + np.arange(1 << w)[None, :]] = lv
        if group:
            qw.scales[rows] = tensor(g["scales"], "<f2").reshape(rows.size, n_groups)
    qw.codes, qw.codebooks = codes, levels
    qw.validate("ONNX model's packed layer")
    return qw


def _release_freed_heap() -> None:
    """Give the heap ONNX Runtime freed while folding the decode back to the OS (glibc only; a no-op elsewhere).

    Folding the low-bit decode creates int64 code and float16 level intermediates for every weight; they are
    freed, but glibc keeps the pages: the 1.5-bit SmolLM2 session measured 2.75 GB resident before and 0.70 GB
    after ``malloc_trim`` (an fp32 ONNX of the same model: 0.71 GB).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


# ------------------------------------------------------------------------------------------------ engine
@dataclass(frozen=True)
class OnnxUserInfo:
    adapter_id: str
    mode: str
    modules: tuple[str, ...]
    switch_ms: float  # load_user wall time: read + verify + convert (+ merge + session creation)


class OnnxEngine:
    """One ONNX model directory, at most one active user. Batch size 1; the KV cache lives in numpy arrays.

    ``lowbit_decode``: "load" lets ONNX Runtime constant-fold the low-bit decode at session creation (the codes
    become float32 weights in RAM, decode is then as fast as an fp32 model); "per_run" keeps only the packed
    codes in RAM and decodes inside every run (constant folding disabled).
    """

    def __init__(self, model_dir: str | Path, *, threads: int | None = None, lowbit_decode: str = "load") -> None:
        if lowbit_decode not in ("load", "per_run"):
            raise LowraError(f"lowbit_decode={lowbit_decode!r}; expected 'load' or 'per_run'")
        self.model_dir = Path(model_dir)
        if not self.model_dir.is_dir():
            raise OnnxModelError(f"ONNX model directory {self.model_dir} does not exist")
        self.manifest = read_manifest(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        self.threads = threads
        self.lowbit_decode = lowbit_decode
        model = self.manifest["model"]
        self.n_layers, self.kv_heads, self.head_dim = int(model["layers"]), int(model["kv_heads"]), int(model["head_dim"])
        self.max_positions = int(model["max_positions"])
        self._base_session = self._session(self.model_dir / self.manifest["graphs"]["lowbit"])
        self._session_now = self._base_session
        self._run_options: Any = None
        self._adapter: Any = None
        self._runtime: Any = None  # DeviceRuntime over the decoded base, built on the first merge
        self._merged_values: list[Any] | None = None  # the OrtValues a merged session reads
        self._tmp = tempfile.TemporaryDirectory(prefix="lowra-onnx-")
        self.user: OnnxUserInfo | None = None
        self._cache: list[np.ndarray] = []

    # -- sessions ----------------------------------------------------------------------------------------
    def _options(self) -> Any:
        ort = _ort()
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def _session(self, path: Path, options: Any = None) -> Any:
        ort = _ort()
        disabled = ["ConstantFolding"] if self.lowbit_decode == "per_run" else None
        try:
            session = ort.InferenceSession(str(path), options or self._options(), providers=["CPUExecutionProvider"],
                                           disabled_optimizers=disabled)
            _release_freed_heap()
            return session
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types, all Exception
            text = str(exc)
            if "opset" in text.lower() or "domain_version" in text:
                raise OnnxModelError(
                    f"{path}: the installed onnxruntime {ort.__version__} cannot run this model's opset ({text.strip()[:300]}); "
                    "install onnxruntime>=1.32 or re-export with a lower opset"
                ) from exc
            raise OnnxModelError(f"{path}: onnxruntime could not load the model: {text.strip()[:500]}") from exc

    # -- users -------------------------------------------------------------------------------------------
    def load_user(self, blob_path: str | Path, mode: str = "adapter") -> OnnxUserInfo:
        """Verify a user's blob (or a ``.onnx_adapter`` in adapter mode) and make it the active user."""
        if mode not in MODES:
            raise LowraError(f"mode={mode!r}; expected one of {MODES}")
        t0 = time.perf_counter()
        path = Path(blob_path)
        if not path.is_file():
            raise FileNotFoundError(f"user file {path} does not exist (expected a lowra blob or a .onnx_adapter)")
        if path.suffix == ".onnx_adapter":
            if mode != "adapter":
                raise LowraError(f"{path} is an .onnx_adapter: it can only be loaded with mode='adapter'; pass the "
                                 "user's lowra blob to merge it")
            adapter_id, modules = self._activate_adapter_file(path)
        else:
            blob = fmt.read_blob(path)
            _check_blob_base(blob, self.manifest, self.model_dir)
            adapter_id = blob.adapter_id
            if mode == "adapter":
                target = Path(self._tmp.name) / f"user-{time.monotonic_ns()}.onnx_adapter"
                params = blob_adapter_parameters(blob, self.manifest)
                _export_adapter(params, int(self.manifest["model_version"]), target)
                try:
                    modules = self._activate_adapter_file(target)[1]
                finally:
                    # LoraAdapter memory-maps the file; on POSIX the mapping outlives the name, so no copy piles up.
                    # Where a mapped file cannot be removed (Windows) it stays in the temp folder until close().
                    try:
                        target.unlink(missing_ok=True)
                    except OSError:
                        pass
            else:
                modules = self._merge(path)
        self.user = OnnxUserInfo(adapter_id, mode, modules, (time.perf_counter() - t0) * 1e3)
        return self.user

    def _activate_adapter_file(self, path: Path) -> tuple[str, tuple[str, ...]]:
        ort = _ort()
        try:
            fmt_ = ort.AdapterFormat.read_adapter(str(path))
        except Exception as exc:
            raise UnsupportedFormatError(f"{path} is not an onnxruntime adapter file ({str(exc)[:200]})") from exc
        if fmt_.get_model_version() != int(self.manifest["model_version"]):
            raise BaseMismatchError(
                f"{path} was made for model version {fmt_.get_model_version()}, but the ONNX model at {self.model_dir} "
                f"is version {self.manifest['model_version']} (a hash of its base); convert the user's blob for this model"
            )
        params = {name: tuple(value.shape()) for name, value in fmt_.get_parameters().items()}
        _check_factor_pairs(params, self.manifest, str(path))
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        self._drop_user()
        self._adapter, self._run_options = adapter, run_options
        by_down = {spec["down"]: m for m, spec in self.manifest["lora_inputs"].items()}
        return path.stem, tuple(sorted(by_down[n] for n in params if n in by_down))

    def _decoded_base(self) -> Any:
        from lowra.device_runtime.runtime import BaseWeights, DeviceRuntime

        if self._runtime is None:
            data = np.memmap(self.model_dir / self.manifest["weights"], dtype=np.uint8, mode="r")
            tensors = {f"{m}.weight": _rebuild_quantized(data, spec).dequantize()
                       for m, spec in self.manifest["quantized_modules"].items()}
            base = BaseWeights.from_arrays(tensors, self.model_dir)
            for name, arr in tensors.items():
                module = name[: -len(".weight")]
                if base.digest(name) != self.manifest["base"]["digests"][module]:
                    raise OnnxModelError(
                        f"{self.model_dir}/{self.manifest['weights']}: module {module} decodes to other weights than "
                        "the export recorded; the file is corrupted. Re-export the model"
                    )
            self._runtime = DeviceRuntime(base, precompute_digests=False)
        return self._runtime

    def _merge(self, path: Path) -> tuple[str, ...]:
        ort = _ort()
        if "merge" not in self.manifest["graphs"]:
            raise OnnxModelError(f"{self.model_dir} has no merge graph (exported without a low-bit base)")
        runtime = self._decoded_base()
        self._drop_user()
        info = runtime.load_user(path)  # verifies again against the decoded base, then merges (one merge code)
        options = self._options()
        names = list(self.manifest["merge_weights"])
        # ORT reads the weights from these numpy buffers; DeviceRuntime rewrites its merged buffers in place on
        # the next user, which is why the previous merged session is dropped before the next merge (above).
        values = [ort.OrtValue.ortvalue_from_numpy(np.asarray(runtime.weight(n))) for n in names]
        options.add_external_initializers(names, values)
        self._merged_values = values
        self._session_now = self._session(self.model_dir / self.manifest["graphs"]["merge"], options)
        return info.modules

    def _drop_user(self) -> None:
        self._adapter = self._run_options = None
        if self._session_now is not self._base_session:
            self._session_now = self._base_session
        self._merged_values = None
        self.user = None

    def unload_user(self) -> None:
        """Back to the base model: the shared low-bit session with no adapter active."""
        self._drop_user()
        if self._runtime is not None:
            self._runtime.unload_user()

    # -- running -----------------------------------------------------------------------------------------
    def _run(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64)}
        for i in range(self.n_layers):
            feeds[f"past_key.{i}"] = past[2 * i]
            feeds[f"past_value.{i}"] = past[2 * i + 1]
        out = self._session_now.run(None, feeds, self._run_options)
        return out[0], out[1:]

    def _empty_cache(self) -> list[np.ndarray]:
        empty = np.zeros((self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * self.n_layers)

    def logits(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Logits [seq, vocab] of a whole sequence from an empty cache (for verification)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size > self.max_positions:
            raise LowraError(f"{ids.size} tokens exceed the model's {self.max_positions} positions")
        return self._run(ids, self._empty_cache())[0]

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        logits, self._cache = self._run(np.asarray(ids, dtype=np.int64).reshape(-1), self._empty_cache())
        return logits[-1]

    def decode(self, token: int, position: int) -> np.ndarray:
        if position != self._cache[0].shape[1]:
            raise LowraError(f"decode at position {position} but the cache holds {self._cache[0].shape[1]} positions")
        logits, self._cache = self._run(np.array([token], dtype=np.int64), self._cache)
        return logits[-1]

    def generate_ids(self, prompt_ids: np.ndarray, config: GenerationConfig = GenerationConfig()) -> list[int]:
        return generate(self.prefill, self.decode, prompt_ids, config, self.tokenizer.eos_ids, self.max_positions)

    def generate(self, prompt: str, config: GenerationConfig = GenerationConfig(), chat: bool = False) -> str:
        """Text after ``prompt`` (``chat=True`` wraps it in the ChatML turn SmolLM2-Instruct expects)."""
        tok = self.tokenizer
        return tok.decode(self.generate_ids(tok.encode(tok.chat_prompt(prompt) if chat else prompt), config))

    def close(self) -> None:
        """Release the sessions, the adapter and the temp folder of converted adapters."""
        self._drop_user()
        self._base_session = self._session_now = None
        self._runtime = None
        self._tmp.cleanup()

