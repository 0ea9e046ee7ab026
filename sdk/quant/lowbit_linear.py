"""A frozen linear layer whose weight stays packed below 2 bits in memory (LowRA's training-time base).

``LowBitLinear`` holds exactly the buffers of a :class:`QuantizedWeight` (uint8 codes, float16 codebooks and
scales, uint8 widths, int64 row offsets) and decodes the weight inside ``lowra::lowbit_linear`` on every call,
so no fp32 weight outlives a forward or backward. It exposes ``in_features`` / ``out_features`` / ``forward``
and nothing trainable, which is all ``LoraLinear`` needs from a base; it registers as a linear in
:mod:`lowra.sdk.modules`, so target selection, LoRA and re-quantization treat it like ``nn.Linear``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from lowra.device_runtime.formats.quantized_base import QuantizedBase, read_quantized_base, recovered_weight
from lowra.device_runtime.formats.constants import CODED_WIDTHS
from lowra.device_runtime.formats.quantized_weight import QuantizedWeight
from lowra.sdk.errors import ConfigError
from lowra.sdk.modules import is_linear, is_linear_wrapper, module_at, register_linear
from lowra.sdk.quant import ops as _ops  # also registers torch.ops.lowra.*

__all__ = ["LowBitLinear", "load_quantized_base", "lowbit_layers", "replace_linears"]

# Floating buffers whose float16 values *are* the format: a model-wide ``.to(dtype)`` must not round them.
_FORMAT_FLOAT_BUFFERS = ("codebooks", "scales", "recovery_A", "recovery_B")


def _row_offsets(widths: Tensor, in_features: int) -> tuple[Tensor, Tensor]:
    w = widths.long()
    zero = torch.zeros(1, dtype=torch.int64, device=widths.device)
    code_offsets = torch.cat([zero, torch.cumsum((in_features * w + 7) // 8, 0)])
    level_offsets = torch.cat([zero, torch.cumsum(1 << w, 0)])
    return code_offsets, level_offsets


def with_recovery(x: Tensor, y: Tensor, a: Tensor | None, b: Tensor | None, scaling: float) -> Tensor:
    """``y`` plus a recovery adapter's term ``scaling * (x @ A^T) @ B^T`` (``y`` itself when there is none)."""
    if a is None:
        return y
    low = torch.nn.functional.linear(x, a.to(x.dtype))
    return y + torch.nn.functional.linear(low, b.to(x.dtype)) * scaling


@register_linear
class LowBitLinear(nn.Module):
    """``y = x @ W^T + bias`` with ``W`` kept as per-row 1/2/4-bit codes, codebooks and group scales.

    Build it with :meth:`from_quantized` (or :func:`replace_linears` for a whole model). The buffers follow
    ``.to(device)``; a dtype cast (``model.half()``) converts the optional bias only, never the float16
    codebooks and scales, because their exact values are the format.
    """

    codes: Tensor
    codebooks: Tensor
    scales: Tensor
    widths: Tensor
    row_code_offsets: Tensor
    row_level_offsets: Tensor
    bias: Tensor | None

    def __init__(
        self,
        *,
        in_features: int,
        group_size: int,
        codes: Tensor,
        codebooks: Tensor,
        scales: Tensor,
        widths: Tensor,
        bias: Tensor | None = None,
    ) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.group_size = int(group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("codebooks", codebooks)
        self.register_buffer("scales", scales)
        self.register_buffer("widths", widths)
        if widths.dtype != torch.uint8 or widths.dim() != 1:
            raise ConfigError(
                f"LowBitLinear widths are {widths.dtype} with shape {list(widths.shape)}; expected uint8 [out] "
                f"(one width in {CODED_WIDTHS} per output row)"
            )
        # Derived from widths, so not saved: a loaded state dict recomputes them (hook below).
        code_offsets, level_offsets = _row_offsets(widths, self.in_features)
        self.register_buffer("row_code_offsets", code_offsets, persistent=False)
        self.register_buffer("row_level_offsets", level_offsets, persistent=False)
        self.register_buffer("bias", bias)
        # The base's accuracy-recovery adapter (a version-2 base file, ``lowra recover``): part of the frozen base.
        self.register_buffer("recovery_A", None)
        self.register_buffer("recovery_B", None)
        self.recovery_scaling = 0.0
        self._check()
        self.out_features = int(widths.shape[0])
        self.register_load_state_dict_post_hook(_refresh_after_load)

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_quantized(
        cls, qw: QuantizedWeight, bias: Tensor | None = None, device: torch.device | str | None = None
    ) -> "LowBitLinear":
        """Copy a validated :class:`QuantizedWeight` into buffers (on ``device``, default CPU)."""
        qw.validate("LowBitLinear.from_quantized")

        def tensor(array: np.ndarray) -> Tensor:
            return torch.from_numpy(np.array(array, copy=True)).to(device)

        if bias is not None:
            if bias.dim() != 1 or bias.shape[0] != qw.out_features:
                raise ConfigError(
                    f"bias has shape {list(bias.shape)}; expected [{qw.out_features}] (one value per output row)"
                )
            bias = bias.detach().to(device=device or bias.device).clone()
        return cls(
            in_features=qw.in_features,
            group_size=qw.group_size,
            codes=tensor(qw.codes),
            codebooks=tensor(qw.codebooks),
            scales=tensor(qw.scales),
            widths=tensor(qw.widths),
            bias=bias,
        )

    def to_quantized(self) -> QuantizedWeight:
        """The buffers as a numpy :class:`QuantizedWeight` (copies, on the CPU)."""

        def array(t: Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().copy()

        return QuantizedWeight(
            out_features=self.out_features,
            in_features=self.in_features,
            group_size=self.group_size,
            widths=array(self.widths),
            codes=array(self.codes),
            codebooks=array(self.codebooks),
            scales=array(self.scales),
        )

    def _check(self) -> None:
        """Shapes and dtypes (ConfigError), then the values the offsets depend on."""
        out_features = _ops.check_buffers(self.packed())
        bad = sorted(set(torch.unique(self.widths).tolist()) - set(CODED_WIDTHS))
        if bad:
            raise ConfigError(f"LowBitLinear row widths {bad} are not allowed; expected values in {CODED_WIDTHS}")
        for name, offsets in (("codes", self.row_code_offsets), ("codebooks", self.row_level_offsets)):
            expected, got = int(offsets[-1]), getattr(self, name).numel()
            if got != expected:
                raise ConfigError(
                    f"LowBitLinear {name} has {got} entries but the widths of its {out_features} rows imply "
                    f"{expected}; codes, codebooks and widths must come from one QuantizedWeight"
                )
        if self.bias is not None and tuple(self.bias.shape) != (out_features,):
            raise ConfigError(f"LowBitLinear bias has shape {list(self.bias.shape)}; expected [{out_features}]")

    # ------------------------------------------------------------------------------------------- compute
    def packed(self) -> _ops.LowBitArgs:
        """The buffers as the ``lowra::`` ops take them (``torch.ops.lowra.dequantize(*layer.packed())``)."""
        return _ops.LowBitArgs(
            self.codes, self.codebooks, self.scales, self.widths,
            self.row_code_offsets, self.row_level_offsets, self.in_features, self.group_size,
        )  # fmt: skip

    def set_recovery(self, a: Tensor, b: Tensor, scaling: float) -> None:
        """Attach the base's recovery factors (float16 ``A [rank, in]``, ``B [out, rank]``): the layer then computes
        ``x @ (decode + scaling * B @ A)^T + bias``, frozen like the rest of the base."""
        rank = a.shape[0]
        if a.shape != (rank, self.in_features) or b.shape != (self.out_features, rank):
            raise ConfigError(
                f"recovery factors {list(a.shape)} / {list(b.shape)} do not fit a [{self.out_features}, "
                f"{self.in_features}] layer; expected [rank, {self.in_features}] and [{self.out_features}, rank]"
            )
        device = self.codes.device
        self.recovery_A = a.detach().to(device=device, dtype=torch.float16).clone()
        self.recovery_B = b.detach().to(device=device, dtype=torch.float16).clone()
        self.recovery_scaling = float(scaling)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.ops.lowra.lowbit_linear(x, *self.packed(), self.bias)
        return with_recovery(x, y, self.recovery_A, self.recovery_B, self.recovery_scaling)

    def dequantize(self) -> Tensor:
        """The decoded float32 weight ``[out, in]`` (a fresh tensor; the layer keeps only the packed buffers)."""
        return torch.ops.lowra.dequantize(*self.packed())

    def effective_weight(self) -> Tensor:
        """The float32 weight the layer computes with: the decode plus the recovery adapter's ``scaling * B @ A``,
        bit for bit what the device runtime decodes from the same file (:func:`recovered_weight`)."""
        weight = self.dequantize()
        if self.recovery_A is None:
            return weight
        merged = recovered_weight(weight.cpu().numpy(), self.recovery_A.cpu().numpy(), self.recovery_B.cpu().numpy(),
                                  self.recovery_scaling)
        return torch.from_numpy(merged).to(weight.device)

    def nbytes(self) -> int:
        """Bytes this layer holds in memory: every buffer, including row offsets and the bias."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> "LowBitLinear":
        kept = {name: getattr(self, name) for name in _FORMAT_FLOAT_BUFFERS if getattr(self, name) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                # Undo the cast but keep the move: re-rounding float16 levels would silently change the weight.
                setattr(self, name, before.to(device=after.device))
        return self

    def extra_repr(self) -> str:
        mean_bits = float(self.widths.float().mean()) if self.out_features else 0.0
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"mean_code_bits={mean_bits:.2f}, bias={self.bias is not None}"
        )


def _refresh_after_load(module: "LowBitLinear", incompatible_keys: Any) -> None:
    code_offsets, level_offsets = _row_offsets(module.widths, module.in_features)
    module.row_code_offsets, module.row_level_offsets = code_offsets, level_offsets
    module.out_features = int(module.widths.shape[0])
    module._check()


# ------------------------------------------------------------------------------------------------ model level
def lowbit_layers(model: nn.Module) -> dict[str, LowBitLinear]:
    """Every LowBitLinear keyed by its module path (``...q_proj.base`` when wrapped by LoRA)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LowBitLinear)}


def _tied_parameter_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {pid for pid, count in seen.items() if count > 1}


def replace_linears(model: nn.Module, quantized: Mapping[str, QuantizedWeight]) -> nn.Module:
    """Swap the linear at each path for a :class:`LowBitLinear` holding its quantized weight, in place.

    A path may name a plain ``nn.Linear``, a ``LoraLinear`` (its ``.base`` is replaced, adapters kept) or an
    existing ``LowBitLinear`` (re-quantized). The bias is kept. Everything is checked before anything changes,
    so a bad entry leaves the model untouched. The replaced fp32 weights are released (nothing here keeps a
    reference), which is the point: the base then costs its packed bytes.
    """
    tied = _tied_parameter_ids(model)
    plan: list[tuple[str, LowBitLinear]] = []
    for path, qw in quantized.items():
        module = module_at(model, path)
        target_path, target = (f"{path}.base", module.base) if is_linear_wrapper(module) else (path, module)
        if not is_linear(target):
            raise ConfigError(
                f"module {path!r} is a {type(target).__name__}; expected nn.Linear, LowBitLinear or a LoraLinear "
                "wrapping one"
            )
        if (qw.out_features, qw.in_features) != (target.out_features, target.in_features):
            raise ConfigError(
                f"quantized weight for {path!r} is [{qw.out_features}, {qw.in_features}] but the layer is "
                f"[{target.out_features}, {target.in_features}]; quantize this layer's own weight"
            )
        if isinstance(target, nn.Linear):
            if id(target.weight) in tied:
                raise ConfigError(
                    f"the weight of {path!r} is tied to another module (e.g. embeddings shared with the output "
                    "head); quantizing it would untie them. Leave it out of the mapping"
                )
            device = target.weight.device
        else:
            device = target.codes.device
        bias = None if target.bias is None else target.bias.detach().float()
        plan.append((target_path, LowBitLinear.from_quantized(qw, bias=bias, device=device)))
    for target_path, layer in plan:
        model.set_submodule(target_path, layer)
    return model


@torch.no_grad()
def load_quantized_base(model: nn.Module, quantized: str | Path | QuantizedBase) -> QuantizedBase:
    """Turn ``model`` (the same architecture, e.g. ``load_base(...).model``) into the base stored in a quantized
    base file (``lowra quantize-base``), in place, and return the file's contents.

    Every quantized layer becomes a :class:`LowBitLinear` and every dense tensor (embeddings, norms, head) takes
    the file's float16 value, so the torch model computes with exactly the weights the device runtime decodes from
    the same file and adapters trained on it carry the file's fingerprint. A version-2 file's recovery adapter is
    attached to its layers (:meth:`LowBitLinear.set_recovery`) and is part of that base. Everything is checked against the
    model before anything changes: a file for another architecture leaves the model untouched.
    """
    qb = quantized if isinstance(quantized, QuantizedBase) else read_quantized_base(Path(quantized))
    where = "the quantized base" if isinstance(quantized, QuantizedBase) else str(quantized)
    state = model.state_dict()
    modules = dict(model.named_modules())
    for name, qw in qb.layers.items():
        layer = modules.get(name)
        base = layer.base if is_linear_wrapper(layer) else layer
        if not is_linear(base) or (base.out_features, base.in_features) != (
            qw.out_features, qw.in_features
        ):
            found = "nothing" if base is None else f"{type(base).__name__}"
            if is_linear(base):
                found += f" [{base.out_features}, {base.in_features}]"
            raise ConfigError(
                f"{where} holds layer {name!r} [{qw.out_features}, {qw.in_features}] but the model has {found} there; "
                "load the quantized base into the model it was quantized from (same --base)"
            )
    dense = dict(qb.dense)
    dense.update({alias: qb.dense[target] for alias, target in qb.aliases.items()})
    for name, arr in dense.items():
        key = name if name in state else name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        if key not in state:
            raise ConfigError(f"{where} holds dense tensor {name!r}, which this model does not have")
        if tuple(state[key].shape) != tuple(np.shape(arr)):
            raise ConfigError(
                f"{where}: dense tensor {name!r} is {list(np.shape(arr))}, the model's is {list(state[key].shape)}"
            )
    replace_linears(model, qb.layers)
    if qb.recovery is not None:
        modules = dict(model.named_modules())
        for name, (a, b) in qb.recovery.factors.items():
            layer = modules[name]
            (layer.base if is_linear_wrapper(layer) else layer).set_recovery(
                torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b)), qb.recovery.scaling)
    state = model.state_dict(keep_vars=True)
    for name, arr in dense.items():
        key = name if name in state else name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        target = state[key]
        target.data.copy_(torch.from_numpy(np.array(arr)).to(target.dtype))
    return qb
