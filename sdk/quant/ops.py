"""The low-bit ops, defined once with ``torch.library`` (schema + fake kernel + pure-torch reference).

Two ops decode the layout of :class:`lowra.device_runtime.formats.quantized_weight.QuantizedWeight` (per output row a
width in {1, 2, 4}, rows of codes packed LSB-first, per-row codebooks, absmax scales per input group):

- ``lowra::dequantize(codes, codebooks, scales, widths, row_code_offsets, row_level_offsets, in_features,
  group_size) -> Tensor``: float32 ``[out, in]``, equal element for element to ``QuantizedWeight.dequantize()``.
- ``lowra::lowbit_linear(x, <same buffers>, bias?) -> Tensor``: ``x @ dequantize(...)^T (+ bias)``, with a
  backward for ``x`` only (the buffers are a frozen base; LoRA trains beside it).
- ``lowra::lowbit_linear_grad_input(grad_out, <same buffers>) -> Tensor``: ``grad_out @ dequantize(...)``, the
  backward of ``lowbit_linear`` for ``x`` (its own op so a device can fuse it; CUDA decodes tile by tile).
- ``lowra::lowbit_linear_planar(x, <same buffers>, bias?) -> Tensor``: ``lowbit_linear`` with the codes in the native
  kernels' layout (2-bit rows bit-planar per byte: :func:`lowra.device_runtime.formats.quantized_weight.
  kernel_layout_codes`), as an exported program stores them so the kernels read them in place.
- ``lowra::lowbit_linear_planar_lora(x, <same buffers>, bias?, down, up) -> Tensor``: the planar product plus a LoRA
  side branch ``(x @ down^T) @ up^T`` (``down`` [rank, in], ``up`` [out, rank], float32) in one call: how a side
  program applies a user's factors.
- ``lowra::lowbit_linear_blocked`` / ``lowra::lowbit_linear_blocked_lora``: the same two products with the codes in
  the kernels' BLOCKED layout (:func:`lowra.device_runtime.formats.quantized_weight.kernel_blocked_codes`: the same
  bytes reordered so each layer is read as one stream), what the exporter writes now.
- ``lowra::lowbit_linear_blocked_lora4(x, <same buffers>, bias?, down_codes, down_books, up_codes, up_books)``: the
  blocked product plus the side branch with a user's factors as 4-bit codes (uint8 ``down_codes`` [rank,
  ceil(in / 2)], float16 ``down_books`` [rank, 16]: down row k = ``down_books[k][code]``; ``up_codes`` [rank,
  ceil(out / 2)], ``up_books`` [rank, 16]: up column k; two codes per byte, the even one in the low nibble): a
  blob's channels kept as codes (:func:`lowra.device_runtime.formats.executorch_manifest.pack4_channels`).
- ``lowra::f16_linear(x, weight, bias?) -> Tensor``: ``x @ float32(weight)^T (+ bias)`` for a dense float16
  ``weight`` [out, in]: how an exported program multiplies by a model's float16 embedding/output head without a
  float32 copy (the native kernel converts in registers; docs/FORMAT.md, ExecuTorch model folder).
- ``lowra::q8_linear(x, weight, scales, bias?) -> Tensor`` and ``lowra::q8_embedding(weight, scales, indices) ->
  Tensor``: the same for 8-bit rows (:mod:`lowra.device_runtime.formats.int8_rows`: int8 ``weight`` [out, in] times a
  float16 scale per block of 32): a model's embedding/head stored in 8 bits (``embeddings="int8"``).
- ``lowra::quantize_codes(weight, codebooks, widths, row_code_offsets, row_level_offsets, group_size, n_code_bytes)
  -> (codes, scales)``: the encode for given codebooks (float32 arithmetic: float16 group absmax, value / scale,
  code = number of level midpoints strictly below the value), packed in the same layout.

The reference implementation registered here is composed of plain torch ops, so it runs on every device;
``lowra.cuda_kernels`` registers CUDA kernels for the same schemas when it can build them, and CUDA falls back to
this one until then (the bitsandbytes ``_ops.py`` pattern). The backward recomputes the weight instead of
saving it: keeping one fp32 weight per layer alive from forward to backward would cost exactly the memory the
low-bit base exists to save (ARCHITECTURE.md, "the memory of the frozen base during training").
"""

from __future__ import annotations

from typing import Any, NamedTuple, get_type_hints

import torch
from torch import Tensor

from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.device_runtime.formats.int8_rows import Q8_BLOCK
from lowra.device_runtime.formats.quantized_weight import FILE_BYTE, blocked_code_order
from lowra.sdk.errors import ConfigError

__all__ = [
    "NAMESPACE",
    "EncodeArgs",
    "LowBitArgs",
    "check_buffers",
    "dequantize_reference",
    "f16_linear_reference",
    "q8_dequantize_reference",
    "q8_embedding_reference",
    "q8_linear_reference",
    "lowbit_linear_blocked_lora4_reference",
    "lowbit_linear_blocked_lora_reference",
    "lowbit_linear_blocked_reference",
    "lowbit_linear_planar_lora_reference",
    "lowbit_linear_planar_reference",
    "lowbit_linear_grad_input_reference",
    "lowbit_linear_reference",
    "native_kernels",
    "quantize_codes_reference",
]

NAMESPACE = "lowra"


class LowBitArgs(NamedTuple):
    """A packed weight as every decoding ``lowra::`` op takes it, in schema order: the one list of these arguments.

    The schemas, :func:`check_buffers`, the reference and fake kernels and ``LowBitLinear`` all derive from it
    (``torch.ops.lowra.dequantize(*args)``); the layout is :class:`QuantizedWeight`'s.
    """

    codes: Tensor  # uint8, rows of codes packed LSB-first
    codebooks: Tensor  # float16, per-row levels
    scales: Tensor  # float16 [out, n_groups]
    widths: Tensor  # uint8 [out], one width in CODED_WIDTHS per row
    row_code_offsets: Tensor  # int64 [out + 1]
    row_level_offsets: Tensor  # int64 [out + 1]
    in_features: int
    group_size: int


_SCHEMA_TYPES = {Tensor: "Tensor", int: "int"}


def _schema_arguments(args: type[NamedTuple]) -> str:
    """The torch.library argument list of a NamedTuple of Tensor / int fields."""
    return ", ".join(f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in get_type_hints(args).items())


_BUFFERS = _schema_arguments(LowBitArgs)
DEQUANTIZE_SCHEMA = f"({_BUFFERS}) -> Tensor"
LOWBIT_LINEAR_SCHEMA = f"(Tensor x, {_BUFFERS}, Tensor? bias) -> Tensor"
GRAD_INPUT_SCHEMA = f"(Tensor grad_out, {_BUFFERS}) -> Tensor"


class EncodeArgs(NamedTuple):
    """What ``lowra::quantize_codes`` takes, in schema order (the schema and both kernels derive from it)."""

    weight: Tensor  # floating [out, in]
    codebooks: Tensor
    widths: Tensor
    row_code_offsets: Tensor
    row_level_offsets: Tensor
    group_size: int
    # = row_code_offsets[-1], passed explicitly so the output size is known without reading values (fake tensors,
    # export); the implementations check it against the offsets.
    n_code_bytes: int


QUANTIZE_CODES_SCHEMA = f"({_schema_arguments(EncodeArgs)}) -> (Tensor, Tensor)"

# A Library object owns its registrations: it must live as long as the process, hence module level.
_LIB = torch.library.Library(NAMESPACE, "DEF")
_LIB.define("dequantize" + DEQUANTIZE_SCHEMA)
_LIB.define("lowbit_linear" + LOWBIT_LINEAR_SCHEMA)
_LIB.define("lowbit_linear_grad_input" + GRAD_INPUT_SCHEMA)
_LIB.define("quantize_codes" + QUANTIZE_CODES_SCHEMA)
# Out variants: ExecuTorch's to_executorch() rewrites every op to its ``.out`` overload (memory-planned output);
# the native ExecuTorch kernels (lowra.export, export/kernels/) implement exactly these two schemas.
_LIB.define(f"dequantize.out({_BUFFERS}, *, Tensor(a!) out) -> Tensor(a!)")
_LIB.define(f"lowbit_linear.out(Tensor x, {_BUFFERS}, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)")
_LIB.define("lowbit_linear_planar" + LOWBIT_LINEAR_SCHEMA)
_LIB.define(f"lowbit_linear_planar.out(Tensor x, {_BUFFERS}, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)")
_LIB.define(f"lowbit_linear_planar_lora(Tensor x, {_BUFFERS}, Tensor? bias, Tensor down, Tensor up) -> Tensor")
_LIB.define(f"lowbit_linear_planar_lora.out(Tensor x, {_BUFFERS}, Tensor? bias, Tensor down, Tensor up, *, "
            "Tensor(a!) out) -> Tensor(a!)")
# The same two products with the codes in the kernels' BLOCKED layout (what the exporter writes now); the planar ops
# stay for folders exported before it (their manifests name the ops their programs call).
_LIB.define("lowbit_linear_blocked" + LOWBIT_LINEAR_SCHEMA)
_LIB.define(f"lowbit_linear_blocked.out(Tensor x, {_BUFFERS}, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)")
_LIB.define(f"lowbit_linear_blocked_lora(Tensor x, {_BUFFERS}, Tensor? bias, Tensor down, Tensor up) -> Tensor")
_LIB.define(f"lowbit_linear_blocked_lora.out(Tensor x, {_BUFFERS}, Tensor? bias, Tensor down, Tensor up, *, "
            "Tensor(a!) out) -> Tensor(a!)")
_LORA4 = "Tensor down_codes, Tensor down_books, Tensor up_codes, Tensor up_books"
_LIB.define(f"lowbit_linear_blocked_lora4(Tensor x, {_BUFFERS}, Tensor? bias, {_LORA4}) -> Tensor")
_LIB.define(f"lowbit_linear_blocked_lora4.out(Tensor x, {_BUFFERS}, Tensor? bias, {_LORA4}, *, Tensor(a!) out) -> "
            "Tensor(a!)")
F16_LINEAR_SCHEMA = "(Tensor x, Tensor weight, Tensor? bias) -> Tensor"
_LIB.define("f16_linear" + F16_LINEAR_SCHEMA)
_LIB.define("f16_linear.out(Tensor x, Tensor weight, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)")
_LIB.define("q8_linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias) -> Tensor")
_LIB.define("q8_linear.out(Tensor x, Tensor weight, Tensor scales, Tensor? bias, *, Tensor(a!) out) -> Tensor(a!)")
_LIB.define("q8_embedding(Tensor weight, Tensor scales, Tensor indices) -> Tensor")
_LIB.define("q8_embedding.out(Tensor weight, Tensor scales, Tensor indices, *, Tensor(a!) out) -> Tensor(a!)")

# The tensor fields of LowBitArgs, in its order (autograd saves and restores them in this order).
_DTYPES = {
    "codes": torch.uint8,
    "codebooks": torch.float16,
    "scales": torch.float16,
    "widths": torch.uint8,
    "row_code_offsets": torch.int64,
    "row_level_offsets": torch.int64,
}


def check_buffers(args: LowBitArgs) -> int:
    """Check dtypes and shapes (never values, so it is free on any device and under fake tensors).

    Returns ``out_features``. Value checks (allowed widths, offsets that add up) belong where the buffers are
    built, once: ``QuantizedWeight.validate`` and ``LowBitLinear``.
    """
    for name, want in _DTYPES.items():
        tensor = getattr(args, name)
        if tensor.dtype != want or tensor.dim() != (2 if name == "scales" else 1):
            raise ConfigError(
                f"low-bit buffer {name} is {tensor.dtype} with shape {list(tensor.shape)}; expected {want} "
                f"{'[out, n_groups]' if name == 'scales' else '1-D'}; build the buffers with "
                "LowBitLinear.from_quantized(QuantizedWeight) instead of by hand"
            )
    scales, in_features, group_size = args.scales, args.in_features, args.group_size
    out_features = args.widths.shape[0]
    if in_features < 1 or group_size < 0 or out_features < 1:
        raise ConfigError(
            f"low-bit weight has out_features={out_features}, in_features={in_features}, group_size={group_size}; "
            "expected out_features >= 1, in_features >= 1 and group_size >= 0 (0 = one scale folded into the codebook)"
        )
    n_groups = 0 if group_size == 0 else -(-in_features // group_size)
    if tuple(scales.shape) != (out_features, n_groups):
        raise ConfigError(
            f"low-bit scales have shape {list(scales.shape)}; expected [{out_features}, {n_groups}] for "
            f"{out_features} rows of {in_features} inputs in groups of {group_size}"
        )
    for name in ("row_code_offsets", "row_level_offsets"):
        tensor = getattr(args, name)
        if tensor.shape[0] != out_features + 1:
            raise ConfigError(
                f"low-bit {name} has {tensor.shape[0]} entries; expected out_features + 1 = {out_features + 1} "
                "(QuantizedWeight.row_code_offsets / row_level_offsets)"
            )
    return out_features


# ------------------------------------------------------------------------------------------------ native kernels
_native_tried = False


def native_kernels() -> Any:
    """Build/register the CUDA kernels of ``lowra.cuda_kernels`` (cached); a falsy status says why not."""
    from lowra.cuda_kernels import load

    return load()


def _load_native_once(device: torch.device) -> bool:
    """On the first CUDA call, try the native kernels; True when they are now registered for CUDA."""
    global _native_tried
    if device.type != "cuda" or _native_tried:
        return False
    _native_tried = True
    return bool(native_kernels())


# ------------------------------------------------------------------------------------------------ reference
def _byte_codes(width: int, device: torch.device) -> Tensor:
    """int64 ``[256, 8 // width]``: the codes a byte holds, LSB-first (format.unpack_codes as a lookup table)."""
    shifts = torch.arange(0, 8, width, device=device)
    return (torch.arange(256, device=device).unsqueeze(1) >> shifts) & ((1 << width) - 1)


def dequantize_reference(*packed: Any) -> Tensor:
    """Pure-torch decode (``packed``: the :class:`LowBitArgs`), vectorized per width group; the same float32 values
    as the numpy reference.

    Built from index_select/gather on contiguous tensors: on CPU that measured ~1.3x faster than shift-and-mask
    unpacking and ~2x faster than advanced indexing (one 1536x576 row block, one thread).
    """
    args = LowBitArgs(*packed)
    if _load_native_once(args.codes.device):
        # The CUDA kernel registered just now takes this call and every later one.
        return torch.ops.lowra.dequantize(*args)
    out_features = check_buffers(args)
    codes, widths, in_features, group_size = args.codes, args.widths, args.in_features, args.group_size
    device = codes.device
    levels = args.codebooks.float()
    out: Tensor | None = None
    decoded_rows = 0
    for width in CODED_WIDTHS:
        rows = torch.nonzero(widths == width).flatten()
        n = rows.numel()
        if n == 0:
            continue
        decoded_rows += n
        nbytes = (in_features * width + 7) // 8
        if n == out_features:
            # One width for the whole layer (the common case): the codes are already an [out, nbytes] block.
            if codes.numel() != n * nbytes:
                raise ConfigError(
                    f"low-bit codes have {codes.numel()} bytes; {n} rows of {in_features} {width}-bit codes take "
                    f"{n * nbytes}. Build the buffers from a validated QuantizedWeight"
                )
            packed = codes.view(n, nbytes)
        else:
            byte_index = args.row_code_offsets[rows].unsqueeze(1) + torch.arange(nbytes, device=device)
            packed = codes.index_select(0, byte_index.flatten())
        index = _byte_codes(width, device).index_select(0, packed.flatten().long()).view(n, -1)[:, :in_features]
        level_index = args.row_level_offsets[rows].unsqueeze(1) + torch.arange(1 << width, device=device)
        row_books = levels.index_select(0, level_index.flatten()).view(n, 1 << width)
        values = torch.gather(row_books, 1, index)
        if n == out_features:
            out = values
        else:
            if out is None:
                out = torch.empty(out_features, in_features, dtype=torch.float32, device=device)
            out.index_copy_(0, rows, values)
    if out is None or decoded_rows != out_features:
        bad = sorted(set(widths.unique().tolist()) - set(CODED_WIDTHS))
        raise ConfigError(
            f"low-bit widths contain {bad}; every row width must be one of {CODED_WIDTHS}. Build the buffers from a "
            "validated QuantizedWeight (LowBitLinear.from_quantized)"
        )
    if group_size:
        # float16 -> float32 then one float32 multiply per element: bit for bit what numpy does.
        row_scales = args.scales.float()
        full = in_features // group_size
        if full:
            out[:, : full * group_size].view(out_features, full, group_size).mul_(row_scales[:, :full].unsqueeze(-1))
        if full * group_size < in_features:
            out[:, full * group_size :].mul_(row_scales[:, full:])
    return out


def lowbit_linear_reference(x: Tensor, *packed_and_bias: Any) -> Tensor:
    """``x @ W^T + bias`` (after ``x``: the :class:`LowBitArgs`, then ``bias``) with ``W`` decoded for this call only
    (dropped on return)."""
    *packed, bias = packed_and_bias
    args = LowBitArgs(*packed)
    if _load_native_once(x.device):
        return torch.ops.lowra.lowbit_linear(x, *args, bias)
    _check_input(x, args.in_features)
    weight = torch.ops.lowra.dequantize(*args)
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _check_input(x: Tensor, in_features: int) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ConfigError(
            f"lowbit_linear input has shape {list(x.shape)}; expected [..., {in_features}] (last dimension = "
            "in_features of the low-bit weight)"
        )
    if not x.is_floating_point():
        raise ConfigError(f"lowbit_linear input is {x.dtype}; expected a floating-point tensor")


def lowbit_linear_grad_input_reference(grad_out: Tensor, *packed: Any) -> Tensor:
    """``grad_out @ W`` in ``grad_out``'s dtype (after ``grad_out``: the :class:`LowBitArgs`), ``W`` decoded for
    this call only (the input gradient)."""
    args = LowBitArgs(*packed)
    if _load_native_once(grad_out.device):
        return torch.ops.lowra.lowbit_linear_grad_input(grad_out, *args)
    weight = torch.ops.lowra.dequantize(*args)
    _check_grad_out(grad_out, weight.shape[0])
    return grad_out @ weight.to(grad_out.dtype)


def _check_grad_out(grad_out: Tensor, out_features: int) -> None:
    if grad_out.dim() < 1 or grad_out.shape[-1] != out_features or not grad_out.is_floating_point():
        raise ConfigError(
            f"lowbit_linear_grad_input got grad_out {grad_out.dtype} {list(grad_out.shape)}; expected a floating-point "
            f"[..., {out_features}] tensor (last dimension = out_features of the low-bit weight)"
        )


def _check_quantize_inputs(args: EncodeArgs) -> tuple[int, int, int]:
    """Shapes and dtypes only (fake-tensor safe); returns (out_features, in_features, n_groups)."""
    weight, codebooks, widths, row_code_offsets, row_level_offsets, group_size, n_code_bytes = args
    if weight.dim() != 2 or not weight.is_floating_point() or weight.shape[0] != widths.shape[0]:
        raise ConfigError(
            f"quantize_codes weight is {weight.dtype} {list(weight.shape)}; expected a floating-point "
            f"[out_features = {widths.shape[0]}, in_features] matrix"
        )
    out_features, in_features = int(weight.shape[0]), int(weight.shape[1])
    n_groups = 0 if group_size == 0 else -(-in_features // group_size)
    check_buffers(LowBitArgs(
        codes=weight.new_empty(0, dtype=torch.uint8), codebooks=codebooks,
        scales=weight.new_empty((out_features, n_groups), dtype=torch.float16), widths=widths,
        row_code_offsets=row_code_offsets, row_level_offsets=row_level_offsets, in_features=in_features,
        group_size=group_size,
    ))  # fmt: skip
    if n_code_bytes < 0:
        raise ConfigError(f"quantize_codes n_code_bytes={n_code_bytes}; expected row_code_offsets[-1] (>= 0)")
    return out_features, in_features, n_groups


def quantize_codes_reference(*encode: Any) -> tuple[Tensor, Tensor]:
    """Encode (``encode``: the :class:`EncodeArgs`) ``weight`` [out, in] against the rows' codebooks: (uint8 packed codes, float16 scales [out, n_groups]).

    float32 throughout so every device can match it bit for bit: scale = float16(absmax of the group) (0 for an
    all-zero group, whose values then encode as 0), value = w / float32(scale), and the code is the number of
    midpoints ``(level[k] + level[k + 1]) * 0.5`` strictly below the value (a tie goes to the lower level).
    Codebooks must be ascending per row (the format's rule). This is the encode of the serving path (re-encoding
    a weight against known codebooks); the mapping in lowra.sdk.quant.base.fit fits codebooks in float64 and
    stays the spec of what it produces.
    """
    args = EncodeArgs(*encode)
    if _load_native_once(args.weight.device):
        return torch.ops.lowra.quantize_codes(*args)
    out_features, in_features, n_groups = _check_quantize_inputs(args)
    weight, codebooks, widths, row_code_offsets, row_level_offsets, group_size, n_code_bytes = args
    if int(row_code_offsets[-1]) != n_code_bytes:
        raise ConfigError(
            f"quantize_codes n_code_bytes={n_code_bytes} but row_code_offsets[-1]={int(row_code_offsets[-1])}; "
            "pass QuantizedWeight.row_code_offsets[-1]"
        )
    device = weight.device
    w = weight.float()
    if group_size:
        padded = torch.nn.functional.pad(w.abs(), (0, n_groups * group_size - in_features))
        scales = padded.view(out_features, n_groups, group_size).amax(2).to(torch.float16)
        element_scale = scales.float().repeat_interleave(group_size, 1)[:, :in_features]
        values = torch.where(element_scale == 0, torch.zeros_like(w), w / element_scale)
    else:
        scales = torch.empty(out_features, 0, dtype=torch.float16, device=device)
        values = w
    codes = torch.zeros(n_code_bytes, dtype=torch.uint8, device=device)
    levels = codebooks.float()
    for width in CODED_WIDTHS:
        rows = torch.nonzero(widths == width).flatten()
        if rows.numel() == 0:
            continue
        level_index = row_level_offsets[rows].unsqueeze(1) + torch.arange(1 << width, device=device)
        books = levels.index_select(0, level_index.flatten()).view(-1, 1 << width)
        thresholds = ((books[:, 1:] + books[:, :-1]) * 0.5).contiguous()
        # searchsorted (left) on ascending midpoints = how many midpoints are strictly below the value.
        index = torch.searchsorted(thresholds, values.index_select(0, rows).contiguous())
        per_byte = 8 // width
        nbytes = (in_features * width + 7) // 8
        index = torch.nn.functional.pad(index, (0, nbytes * per_byte - in_features)).view(-1, nbytes, per_byte)
        shifts = torch.arange(0, 8, width, device=device)
        packed = (index << shifts).sum(-1).to(torch.uint8)
        byte_index = row_code_offsets[rows].unsqueeze(1) + torch.arange(nbytes, device=device)
        codes.index_copy_(0, byte_index.flatten(), packed.flatten())
    return codes, scales


_LIB.impl("dequantize", dequantize_reference, "CompositeExplicitAutograd")
_LIB.impl("lowbit_linear", lowbit_linear_reference, "CompositeExplicitAutograd")
_LIB.impl("lowbit_linear_grad_input", lowbit_linear_grad_input_reference, "CompositeExplicitAutograd")
_LIB.impl("quantize_codes", quantize_codes_reference, "CompositeExplicitAutograd")


def out_variant(op: Any) -> Any:
    """The ``.out`` overload's implementation of a functional op: compute, then resize and fill ``out``."""

    def run(*args: Any, out: Tensor) -> Tensor:
        result = op(*args)
        out.resize_(result.shape).copy_(result)
        return out

    return run


_LIB.impl("dequantize.out", out_variant(lambda *a: torch.ops.lowra.dequantize(*a)), "CompositeExplicitAutograd")
_LIB.impl("lowbit_linear.out", out_variant(lambda *a: torch.ops.lowra.lowbit_linear(*a)), "CompositeExplicitAutograd")


def lowbit_linear_planar_reference(x: Tensor, *packed_and_bias: Any) -> Tensor:
    """``lowbit_linear`` of codes in the kernels' layout: the 2-bit rows' bytes are mapped back, then the reference."""
    *packed, bias = packed_and_bias
    args = LowBitArgs(*packed)
    check_buffers(args)
    sizes = args.row_code_offsets[1:] - args.row_code_offsets[:-1]
    two_bit = torch.repeat_interleave(args.widths == 2, sizes)
    table = torch.from_numpy(FILE_BYTE).to(args.codes.device)
    codes = torch.where(two_bit, table[args.codes.long()], args.codes)
    return lowbit_linear_reference(x, *args._replace(codes=codes), bias)


def _check_side_branch(x: Tensor, down: Tensor, up: Tensor, out_features: int) -> None:
    rank = down.shape[0] if down.dim() == 2 else -1
    if (down.dim() != 2 or up.dim() != 2 or down.shape[1] != x.shape[-1] or tuple(up.shape) != (out_features, rank)
            or down.dtype not in (torch.float32, torch.float16) or up.dtype != down.dtype):
        raise ConfigError(
            f"side-branch factors down {down.dtype} {list(down.shape)} / up {up.dtype} {list(up.shape)}; expected "
            f"[rank, {x.shape[-1]}] and [{out_features}, rank], both float32 or both float16")


def _side_branch(x: Tensor, down: Tensor, up: Tensor) -> Tensor:
    """``(x @ down^T) @ up^T`` in float32 (float16 factors are converted exactly)."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, down.float()), up.float())


def lowbit_linear_planar_lora_reference(x: Tensor, *packed_bias_factors: Any) -> Tensor:
    """The planar product plus ``(x @ down^T) @ up^T``."""
    *packed_and_bias, down, up = packed_bias_factors
    y = lowbit_linear_planar_reference(x, *packed_and_bias)
    _check_side_branch(x, down, up, y.shape[-1])
    return y + _side_branch(x, down, up)


def lowbit_linear_blocked_reference(x: Tensor, *packed_and_bias: Any) -> Tensor:
    """``lowbit_linear`` of codes in the kernels' BLOCKED layout: the bytes are put back in row order, then the
    planar reference."""
    *packed, bias = packed_and_bias
    args = LowBitArgs(*packed)
    check_buffers(args)
    order = torch.from_numpy(blocked_code_order(args.widths.cpu().numpy(), args.in_features)).to(args.codes.device)
    rows = torch.empty_like(args.codes)
    rows[order] = args.codes
    return lowbit_linear_planar_reference(x, *args._replace(codes=rows), bias)


def lowbit_linear_blocked_lora_reference(x: Tensor, *packed_bias_factors: Any) -> Tensor:
    """The blocked product plus ``(x @ down^T) @ up^T``."""
    *packed_and_bias, down, up = packed_bias_factors
    y = lowbit_linear_blocked_reference(x, *packed_and_bias)
    _check_side_branch(x, down, up, y.shape[-1])
    return y + _side_branch(x, down, up)


def unpack4_channels(codes: Tensor, books: Tensor, length: int) -> Tensor:
    """[rank, ceil(length / 2)] uint8 codes and [rank, 16] float16 books -> float32 [rank, length] channel values."""
    nibbles = torch.stack((codes & 15, codes >> 4), dim=-1).reshape(codes.shape[0], -1)[:, :length].long()
    return torch.gather(books.float(), 1, nibbles)


def _check_side_branch4(x: Tensor, out_features: int, down_codes: Tensor, down_books: Tensor, up_codes: Tensor,
                        up_books: Tensor) -> None:  # fmt: skip
    rank = down_codes.shape[0] if down_codes.dim() == 2 else -1
    ok = (down_codes.dtype == up_codes.dtype == torch.uint8 and down_books.dtype == up_books.dtype == torch.float16
          and tuple(down_codes.shape) == (rank, -(-x.shape[-1] // 2)) and tuple(up_codes.shape)
          == (rank, -(-out_features // 2)) and tuple(down_books.shape) == tuple(up_books.shape) == (rank, 16))
    if not ok:
        raise ConfigError(
            f"packed side-branch factors {list(down_codes.shape)} / {list(down_books.shape)} / {list(up_codes.shape)} "
            f"/ {list(up_books.shape)}; expected uint8 [rank, {-(-x.shape[-1] // 2)}], float16 [rank, 16], uint8 "
            f"[rank, {-(-out_features // 2)}], float16 [rank, 16]")


def lowbit_linear_blocked_lora4_reference(x: Tensor, *packed_bias_factors: Any) -> Tensor:
    """The blocked product plus ``(x @ down^T) @ up^T`` with the factors decoded from their 4-bit codes."""
    *packed_and_bias, down_codes, down_books, up_codes, up_books = packed_bias_factors
    y = lowbit_linear_blocked_reference(x, *packed_and_bias)
    _check_side_branch4(x, y.shape[-1], down_codes, down_books, up_codes, up_books)
    down = unpack4_channels(down_codes, down_books, x.shape[-1])
    up = unpack4_channels(up_codes, up_books, y.shape[-1]).T
    return y + _side_branch(x, down, up)


for _name, _reference in (("lowbit_linear_planar", lowbit_linear_planar_reference),
                          ("lowbit_linear_planar_lora", lowbit_linear_planar_lora_reference),
                          ("lowbit_linear_blocked", lowbit_linear_blocked_reference),
                          ("lowbit_linear_blocked_lora", lowbit_linear_blocked_lora_reference),
                          ("lowbit_linear_blocked_lora4", lowbit_linear_blocked_lora4_reference)):
    _LIB.impl(_name, _reference, "CompositeExplicitAutograd")
    _LIB.impl(f"{_name}.out", out_variant(_reference), "CompositeExplicitAutograd")


def _check_f16_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    if weight.dtype != torch.float16 or weight.dim() != 2:
        raise ConfigError(
            f"f16_linear weight is {weight.dtype} {list(weight.shape)}; expected a float16 [out, in] matrix")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1] or x.dtype != torch.float32:
        raise ConfigError(f"f16_linear input is {x.dtype} {list(x.shape)}; expected float32 [..., {weight.shape[1]}]")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (weight.shape[0],)):
        raise ConfigError(f"f16_linear bias is {bias.dtype} {list(bias.shape)}; expected float32 [{weight.shape[0]}]")


def f16_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ float32(weight)^T (+ bias)``: float16 -> float32 is exact, so this is the float32 linear of the values."""
    _check_f16_linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight.float(), bias)


_LIB.impl("f16_linear", f16_linear_reference, "CompositeExplicitAutograd")


def _check_q8(weight: Tensor, scales: Tensor) -> None:
    if (weight.dtype != torch.int8 or weight.dim() != 2 or weight.shape[1] % Q8_BLOCK or scales.dtype != torch.float16
            or tuple(scales.shape) != (weight.shape[0], weight.shape[1] // Q8_BLOCK)):
        raise ConfigError(
            f"8-bit rows {weight.dtype} {list(weight.shape)} with scales {scales.dtype} {list(scales.shape)}; expected "
            f"int8 [out, in] (in a multiple of {Q8_BLOCK}) and float16 [out, in / {Q8_BLOCK}]")


def q8_dequantize_reference(weight: Tensor, scales: Tensor) -> Tensor:
    """float32 [out, in]: each code times its block's scale (formats.int8_rows.dequantize_q8, in torch)."""
    _check_q8(weight, scales)
    values = weight.float().reshape(weight.shape[0], -1, Q8_BLOCK) * scales.float().unsqueeze(-1)
    return values.reshape(weight.shape)


def q8_linear_reference(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ dequantize(weight, scales)^T (+ bias)``."""
    _check_q8(weight, scales)
    if x.dim() < 1 or x.shape[-1] != weight.shape[1] or x.dtype != torch.float32:
        raise ConfigError(f"q8_linear input is {x.dtype} {list(x.shape)}; expected float32 [..., {weight.shape[1]}]")
    return torch.nn.functional.linear(x, q8_dequantize_reference(weight, scales), bias)


def q8_embedding_reference(weight: Tensor, scales: Tensor, indices: Tensor) -> Tensor:
    """Rows ``indices`` of ``dequantize(weight, scales)``: float32 [*indices.shape, in]."""
    _check_q8(weight, scales)
    return q8_dequantize_reference(weight[indices.reshape(-1)], scales[indices.reshape(-1)]).reshape(
        *indices.shape, weight.shape[1])


_LIB.impl("q8_linear", q8_linear_reference, "CompositeExplicitAutograd")
_LIB.impl("q8_linear.out", out_variant(q8_linear_reference), "CompositeExplicitAutograd")
_LIB.impl("q8_embedding", q8_embedding_reference, "CompositeExplicitAutograd")
_LIB.impl("q8_embedding.out", out_variant(q8_embedding_reference), "CompositeExplicitAutograd")
_LIB.impl("f16_linear.out", out_variant(f16_linear_reference), "CompositeExplicitAutograd")


# ------------------------------------------------------------------------------------------------ fake kernels
@torch.library.register_fake(f"{NAMESPACE}::dequantize", lib=_LIB)
def _dequantize_fake(*packed: Any) -> Tensor:
    args = LowBitArgs(*packed)
    return args.codes.new_empty((check_buffers(args), args.in_features), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::lowbit_linear", lib=_LIB)
def _lowbit_linear_fake(x: Tensor, *packed_and_bias: Any) -> Tensor:
    args = LowBitArgs(*packed_and_bias[:-1])
    out_features = check_buffers(args)
    _check_input(x, args.in_features)
    return x.new_empty((*x.shape[:-1], out_features))


def _lowbit_linear_lora_fake(x: Tensor, *packed_bias_factors: Any) -> Tensor:
    *packed_and_bias, down, up = packed_bias_factors
    y = _lowbit_linear_fake(x, *packed_and_bias)
    _check_side_branch(x, down, up, y.shape[-1])
    return y


for _layout in ("planar", "blocked"):
    torch.library.register_fake(f"{NAMESPACE}::lowbit_linear_{_layout}", _lowbit_linear_fake, lib=_LIB)
    torch.library.register_fake(f"{NAMESPACE}::lowbit_linear_{_layout}_lora", _lowbit_linear_lora_fake, lib=_LIB)


@torch.library.register_fake(f"{NAMESPACE}::lowbit_linear_blocked_lora4", lib=_LIB)
def _lowbit_linear_lora4_fake(x: Tensor, *packed_bias_factors: Any) -> Tensor:
    *packed_and_bias, down_codes, down_books, up_codes, up_books = packed_bias_factors
    y = _lowbit_linear_fake(x, *packed_and_bias)
    _check_side_branch4(x, y.shape[-1], down_codes, down_books, up_codes, up_books)
    return y


@torch.library.register_fake(f"{NAMESPACE}::lowbit_linear_grad_input", lib=_LIB)
def _lowbit_linear_grad_input_fake(grad_out: Tensor, *packed: Any) -> Tensor:
    args = LowBitArgs(*packed)
    _check_grad_out(grad_out, check_buffers(args))
    return grad_out.new_empty((*grad_out.shape[:-1], args.in_features))


@torch.library.register_fake(f"{NAMESPACE}::f16_linear", lib=_LIB)
def _f16_linear_fake(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    _check_f16_linear(x, weight, bias)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::q8_linear", lib=_LIB)
def _q8_linear_fake(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    _check_q8(weight, scales)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::q8_embedding", lib=_LIB)
def _q8_embedding_fake(weight: Tensor, scales: Tensor, indices: Tensor) -> Tensor:
    _check_q8(weight, scales)
    return weight.new_empty((*indices.shape, weight.shape[1]), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::quantize_codes", lib=_LIB)
def _quantize_codes_fake(*encode: Any) -> tuple[Tensor, Tensor]:
    args = EncodeArgs(*encode)
    out_features, _, n_groups = _check_quantize_inputs(args)
    return (
        args.weight.new_empty((args.n_code_bytes,), dtype=torch.uint8),
        args.weight.new_empty((out_features, n_groups), dtype=torch.float16),
    )


# ------------------------------------------------------------------------------------------------ autograd
def _lowbit_linear_setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    x, *packed, bias = inputs
    args = LowBitArgs(*packed)
    # Only the packed buffers are saved (they are held by the module anyway): the weight is decoded again in
    # backward rather than kept alive across the whole forward pass.
    ctx.save_for_backward(*(getattr(args, name) for name in _DTYPES))
    ctx.in_features = args.in_features
    ctx.group_size = args.group_size
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lowbit_linear_backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    args = LowBitArgs(*ctx.saved_tensors, ctx.in_features, ctx.group_size)
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.lowra.lowbit_linear_grad_input(grad_out, *args).to(ctx.x_dtype)
    if ctx.has_bias and ctx.needs_input_grad[-1]:
        # A bias is frozen like the rest of the base in lowra, but a caller that asks for its gradient gets it.
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, *(None for _ in args), grad_bias


torch.library.register_autograd(
    f"{NAMESPACE}::lowbit_linear",
    _lowbit_linear_backward,
    setup_context=_lowbit_linear_setup_context,
    lib=_LIB,
)
