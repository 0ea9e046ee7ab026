"""Which linear layers a config targets: the one validation of a ``targets`` value (torch-free).

LoraConfig, QuantizeConfig and :func:`lowra.sdk.modules.linear_module_names` accept the same two spellings, so they
share this check; it lives outside :mod:`lowra.sdk.modules` because the configs must import without torch.
"""
from __future__ import annotations

from typing import Iterable

from lowra.sdk.errors import ConfigError

ALL_LINEAR = "all-linear"


def check_targets(targets: str | Iterable[str], owner: str = "targets") -> str | list[str]:
    """``"all-linear"`` or a non-empty list of module names (last path components), else ConfigError.

    ``owner`` names the field in the message (``"LoraConfig.targets"``). Returns the value normalized: the string
    itself or a new list.
    """
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            raise ConfigError(
                f"{owner}={targets!r} is not understood; expected {ALL_LINEAR!r} or a list of module names such as "
                "['q_proj', 'v_proj']"
            )
        return targets
    try:
        wanted = list(targets)
    except TypeError:
        wanted = None
    if not wanted or not all(isinstance(t, str) and t for t in wanted):
        raise ConfigError(
            f"{owner} must be {ALL_LINEAR!r} or a non-empty list of module names such as ['q_proj', 'v_proj'], "
            f"got {targets!r}"
        )
    return wanted
