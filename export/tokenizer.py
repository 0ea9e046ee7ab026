"""The tokenizer both exported model folders ship: ``tokenizer.json`` plus the prompt template the manifest records.

The template is :func:`lowra.sdk.training.prompts.prompt_template` of the same tokenizer the adapters were trained
with, so the device wraps a chat prompt exactly as training did (docs/FORMAT.md, ``prompt_template``).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from lowra.device_runtime.errors import ConfigError
from lowra.device_runtime.formats.constants import TOKENIZER_FILE
from lowra.sdk.training.prompts import prompt_template


def _load(path: Path) -> Any:
    """A transformers tokenizer for a tokenizer.json path or a model folder; the folder's tokenizer_config.json,
    when there is one, carries the chat template."""
    folder = path if path.is_dir() else path.parent
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path / TOKENIZER_FILE if path.is_dir() else path))


def save_tokenizer(tokenizer: Any, out_dir: Path) -> str:
    """Write ``tokenizer`` (a tokenizer.json path, a model folder holding one, or a transformers fast tokenizer) as
    ``out_dir/tokenizer.json``; return its prompt template for the manifest."""
    if isinstance(tokenizer, (str, Path)):
        path = Path(tokenizer)
        source = path / TOKENIZER_FILE if path.is_dir() else path
        if not source.is_file():
            raise ConfigError(f"tokenizer {source} does not exist; expected a tokenizer.json or a model folder")
        shutil.copyfile(source, out_dir / TOKENIZER_FILE)
        return prompt_template(_load(path))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError("tokenizer must be a path to tokenizer.json or a transformers fast tokenizer")
    backend.save(str(out_dir / TOKENIZER_FILE))
    return prompt_template(tokenizer)
