"""ExecuTorch export of a low-bit lowra base: one shared ``.pte`` per user mode plus per-user ``.ptd`` data.

What one call of :func:`export_executorch` writes into a model folder (read by
:class:`lowra.device_runtime.engines.executorch.ExecutorchEngine`; the layout is in docs/FORMAT.md):

- ``side.pte`` + ``side.ptd``: every linear stays packed (custom op ``lowra::lowbit_linear`` or the core-ATen
  decode), and each adaptable linear gets a LoRA side branch ``x @ down^T @ up^T`` whose two factors are named
  data in the ``.ptd``. Switching users rewrites those factors only (kilobytes to megabytes).
- ``merge.pte`` + ``merge.ptd``: the adaptable linears are dense float32 weights held in the ``.ptd`` (the
  template holds the decoded base); merge-at-load writes ``base + up @ down`` there. Linears nobody adapts
  stay packed in the ``.pte``.
- Both programs hold the token embedding and the output head (one tensor when they are tied) in float16 with the
  custom ops (``embeddings``: a base file's dense tensors are float16 already, so this is exact for a model loaded
  from one); the head runs ``lowra::f16_linear``, which converts in registers. That is half the bytes of float32,
  and the largest tensor of a small model (SmolLM2: 49,152 x 576). ``embeddings="int8"`` halves it again (8-bit
  rows, ``lowra::q8_embedding`` / ``lowra::q8_linear``), at the price of rounding the values.
- With the custom ops, each layer's attention is one ``lowra::attention`` call that reads the KV cache in place
  (:mod:`.attention`; ``fused_attention``), and each RMSNorm one ``lowra::rms_norm`` call (:mod:`.norm`;
  ``fused_norm``); the reinplace pass writes each step's keys and values into the cache buffers in place.
- ``manifest.json``: sizes, sha256 of every file, per-module base digests (so a blob's base fingerprint is
  checked without decoding the base), and where each named tensor lives in each ``.ptd`` template.
- ``liblowra_executorch_kernels.so`` (custom ops only): the native kernels, copied from the build cache.
- ``tokenizer.json`` when a tokenizer is given.

The program is transformers' static-cache decoder (``TorchExportableModuleWithStaticCache``): inputs
``input_ids [1, n]`` and ``cache_position [n]`` (n dynamic, 1..max_seq_len), output the last position's logits
``[1, 1, vocab]`` (``logits="last"``, the default) or every position's ``[1, n, vocab]`` (``"all"``); position 0
resets the cache, so prefill is one call and each decode step is another.

Python's ``Runtime.load_program`` takes one ``.ptd``, so the device composes a user's single file from the
template: the ``.ptd`` is a flatbuffer header plus raw tensor segments, and the manifest records each tensor's
byte range, so the numpy-only device copies the template and overwrites those ranges (no flatc on the device).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lowra.device_runtime import formats as fmt
from lowra.device_runtime._files import atomic_write_bytes, file_sha256
from lowra.device_runtime.errors import ConfigError
from lowra.device_runtime.executorch_native import register_kernel_library
from lowra.device_runtime.formats.constants import CODED_WIDTHS, USER_MODES
from lowra.device_runtime.formats.executorch_manifest import (
    EMBEDDING_DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOGITS_MODES,
    MANIFEST_FILE,
    PACKED_ROLES,
    SIDE_FACTORS,
)
from lowra.device_runtime.formats.int8_rows import Q8_BLOCK, quantize_q8
from lowra.device_runtime.formats.manifest import PROMPT_TEMPLATE_KEY
from lowra.device_runtime.formats.quantized_weight import kernel_blocked_codes, kernel_layout_codes
from lowra.export.executorch.attention import use_lowra_attention
from lowra.export.executorch.norm import use_lowra_rms_norm
from lowra.export.executorch.pointwise import lowra_rope, use_lowra_gated_mlp
from lowra.export.executorch.kernels import LIBRARY_NAME, build_kernel_library
from lowra.export.tokenizer import save_tokenizer
from lowra.sdk.modules import linear_module_names
from lowra.sdk.quant.lowbit_linear import LowBitLinear, lowbit_layers, with_recovery


OPS = ("custom", "aten")
MODES = USER_MODES
# How the custom ops' programs store the codes (docs/FORMAT.md, ExecuTorch model folder), by layout name.
KERNEL_LAYOUTS = {"blocked": kernel_blocked_codes, "planar": kernel_layout_codes}


@dataclass
class ExecutorchExportConfig:
    ops: str = "custom"  # "custom": lowra::lowbit_linear + native kernels; "aten": core-ATen decode (stock runtime)
    modes: Sequence[str] = ("side", "merge")  # user-data programs to write (see the module docstring)
    max_seq_len: int = 128  # static KV-cache length = prompt + generated tokens
    rank: int = 8  # side-branch rank: blobs with up to this many kept components per module load
    targets: str | list[str] = "all-linear"  # linears a user may adapt (LoRA targets)
    # Delegate what XNNPACK takes (dense linears, attention); the low-bit op stays native. Off by default: it
    # needs a second export to keep user data external and measured ~2.5x the lowering time (tiny model, 2 cores),
    # and the portable + optimized kernels already compute the same logits (docs/RESULTS.md, ExecuTorch).
    xnnpack: bool = False
    kernel_library: str | None = None  # a prebuilt .so; None builds (or reuses) the cached one
    # Token embedding + output head: "float16" (custom ops only; values rounded to float16), "float32", "int8" (custom
    # ops only: 8-bit rows with a float16 scale per 32 values, formats.int8_rows; half float16's bytes, a decode step
    # reads the head once, values change: measured in docs/RESULTS.md), or "auto": float16 with the custom ops when
    # every value is a float16 already (a model loaded from a base file), else float32 with a warning.
    embeddings: str = "auto"
    # Custom ops only: attention as one lowra::attention call per layer reading the KV cache in place (see
    # export/executorch/attention.py) instead of transformers' sdpa lowered to copies, matmuls and a softmax.
    fused_attention: bool = True
    # Custom ops only: each RMSNorm (Llama-style: Llama, Qwen2, Mistral, SmolLM) as one lowra::rms_norm call (see
    # export/executorch/norm.py) instead of six portable kernels.
    fused_norm: bool = True
    # Custom ops only: how the side program holds the users' side-branch factors: "packed4" (the default: the blob's
    # codes, each channel in a 4-bit slot with its float16 levels, lowra::lowbit_linear_blocked_lora4; about an
    # eighth of float32's bytes), "float16" (the decoded values; a blob's levels are float16, so nothing is rounded)
    # or "float32" (as folders exported before them). The aten ops keep float32.
    side_factors: str = "packed4"
    # Custom ops only: each rotary embedding of q and k as one lowra::rope call and each gated MLP's silu(gate) * up
    # as one lowra::silu_mul call (see export/executorch/pointwise.py) instead of ~19 portable kernels per layer.
    fused_pointwise: bool = True
    # "last": the programs output the logits of the last position only ([1, 1, vocab]: what generation reads; the head
    # runs on one token per call and the output buffer is one row); "all": every position ([1, n, vocab]).
    logits: str = "last"
    # Custom ops only: the codes' layout in the programs. "blocked" (lowra::lowbit_linear_blocked*): each layer read as
    # one sequential stream; "planar" (lowra::lowbit_linear_planar*): rows in the file's order, as folders exported
    # before the blocked layout store them (2.4x slower to multiply; kept to reproduce them).
    kernel_layout: str = "blocked"

    def __post_init__(self) -> None:
        if self.ops not in OPS:
            raise ConfigError(f"ops={self.ops!r}; expected one of {OPS} (custom kernels or the core-ATen fallback)")
        if self.embeddings not in ("auto", *EMBEDDING_DTYPES):
            raise ConfigError(f"embeddings={self.embeddings!r}; expected 'auto' or one of {EMBEDDING_DTYPES}")
        if self.logits not in LOGITS_MODES:
            raise ConfigError(f"logits={self.logits!r}; expected one of {LOGITS_MODES}")
        if self.kernel_layout not in KERNEL_LAYOUTS:
            raise ConfigError(f"kernel_layout={self.kernel_layout!r}; expected one of {sorted(KERNEL_LAYOUTS)}")
        if self.side_factors not in SIDE_FACTORS:
            raise ConfigError(f"side_factors={self.side_factors!r}; expected one of {SIDE_FACTORS}")
        if self.embeddings == "int8" and self.ops != "custom":
            raise ConfigError("embeddings='int8' needs ops='custom' (lowra::q8_embedding and lowra::q8_linear)")
        if self.embeddings == "float16" and self.ops != "custom":
            raise ConfigError("embeddings='float16' needs ops='custom' (the head's lowra::f16_linear kernel); the "
                              "core-ATen fallback keeps them in float32")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"modes={list(self.modes)}; expected a non-empty subset of {MODES}")
        if self.max_seq_len < 2 or self.rank < 1:
            raise ConfigError(f"max_seq_len={self.max_seq_len}, rank={self.rank}; expected max_seq_len >= 2, rank >= 1")


# ------------------------------------------------------------------------------------------------ modules
class AtenLowBitLinear(nn.Module):
    """A LowBitLinear decoded with core-ATen ops only, for a stock ExecuTorch runtime (no custom op).

    ``>>`` is not core ATen (measured: it fails at lowering), so each code is
    ``floor(byte / 2**(w*k)) % 2**w`` followed by a gather into the row's codebook. Rows are grouped by width
    (one block of codes per width) and put back in order with one index_select. The constants stay the packed
    uint8 codes and float16 levels; the float32 weight exists only while the op runs.
    """

    def __init__(self, layer: LowBitLinear) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = layer.in_features, layer.out_features, layer.group_size
        widths = layer.widths.long()
        self.widths_present: list[int] = []
        order = []
        for width in CODED_WIDTHS:
            rows = torch.nonzero(widths == width).flatten()
            if rows.numel() == 0:
                continue
            nbytes = (self.in_features * width + 7) // 8
            byte_index = layer.row_code_offsets[rows].unsqueeze(1) + torch.arange(nbytes)
            level_index = layer.row_level_offsets[rows].unsqueeze(1) + torch.arange(1 << width)
            self.register_buffer(f"codes_{width}", layer.codes[byte_index].clone())
            self.register_buffer(f"books_{width}", layer.codebooks[level_index].clone())
            self.register_buffer(f"divisors_{width}", (1 << (width * torch.arange(8 // width))).to(torch.int32))
            self.widths_present.append(width)
            order.append(rows)
        rows_in_order = torch.cat(order)
        self.permuted = not torch.equal(rows_in_order, torch.arange(self.out_features))
        if self.permuted:
            self.register_buffer("inverse_order", torch.argsort(rows_in_order))
        self.register_buffer("scales", layer.scales.clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float().clone())
        # A recovered base's accuracy-recovery adapter (format version 2): float16 constants, applied as LowBitLinear
        # applies it, a low-rank term beside the decoded weight.
        self.register_buffer("recovery_A", None if layer.recovery_A is None else layer.recovery_A.clone())
        self.register_buffer("recovery_B", None if layer.recovery_B is None else layer.recovery_B.clone())
        self.recovery_scaling = layer.recovery_scaling

    def decode(self) -> Tensor:
        blocks = []
        for width in self.widths_present:
            codes = getattr(self, f"codes_{width}").to(torch.int32)
            digits = torch.div(codes.unsqueeze(-1), getattr(self, f"divisors_{width}"), rounding_mode="floor")
            index = (digits % (1 << width)).reshape(codes.shape[0], -1)[:, : self.in_features].to(torch.int64)
            blocks.append(torch.gather(getattr(self, f"books_{width}").float(), 1, index))
        weight = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 0)
        if self.permuted:
            weight = weight.index_select(0, self.inverse_order)
        if self.group_size:
            n_groups = self.scales.shape[1]
            scale = self.scales.float().unsqueeze(-1).expand(self.out_features, n_groups, self.group_size)
            weight = weight * scale.reshape(self.out_features, n_groups * self.group_size)[:, : self.in_features]
        return weight

    def forward(self, x: Tensor) -> Tensor:
        return with_recovery(x, F.linear(x, self.decode(), self.bias), self.recovery_A, self.recovery_B,
                             self.recovery_scaling)


class KernelLowBitLinear(nn.Module):
    """A LowBitLinear whose codes are stored in one of the native kernels' layouts, so the kernels multiply by the
    program's constants in place (no repacked copy at run time):

    - ``"blocked"`` (the default, ``lowra::lowbit_linear_blocked``): :func:`kernel_blocked_codes`, each layer read as
      one sequential stream;
    - ``"planar"`` (``lowra::lowbit_linear_planar``): :func:`kernel_layout_codes`, rows in the file's order (what
      folders exported before the blocked layout store; kept so they can be re-made and tested).
    """

    def __init__(self, layer: LowBitLinear, layout: str = "blocked") -> None:
        super().__init__()
        if layout not in KERNEL_LAYOUTS:
            raise ConfigError(f"kernel layout {layout!r} is unknown; expected one of {sorted(KERNEL_LAYOUTS)}")
        self.layout = layout
        self.in_features, self.out_features, self.group_size = layer.in_features, layer.out_features, layer.group_size
        codes = KERNEL_LAYOUTS[layout](layer.codes.cpu().numpy(), layer.widths.cpu().numpy(), layer.in_features)
        self.register_buffer("codes", torch.from_numpy(codes))
        for name in ("codebooks", "scales", "widths", "row_code_offsets", "row_level_offsets", "bias", "recovery_A",
                     "recovery_B"):
            value = getattr(layer, name)
            self.register_buffer(name, None if value is None else value.clone())
        self.recovery_scaling = layer.recovery_scaling

    def packed(self) -> tuple:
        return (self.codes, self.codebooks, self.scales, self.widths, self.row_code_offsets, self.row_level_offsets,
                self.in_features, self.group_size, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        y = getattr(torch.ops.lowra, f"lowbit_linear_{self.layout}")(x, *self.packed())
        return with_recovery(x, y, self.recovery_A, self.recovery_B, self.recovery_scaling)


class KernelSideBranchLinear(nn.Module):
    """:class:`SideBranchLinear` over a :class:`KernelLowBitLinear` in one op call
    (``lowra::lowbit_linear_<layout>_lora``): the user's factors are program data under the same names
    (``lora_down`` [rank, in], ``lora_up`` [out, rank]), float16 by default (a blob's values are float16 levels, so
    nothing is rounded) or float32."""

    def __init__(self, base: KernelLowBitLinear, down: Tensor, up: Tensor, dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_down", down.to(dtype).contiguous())
        self.register_buffer("lora_up", up.to(dtype).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        b = self.base
        y = getattr(torch.ops.lowra, f"lowbit_linear_{b.layout}_lora")(x, *b.packed(), self.lora_down, self.lora_up)
        return with_recovery(x, y, b.recovery_A, b.recovery_B, b.recovery_scaling)


class KernelPacked4SideBranchLinear(nn.Module):
    """:class:`KernelSideBranchLinear` with the user's factors as 4-bit codes and float16 levels
    (``lowra::lowbit_linear_blocked_lora4``; ``formats.executorch_manifest.pack4_factors``): program data
    ``lora_down_codes`` [rank, ceil(in / 2)], ``lora_down_books`` [rank, 16], ``lora_up_codes`` [rank, ceil(out / 2)],
    ``lora_up_books`` [rank, 16]."""

    def __init__(self, base: KernelLowBitLinear, down_codes: Tensor, down_books: Tensor, up_codes: Tensor,
                 up_books: Tensor) -> None:  # fmt: skip
        super().__init__()
        if base.layout != "blocked":
            raise ConfigError("packed side-branch factors need the blocked kernel layout")
        self.base = base
        for name, value in (("lora_down_codes", down_codes), ("lora_down_books", down_books),
                            ("lora_up_codes", up_codes), ("lora_up_books", up_books)):
            self.register_buffer(name, value.contiguous())

    def forward(self, x: Tensor) -> Tensor:
        b = self.base
        y = torch.ops.lowra.lowbit_linear_blocked_lora4(x, *b.packed(), self.lora_down_codes, self.lora_down_books,
                                                        self.lora_up_codes, self.lora_up_books)
        return with_recovery(x, y, b.recovery_A, b.recovery_B, b.recovery_scaling)


class SideBranchLinear(nn.Module):
    """``base(x) + (x @ down^T) @ up^T``: a user's LoRA factors as program data (side-branch mode)."""

    def __init__(self, base: nn.Module, rank: int, down: Tensor, up: Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_down", down.float().contiguous())  # [rank, in]
        self.register_buffer("lora_up", up.float().contiguous())  # [out, rank]

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_down), self.lora_up)


class MergedLinear(nn.Module):
    """A dense float32 linear whose weight is program data (merge-at-load mode)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class HalfEmbedding(nn.Module):
    """A token embedding stored in float16, looked up and widened to float32 (exact: float16 -> float32)."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, input_ids: Tensor) -> Tensor:
        return F.embedding(input_ids, self.weight).float()


class HalfLinear(nn.Module):
    """An output head stored in float16: ``lowra::f16_linear`` multiplies by it without a float32 copy."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if bias is None else bias.float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lowra.f16_linear(x, self.weight, self.bias)


class Int8Embedding(nn.Module):
    """A token embedding stored as 8-bit rows (:mod:`lowra.device_runtime.formats.int8_rows`), looked up and decoded
    to float32 by ``lowra::q8_embedding``."""

    def __init__(self, codes: Tensor, scales: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scales)

    def forward(self, input_ids: Tensor) -> Tensor:
        return torch.ops.lowra.q8_embedding(self.weight, self.scales, input_ids)


class Int8Linear(nn.Module):
    """An output head stored as 8-bit rows: ``lowra::q8_linear`` multiplies by it, converting in registers."""

    def __init__(self, codes: Tensor, scales: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.float().clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.lowra.q8_linear(x, self.weight, self.scales, self.bias)


def embedding_dtype(model: nn.Module, config: ExecutorchExportConfig) -> str:
    """What ``config.embeddings`` means for this model: "float16", "float32" or "int8" (see ExecutorchExportConfig)."""
    if config.embeddings != "auto":
        return config.embeddings
    if config.ops != "custom":
        return "float32"
    tensors = [m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    if all(torch.equal(t.detach().to(torch.float16).float(), t.detach().float()) for t in tensors):
        return "float16"
    import warnings

    warnings.warn(
        "the token embedding / output head hold values that are not float16, so the programs keep them in float32 "
        "(twice the bytes). Load the model from its base file (sdk.quant.lowbit_linear.load_quantized_base: dense "
        "tensors are float16 there) or pass embeddings='float16' to round them", stacklevel=3)
    return "float32"


def _half_embeddings(model: nn.Module) -> None:
    """Swap the embedding and the head for float16 modules, sharing one tensor when the model ties them."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    table = embed.weight.detach().to(torch.float16).contiguous()
    model.set_input_embeddings(HalfEmbedding(table))
    if head is not None:
        head_weight = table if tied else head.weight.detach().to(torch.float16).contiguous()
        model.set_output_embeddings(HalfLinear(head_weight, head.bias))


def _int8_embeddings(model: nn.Module) -> None:
    """Swap the embedding and the head for 8-bit modules (formats.int8_rows), sharing one table when tied."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    if embed.weight.shape[1] % Q8_BLOCK:
        raise ConfigError(f"embeddings='int8' stores rows in blocks of {Q8_BLOCK}; this model's hidden size is "
                          f"{embed.weight.shape[1]}. Use embeddings='float16'")

    def rows(weight: Tensor) -> tuple[Tensor, Tensor]:
        codes, scales = quantize_q8(weight.detach().float().cpu().numpy())
        return torch.from_numpy(codes), torch.from_numpy(scales)

    codes, scales = rows(embed.weight)
    model.set_input_embeddings(Int8Embedding(codes, scales))
    if head is not None:
        head_codes, head_scales = (codes, scales) if tied else rows(head.weight)
        model.set_output_embeddings(Int8Linear(head_codes, head_scales, head.bias))


# ------------------------------------------------------------------------------------------------ helpers
def load_kernel_library(path: str | Path | None = None) -> Path:
    """Build (or reuse) the native kernels and register them with the in-process ExecuTorch runtime."""
    library = Path(path) if path is not None else build_kernel_library()
    register_kernel_library(library)
    return library


def _side_template(rank: int, out_f: int, in_f: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Factors whose product is exactly zero yet whose bytes are unique per module.

    ExecuTorch deduplicates identical named data into one segment; the device overwrites segments in place,
    so every tensor needs its own. Even components get a random down row and a zero up column, odd ones the
    reverse: every term of up @ down is 0 * finite, so the template program computes the base exactly.
    """
    down = torch.randn(rank, in_f, generator=generator) * 0.01
    up = torch.randn(out_f, rank, generator=generator) * 0.01
    down[1::2] = 0.0
    up[:, 0::2] = 0.0
    return down, up


def _packed4_template(rank: int, out_f: int, in_f: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Packed factors whose product is exactly zero yet whose bytes are unique per module (see _side_template): random
    down codes and levels; up codes that only index levels 0-7, which are zero, beside random levels 8-15."""
    down_codes = torch.randint(0, 256, (rank, -(-in_f // 2)), generator=generator, dtype=torch.uint8)
    low, high = (torch.randint(0, 8, (rank, -(-out_f // 2)), generator=generator, dtype=torch.uint8) for _ in range(2))
    up_codes = low | (high << 4)  # both nibbles below 8
    down_books = (torch.randn(rank, 16, generator=generator) * 0.01).half()
    up_books = (torch.randn(rank, 16, generator=generator) * 0.01).half()
    up_books[:, :8] = 0
    return down_codes, down_books, up_codes, up_books


def fix_empty_strides(module: nn.Module) -> None:
    """Give empty buffers (e.g. ``scales [out, 0]`` without groups) ordinary strides.

    A tensor made from an empty numpy array has stride 0, which ExecuTorch refuses ("0 in strides is not
    supported"); a fresh empty tensor of the same shape has the default strides.
    """
    for sub in module.modules():
        for name, buffer in list(sub.named_buffers(recurse=False)):
            if buffer is not None and buffer.numel() == 0 and 0 in buffer.stride():
                setattr(sub, name, torch.empty(buffer.shape, dtype=buffer.dtype, device=buffer.device))


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def _read_ptd_segments(path: Path) -> dict[str, tuple[int, int]]:
    """Named data key -> (absolute byte offset, size) in a .ptd, via executorch's own deserializer."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorHeader, _deserialize_to_flat_tensor

    data = path.read_bytes()
    header = FlatTensorHeader.from_bytes(data[8:])
    flat = _deserialize_to_flat_tensor(data[: header.flatbuffer_offset + header.flatbuffer_size])
    out = {}
    for named in flat.named_data:
        segment = flat.segments[named.segment_index]
        out[named.key] = (header.segment_base_offset + segment.offset, segment.size)
    seen: dict[tuple[int, int], str] = {}
    for key, where in out.items():
        if where in seen:
            raise ConfigError(
                f"named data {key!r} and {seen[where]!r} share one segment of {path.name}; per-user data must "
                "have a segment per tensor (the template values should have been unique)"
            )
        seen[where] = key
    return out


# ------------------------------------------------------------------------------------------------ export
def _last_logits_wrapper() -> type:
    """transformers' static-cache wrapper whose forward asks the model for the last position's logits only."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    class LastLogitsWithStaticCache(TorchExportableModuleWithStaticCache):
        def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                    cache_position: Tensor | None = None) -> Tensor:
            for layer in self.static_cache.layers:  # position 0 restarts the cache, as in the parent's forward
                layer.cumulative_length.copy_(cache_position[0])
            return self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=None,
                              cache=self.static_cache, use_cache=True, logits_to_keep=1).logits

    return LastLogitsWithStaticCache


@dataclass
class _Program:
    mode: str
    wrapper: nn.Module
    user_tensors: dict[str, Tensor]  # fully qualified buffer name (in the wrapper) -> template value
    user_modules: dict[str, tuple[str, str]] = field(default_factory=dict)  # fqn -> (module path, tensor role)


def _build_program(model: nn.Module, config: ExecutorchExportConfig, mode: str, targets: list[str],
                   embeddings: str = "float32") -> _Program:
    from transformers import GenerationConfig
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model = copy.deepcopy(model)
    model.generation_config = GenerationConfig(use_cache=True, cache_implementation="static")
    user_modules: dict[str, tuple[str, str]] = {}
    generator = torch.Generator().manual_seed(0)
    for path, layer in lowbit_layers(model).items():
        if mode == "merge" and path in targets:
            # The weight a blob binds to and merges onto: the decode plus a recovery adapter's term, if any.
            _replace(model, path, MergedLinear(layer.effective_weight(), layer.bias))
            user_modules[f"model.{path}.weight"] = (path, "weight")
            continue
        packed: nn.Module = (AtenLowBitLinear(layer) if config.ops == "aten"
                             else KernelLowBitLinear(layer, config.kernel_layout))
        if mode == "side" and path in targets:
            if isinstance(packed, KernelLowBitLinear) and config.side_factors == "packed4":
                packed = KernelPacked4SideBranchLinear(packed, *_packed4_template(config.rank, layer.out_features,
                                                                                  layer.in_features, generator))
                for role in PACKED_ROLES:
                    user_modules[f"model.{path}.lora_{role}"] = (path, role)
            else:
                down, up = _side_template(config.rank, layer.out_features, layer.in_features, generator)
                packed = (KernelSideBranchLinear(packed, down, up, getattr(torch, config.side_factors))
                          if isinstance(packed, KernelLowBitLinear) else SideBranchLinear(packed, config.rank, down, up))
                user_modules[f"model.{path}.lora_down"] = (path, "down")
                user_modules[f"model.{path}.lora_up"] = (path, "up")
        _replace(model, path, packed)
    if embeddings == "float16":
        _half_embeddings(model)
    elif embeddings == "int8":
        _int8_embeddings(model)
    if config.ops == "custom" and config.fused_attention:
        use_lowra_attention(model)
    if config.ops == "custom" and config.fused_norm:
        use_lowra_rms_norm(model)
    if config.ops == "custom" and config.fused_pointwise:
        use_lowra_gated_mlp(model)
    fix_empty_strides(model)
    wrapper_class = TorchExportableModuleWithStaticCache if config.logits == "all" else _last_logits_wrapper()
    wrapper = wrapper_class(model, batch_size=1, max_cache_len=config.max_seq_len)
    wrapper.eval()
    buffers = dict(wrapper.named_buffers())
    return _Program(mode, wrapper, {fqn: buffers[fqn] for fqn in user_modules}, user_modules)


def _lower(program: _Program, config: ExecutorchExportConfig, out_dir: Path) -> tuple[Path, Path, set[str]]:
    """Lower and write ``{mode}.pte`` / ``{mode}.ptd``; also returns the ``lowra::`` operators the program calls."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

    tag = program.mode  # -> {mode}.ptd
    example = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "cache_position": torch.arange(2)}
    seq = torch.export.Dim("seq", min=1, max=config.max_seq_len - 1)
    shapes = {"input_ids": {1: seq}, "cache_position": {0: seq}}
    rope = lowra_rope(program.wrapper) if config.ops == "custom" and config.fused_pointwise else contextlib.nullcontext()
    with torch.no_grad(), rope:
        # strict=True: the non-strict trace of transformers' static cache fails later in run_decompositions
        # ("expected compiled_fn to be GraphModule", torch 2.13 + transformers 5.24).
        exported = torch.export.export(program.wrapper, (), example, dynamic_shapes=shapes, strict=True)
    user_fqns = set(program.user_tensors)
    partitioners = []
    if config.xnnpack:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        # XNNPACK serializes the constants it consumes into its own blob unless they are tagged on the
        # unlifted graph (get_attr targets are the explicit buffer paths), then the graph is exported again.
        unlifted = exported.module()
        delegate_external_constants_pass_unlifted(
            unlifted, lambda node: tag if str(node.target) in user_fqns else None
        )
        with torch.no_grad():
            exported = torch.export.export(unlifted, (), example, dynamic_shapes=shapes, strict=False)
        partitioners = [XnnpackPartitioner()]
    # Keep aten.linear whole: decomposed, every call of a linear on a weight the program does not constant-fold (the
    # users' factors, the merge weights, the tied head) copies the transposed weight first (permute_copy: ~50% of a
    # SmolLM2 decode step, measured with ETDump), where the runtime's linear.out multiplies by W^T in place.
    keep = [torch.ops.aten.linear.default]
    edge = to_edge_transform_and_lower(
        exported, partitioner=partitioners,
        compile_config=EdgeCompileConfig(preserve_ops=keep, _core_aten_ops_exception_list=keep))
    placeholder_to_fqn = dict(edge.exported_program().graph_signature.inputs_to_buffers)

    def external(node: torch.fx.Node) -> str | None:
        return tag if placeholder_to_fqn.get(node.name) in user_fqns else None

    # The reinplace pass writes each step's keys and values into the cache buffers in place (index_put_): functional
    # index_put copies a layer's whole cache per step, and the buffer copy-back copies it again.
    executorch_program = edge.to_executorch(ExecutorchBackendConfig(external_constants=external,
                                                                    run_reinplace_pass=True))
    pte = out_dir / f"{program.mode}.pte"
    atomic_write_bytes(pte, executorch_program.buffer, overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        executorch_program.write_tensor_data_to_file(tmp)
        written = sorted(Path(tmp).glob("*.ptd"))
        if [p.name for p in written] != [f"{tag}.ptd"]:
            raise ConfigError(
                f"the {program.mode} program wrote data files {[p.name for p in written]}; expected exactly "
                f"{tag}.ptd (every user tensor tagged, nothing else external)"
            )
        ptd = out_dir / f"{tag}.ptd"
        shutil.move(str(written[0]), ptd)
    plan = executorch_program.executorch_program.execution_plan[0]
    kernel_ops = {f"{op.name}.{op.overload}" if op.overload else op.name for op in plan.operators}
    return pte, ptd, {op for op in kernel_ops if op.startswith("lowra::")}


def _locate(program: _Program, ptd: Path) -> dict[str, dict[str, Any]]:
    """Where each user tensor's bytes are in the .ptd, found by content (keys are backend-specific names)."""
    segments = _read_ptd_segments(ptd)
    data = ptd.read_bytes()
    by_content = {hashlib.sha256(data[o : o + n]).hexdigest(): (k, o, n) for k, (o, n) in segments.items()}
    located: dict[str, dict[str, Any]] = {}
    for fqn, value in program.user_tensors.items():
        array = value.detach().cpu().contiguous().numpy()
        hit = by_content.get(hashlib.sha256(array.tobytes()).hexdigest())
        if hit is None:
            raise ConfigError(
                f"the bytes of {fqn} are not a segment of {ptd.name}: a backend changed its layout or dtype. Export "
                "with xnnpack=False, or keep this tensor out of the delegate"
            )
        key, offset, nbytes = hit
        module, role = program.user_modules[fqn]
        located[f"{module}:{role}"] = {
            "key": key, "offset": offset, "nbytes": nbytes, "dtype": str(array.dtype), "shape": list(array.shape),
        }  # fmt: skip
    if len(segments) != len(located):
        raise ConfigError(f"{ptd.name} holds {len(segments)} tensors but {len(located)} were expected (user data only)")
    return located


def export_executorch(
    model: nn.Module,
    out_dir: str | Path,
    config: ExecutorchExportConfig = ExecutorchExportConfig(),
    tokenizer: Any = None,
    source: str = "",
) -> dict[str, Any]:
    """Export a model whose linears are LowBitLinear (``replace_linears``) into ``out_dir``; return the manifest.

    ``tokenizer``: a ``tokenizer.json`` path, a model folder or a Hugging Face fast tokenizer (saved as
    tokenizer.json; its prompt template is recorded in the manifest).
    """
    layers = lowbit_layers(model)
    if not layers:
        raise ConfigError(
            "the model has no LowBitLinear layers; quantize it first (sdk.quant.base.quantize_model, then "
            "sdk.quant.lowbit_linear.replace_linears) so the program carries the packed base"
        )
    targets = linear_module_names(model, config.targets)
    missing = [t for t in targets if t not in layers]
    if missing:
        raise ConfigError(f"adaptable modules {missing[:3]} are not LowBitLinear; quantize every targeted linear")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    library = None
    if config.ops == "custom":
        library = load_kernel_library(config.kernel_library)
        shutil.copyfile(library, out / LIBRARY_NAME)
    digests, shapes = {}, {}
    for name in targets:
        weight = layers[name].effective_weight().detach().cpu().contiguous().numpy()
        digests[name], shapes[name] = fmt.tensor_digest(weight), list(weight.shape)
    packed_bytes = {k: 0 for k in ("codes", "codebooks", "scales", "widths")}
    for layer in layers.values():
        for name in packed_bytes:
            packed_bytes[name] += getattr(layer, name).numel() * getattr(layer, name).element_size()
    programs: dict[str, Any] = {}
    embeddings = embedding_dtype(model, config)
    kernel_ops: set[str] = set()
    for mode in config.modes:
        program = _build_program(model, config, mode, targets, embeddings)
        pte, ptd, ops = _lower(program, config, out)
        kernel_ops |= ops
        programs[mode] = {
            "program": pte.name, "data": ptd.name, "program_sha256": file_sha256(pte), "data_sha256": file_sha256(ptd),
            "program_bytes": pte.stat().st_size, "data_bytes": ptd.stat().st_size, "tensors": _locate(program, ptd),
        }  # fmt: skip
    template = save_tokenizer(tokenizer, out) if tokenizer is not None else None
    cfg = model.config
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ops": config.ops,
        "xnnpack": config.xnnpack,
        "embeddings": embeddings,
        "attention": "lowra" if config.ops == "custom" and config.fused_attention else "sdpa",
        "norm": "lowra" if config.ops == "custom" and config.fused_norm else "torch",
        # What the programs call (the swaps apply where a model family computes the same: export/executorch/pointwise).
        "pointwise": "lowra" if kernel_ops & {"lowra::rope.out", "lowra::silu_mul.out"} else "torch",
        "logits": config.logits,
        "kernel_library": LIBRARY_NAME if library is not None else None,
        "kernel_ops": sorted(kernel_ops),
        "kernel_library_sha256": file_sha256(out / LIBRARY_NAME) if library is not None else None,
        "max_seq_len": config.max_seq_len,
        "rank": config.rank,
        "vocab_size": int(cfg.vocab_size),
        "source": source or str(getattr(cfg, "_name_or_path", "")),
        "modules": {name: {"shape": shapes[name], "digest": digests[name]} for name in targets},
        "packed_base_bytes": packed_bytes,
        "programs": programs,
        **({PROMPT_TEMPLATE_KEY: template} if template is not None else {}),
    }
    atomic_write_bytes(out / MANIFEST_FILE, json.dumps(manifest, indent=1).encode(), overwrite=True)
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m lowra.export.executorch",
        description="Export a quantized lowra base to an ExecuTorch model folder (docs/FORMAT.md).",
    )
    parser.add_argument("--base", default=None, help="HF model folder the base was quantized from (default: embedded SmolLM2)")
    parser.add_argument("--quantized", required=True, help="quantized base file written by `lowra quantize-base`")
    parser.add_argument("--out", required=True, help="output model folder")
    parser.add_argument("--ops", choices=OPS, default="custom", help="custom: native low-bit kernels; aten: stock runtime")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8, help="side-branch rank (largest kept rank a blob may have)")
    parser.add_argument("--xnnpack", action="store_true")
    parser.add_argument("--embeddings", choices=("auto", *EMBEDDING_DTYPES), default="auto",
                        help="token embedding / output head storage (auto: float16 with the custom ops; the base file "
                             "stores them in float16; int8: 8-bit rows, half the bytes, values rounded)")
    parser.add_argument("--kernel-layout", choices=sorted(KERNEL_LAYOUTS), default="blocked",
                        help="custom ops: how the programs store the codes (blocked: each layer read as one stream; "
                             "planar: rows in the file's order, as folders exported before it)")
    parser.add_argument("--side-factors", choices=SIDE_FACTORS, default="packed4",
                        help="custom ops, side mode: how the program holds a user's factors (packed4: the blob's "
                             "codes in 4-bit slots; float16: the decoded values, exact; float32: as folders exported "
                             "before them)")
    args = parser.parse_args(argv)

    from lowra.device_runtime.formats.quantized_base import read_quantized_base
    from lowra.sdk.base_model import load_base
    from lowra.sdk.quant.lowbit_linear import load_quantized_base

    base = load_base(args.base)
    # The base file's model: its low-bit linears (with a recovery adapter, if any) and its float16 dense tensors.
    load_quantized_base(base.model, read_quantized_base(args.quantized))
    config = ExecutorchExportConfig(ops=args.ops, modes=tuple(args.modes), max_seq_len=args.max_seq_len,
                                    rank=args.rank, xnnpack=args.xnnpack, embeddings=args.embeddings,
                                    kernel_layout=args.kernel_layout, side_factors=args.side_factors)
    manifest = export_executorch(base.model, args.out, config, tokenizer=base.tokenizer,
                                 source=str(args.quantized))
    for mode, program in manifest["programs"].items():
        print(f"{mode}: {program['program']} {program['program_bytes']:,} B + {program['data']} {program['data_bytes']:,} B")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
