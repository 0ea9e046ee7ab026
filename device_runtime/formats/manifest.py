"""The JSON manifest both exported model folders carry (``lowra_onnx.json``, ``manifest.json``): reading it
with the format and version checks, and the optional prompt template it records.

Each folder's own keys are defined by :mod:`.onnx_manifest` and :mod:`.executorch_manifest`; what they share
(a JSON object with ``format`` and ``format_version``, refused with the reader's own error type otherwise, and
``prompt_template``) is here once.
"""
from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Mapping

from lowra.device_runtime.errors import LowraError
from lowra.device_runtime.formats.constants import CHATML_PROMPT_TEMPLATE

PROMPT_TEMPLATE_KEY = "prompt_template"


def read_manifest_json(
    folder: Path, file_name: str, *, format_name: str, version: int, writer: str, error: type[LowraError]
) -> dict[str, Any]:
    """``folder/file_name`` as a dict, refused with ``error`` when missing, not JSON, or not ``format_name``
    version ``version``. ``writer`` says what writes such a folder (for the missing-file message)."""
    path = folder / file_name
    if not path.is_file():
        raise error(f"{folder} has no {file_name}; expected a folder written by {writer}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); re-export the model") from exc
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, expected an object; re-export the model")
    if data.get("format") != format_name or data.get("format_version") != version:
        raise error(
            f"{path}: format {data.get('format')!r} version {data.get('format_version')!r}; this runtime reads "
            f"{format_name!r} version {version}. Re-export the model or upgrade lowra on the device"
        )
    return data


def prompt_template_of(manifest: Mapping[str, Any], where: str, error: type[LowraError]) -> str:
    """The manifest's ``prompt_template`` (a ``str.format`` pattern with one ``{prompt}`` field), or the ChatML
    template for manifests written before exporters recorded it. A malformed template is refused with ``error``."""
    template = manifest.get(PROMPT_TEMPLATE_KEY)
    if template is None:
        return CHATML_PROMPT_TEMPLATE
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except (TypeError, ValueError) as exc:
        raise error(f"{where}: {PROMPT_TEMPLATE_KEY} is not a format string ({exc}); re-export the model") from exc
    if fields != ["prompt"]:
        raise error(
            f"{where}: {PROMPT_TEMPLATE_KEY} has fields {fields}, expected exactly one {{prompt}}; re-export the model"
        )
    return template
