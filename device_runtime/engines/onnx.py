"""ONNX Runtime engine: a model directory written by ``lowra.export.onnx``, per-user adapters, generation.

numpy + onnxruntime + tokenizers only (never torch). The directory's format is
:mod:`lowra.device_runtime.formats.onnx_manifest`; this module holds the runtime side (opset support, sessions).
Two ways to run a user (``load_user(blob, mode=...)``, :class:`~lowra.device_runtime.engines.base.Engine`):

- ``"side"``: the user's LoRA factors become an ONNX Runtime adapter (``.onnx_adapter``; a lowra blob is
  converted on load) activated per run with ``RunOptions.add_active_adapter``: the graph's unmerged side branch
  ``x @ down_t @ up_t``. The low-bit session is shared by every user; switching is a file write + memory map.
- ``"merge"``: the user's delta is added to the *dequantized* base weight (``DeviceRuntime``'s merge: pristine +
  up @ down, never subtract) and a session over ``model_merge.onnx`` is created with those float32 weights
  supplied for its placeholder initializers. Re-quantizing the merged weight would change the user's model, so
  the merged linears are float32; switching costs a session creation.

Every user is checked against the model's base first (the blob's base fingerprint, or an adapter file's model
version) and every adapter parameter against the graph's LoRA inputs.
"""
from __future__ import annotations

import shutil
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from lowra.device_runtime import formats as fmt
from lowra.device_runtime._files import scratch_dir
from lowra.device_runtime.engines.base import UserInfo, check_mode, serialized
from lowra.device_runtime.trust import TrustPolicy, check_base_content, make_policy, open_blob
from lowra.device_runtime.engines.generation import GenerationConfig, Tokenizer, generate
from lowra.device_runtime.errors import (
    BaseMismatchError,
    LowraError,
    OnnxAdapterError,
    OnnxModelError,
    UnsupportedFormatError,
)
from lowra.device_runtime.formats import onnx_manifest
from lowra.device_runtime.formats.quantized_base import recovered_weight
from lowra.device_runtime.formats.constants import USER_MODES
from lowra.device_runtime.formats.manifest import prompt_template_of

__all__ = ["OnnxEngine", "max_supported_opset", "read_runnable_manifest"]

# The newest default-domain opset an onnxruntime release accepts, where measured (1.32 loads opset 28 and refuses
# 30). A manifest above it is refused up front; for releases not listed, ONNX Runtime's own opset error at
# session creation is translated into the same OnnxModelError.
MAX_OPSET_BY_ORT = {(1, 32): 28}
ADAPTER_SUFFIX = ".onnx_adapter"


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def _ort_version() -> tuple[int, int]:
    major, minor = _ort().__version__.split(".")[:2]
    return int(major), int(minor)


def max_supported_opset() -> int | None:
    """The newest opset the installed onnxruntime runs, or None when this table does not know the release."""
    return MAX_OPSET_BY_ORT.get(_ort_version())


def read_runnable_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The directory's manifest (format, version, files: :func:`onnx_manifest.read_manifest`), refused when its
    opset is newer than the installed onnxruntime runs."""
    manifest = onnx_manifest.read_manifest(model_dir)
    opset = int(manifest.get("opset", 0))
    supported = max_supported_opset()
    if supported is not None and opset > supported:
        raise OnnxModelError(
            f"{model_dir} needs ONNX opset {opset} but the installed onnxruntime {_ort().__version__} runs opsets "
            f"up to {supported}; install onnxruntime>=1.32 or re-export with a lower opset"
        )
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


def check_blob_binding(blob: fmt.Blob, manifest: Mapping[str, Any], model_dir: Path) -> None:
    """A blob against the base the manifest records (:func:`~lowra.device_runtime.formats.check_base_binding`)."""
    base = manifest["base"]
    fmt.check_base_binding(blob, base["digests"], base["shapes"], f"the ONNX model at {model_dir}")


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
class OnnxEngine:
    """One ONNX model directory, at most one active user. Batch size 1; the KV cache lives in numpy arrays.

    ``lowbit_decode``: "load" lets ONNX Runtime constant-fold the low-bit decode at session creation (the codes
    become float32 weights in RAM, decode is then as fast as an fp32 model); "per_run" keeps only the packed
    codes in RAM and decodes inside every run (constant folding disabled).

    Thread-safe by serialization: calls from several threads wait for each other (see ``engines.base.serialized``).
    """

    def __init__(self, model_dir: str | Path, *, threads: int | None = None, lowbit_decode: str = "load",
                 trusted_keys: Iterable[str | Path | bytes] | None = None, trust: TrustPolicy | None = None) -> None:
        self._lock = threading.RLock()
        self.trust = make_policy(trust, trusted_keys)
        if lowbit_decode not in ("load", "per_run"):
            raise LowraError(f"lowbit_decode={lowbit_decode!r}; expected 'load' or 'per_run'")
        self.model_dir = Path(model_dir)
        self.manifest = read_runnable_manifest(self.model_dir)
        template = prompt_template_of(self.manifest, str(self.model_dir / onnx_manifest.MANIFEST_NAME), OnnxModelError)
        self.tokenizer = Tokenizer(self.model_dir, prompt_template=template)
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
        self._tmp = scratch_dir("onnx")
        weakref.finalize(self, shutil.rmtree, self._tmp, True)  # also when the engine is dropped without close()
        self.user: UserInfo | None = None
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
    @serialized
    def load_user(self, blob: str | Path | bytes, mode: str = "side", *, user_id: str | None = None,
                  decryption_key: bytes | None = None) -> UserInfo:
        """Verify a user's blob (path or bytes; or a ``.onnx_adapter`` path in side mode) and make it the
        active user."""
        check_mode(mode, USER_MODES, "OnnxEngine")
        t0 = time.perf_counter()
        if not isinstance(blob, (bytes, bytearray)) and Path(blob).suffix == ADAPTER_SUFFIX:
            path = Path(blob)
            if mode != "side":
                raise LowraError(f"{path} is an {ADAPTER_SUFFIX}: it can only be loaded with mode='side'; pass the "
                                 "user's lowra blob to merge it")
            if not path.is_file():
                raise FileNotFoundError(f"adapter file {path} does not exist")
            self.trust.check_unsigned(f"ONNX adapter file {path}")  # an .onnx_adapter carries no signature
            t1 = time.perf_counter()
            modules, n_params = self._activate_adapter_file(path)
            adapter_id, file_bytes = path.stem, path.stat().st_size
            effective_bits = 8.0 * file_bytes / max(n_params, 1)
        else:
            parsed = open_blob(blob, self.trust, user_id=user_id, decryption_key=decryption_key)
            check_blob_binding(parsed, self.manifest, self.model_dir)
            check_base_content(parsed, None, f"the ONNX model at {self.model_dir}")
            t1 = time.perf_counter()
            modules = self._convert_and_activate(parsed) if mode == "side" else self._merge(parsed)
            adapter_id, file_bytes = parsed.adapter_id, parsed.file_bytes
            effective_bits = float(parsed.bits_report()["effective_bits"])
        t2 = time.perf_counter()
        self.user = UserInfo(adapter_id, mode, modules, file_bytes, effective_bits, (t2 - t0) * 1e3, (t2 - t1) * 1e3)
        return self.user

    def _convert_and_activate(self, blob: fmt.Blob) -> tuple[str, ...]:
        target = self._tmp / f"user-{time.monotonic_ns()}{ADAPTER_SUFFIX}"
        params = onnx_manifest.blob_adapter_parameters(blob, self.manifest)
        onnx_manifest.write_adapter_file(params, int(self.manifest["model_version"]), target)
        try:
            return self._activate_adapter_file(target)[0]
        finally:
            # LoraAdapter memory-maps the file; on POSIX the mapping outlives the name, so no copy piles up.
            # Where a mapped file cannot be removed (Windows) it stays in the temp folder until close().
            try:
                target.unlink(missing_ok=True)
            except OSError:
                pass

    def _activate_adapter_file(self, path: Path) -> tuple[tuple[str, ...], int]:
        """Check and activate an ``.onnx_adapter``; returns the modules it adapts and its parameter count."""
        ort = _ort()
        try:
            adapter_file = ort.AdapterFormat.read_adapter(str(path))
        except Exception as exc:
            raise UnsupportedFormatError(f"{path} is not an onnxruntime adapter file ({str(exc)[:200]})") from exc
        if adapter_file.get_model_version() != int(self.manifest["model_version"]):
            raise BaseMismatchError(
                f"{path} was made for model version {adapter_file.get_model_version()}, but the ONNX model at "
                f"{self.model_dir} is version {self.manifest['model_version']} (a hash of its base); convert the "
                "user's blob for this model"
            )
        params = {name: tuple(value.shape()) for name, value in adapter_file.get_parameters().items()}
        _check_factor_pairs(params, self.manifest, str(path))
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        self._drop_user()
        self._adapter, self._run_options = adapter, run_options
        by_down = {spec["down"]: m for m, spec in self.manifest["lora_inputs"].items()}
        modules = tuple(sorted(by_down[n] for n in params if n in by_down))
        return modules, int(sum(np.prod(shape) for shape in params.values()))

    def _decoded_base(self) -> Any:
        from lowra.device_runtime.runtime import BaseWeights, DeviceRuntime

        if self._runtime is None:
            where = f"{self.model_dir / self.manifest['weights']}"
            data = np.memmap(self.model_dir / self.manifest["weights"], dtype=np.uint8, mode="r")
            tensors = {f"{m}.weight": onnx_manifest.quantized_weight_from_groups(data, spec, where).dequantize()
                       for m, spec in self.manifest["quantized_modules"].items()}
            if "recovery" in self.manifest:  # a recovered base: its adapter is part of every decoded weight
                recovery = self.manifest["recovery"]
                for m, (a, b) in onnx_manifest.recovery_factors(data, recovery, where).items():
                    tensors[f"{m}.weight"] = recovered_weight(tensors[f"{m}.weight"], a, b, float(recovery["scaling"]))
            base = BaseWeights.from_arrays(tensors, self.model_dir)
            for name in tensors:
                module = name[: -len(".weight")]
                if base.digest(name) != self.manifest["base"]["digests"][module]:
                    raise OnnxModelError(
                        f"{where}: module {module} decodes to other weights than the export recorded; the file is "
                        "corrupted. Re-export the model"
                    )
            self._runtime = DeviceRuntime(base, precompute_digests=False)
        return self._runtime

    def _merge(self, blob: fmt.Blob) -> tuple[str, ...]:
        ort = _ort()
        if "merge" not in self.manifest["graphs"]:
            raise OnnxModelError(f"{self.model_dir} has no merge graph (exported without a low-bit base)")
        runtime = self._decoded_base()
        self._drop_user()
        info = runtime.load_user(blob)  # checks again against the decoded base, then merges (one merge code)
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

    @serialized
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

    @serialized
    def logits(self, ids: np.ndarray | list[int]) -> np.ndarray:
        """Logits [seq, vocab] of a whole sequence from an empty cache (for verification)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size > self.max_positions:
            raise LowraError(f"{ids.size} tokens exceed the model's {self.max_positions} positions")
        return self._run(ids, self._empty_cache())[0]

    @serialized
    def prefill(self, ids: np.ndarray) -> np.ndarray:
        logits, self._cache = self._run(np.asarray(ids, dtype=np.int64).reshape(-1), self._empty_cache())
        return logits[-1]

    @serialized
    def decode(self, token: int, position: int) -> np.ndarray:
        if position != self._cache[0].shape[1]:
            raise LowraError(f"decode at position {position} but the cache holds {self._cache[0].shape[1]} positions")
        logits, self._cache = self._run(np.array([token], dtype=np.int64), self._cache)
        return logits[-1]

    @serialized
    def generate_ids(self, prompt_ids: np.ndarray, config: GenerationConfig = GenerationConfig()) -> list[int]:
        return generate(self.prefill, self.decode, prompt_ids, config, self.tokenizer.eos_ids, self.max_positions)

    @serialized
    def generate(self, prompt: str, config: GenerationConfig = GenerationConfig(), chat: bool = False) -> str:
        """Text after ``prompt`` (``chat=True`` wraps it in the export's prompt template first)."""
        tok = self.tokenizer
        return tok.decode(self.generate_ids(tok.encode(tok.chat_prompt(prompt) if chat else prompt), config))

    @serialized
    def close(self) -> None:
        """Release the sessions, the adapter and the temp folder of converted adapters."""
        self._drop_user()
        self._base_session = self._session_now = None
        self._runtime = None
        shutil.rmtree(self._tmp, ignore_errors=True)
