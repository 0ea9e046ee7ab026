"""The sdk <-> device boundary on a tiny model, and the CLI's refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowra.device_runtime import DeviceRuntime
from lowra.device_runtime.errors import BaseMismatchError
from lowra.sdk.adapters.model import lora_layers
from lowra.sdk.adapters.peft_io import save_adapter
from lowra.sdk.cli.commands import COMMANDS
from lowra.sdk.cli.main import main
from lowra.sdk.cli.parser import build_parser
from lowra.sdk.workflow import (
    apply_blob,
    base_dir_fingerprint,
    load_weights_into,
    model_fingerprint,
    sdk_merged_weight,
)

from tests.conftest import build_tiny_model
from tests.sdk.cli.conftest import LORA, make_blob, random_adapter


def test_fingerprints_agree_between_torch_and_files(tiny_base_dir):
    model = build_tiny_model()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert model_fingerprint(model, names) == base_dir_fingerprint(tiny_base_dir, names)
    other = build_tiny_model(seed=1)
    assert model_fingerprint(other, names) != base_dir_fingerprint(tiny_base_dir, names)


def test_device_merge_matches_sdk_and_adapter_logits(tiny_base_dir):
    model = build_tiny_model()
    factors = random_adapter(model)
    names = list(factors)
    c = make_blob(model, factors, model_fingerprint(model, names))
    runtime = DeviceRuntime(tiny_base_dir)
    runtime.load_user(c.blob_bytes)
    layers = lora_layers(model)
    for n in names:
        sdk = sdk_merged_weight(layers[n].base.weight, c.blob, n).numpy()
        np.testing.assert_allclose(runtime.weight(f"{n}.weight"), sdk, rtol=0, atol=1e-6)
    # Logits: blob as a LoRA adapter in torch == device-merged weights in a plain model.
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    apply_blob(model, c.blob, "blob")
    with torch.no_grad():
        lora_logits = model(ids).logits
    plain = build_tiny_model()
    load_weights_into(plain, {f"{n}.weight": runtime.weight(f"{n}.weight") for n in names})
    with torch.no_grad():
        merged_logits = plain(ids).logits
    torch.testing.assert_close(merged_logits, lora_logits, rtol=0, atol=1e-4)


def test_runtime_refuses_blob_for_another_base(tiny_base_dir):
    other = build_tiny_model(seed=5)
    factors = random_adapter(other)
    c = make_blob(other, factors, model_fingerprint(other, list(factors)))
    with pytest.raises(BaseMismatchError):
        DeviceRuntime(tiny_base_dir).load_user(c.blob_bytes)


def test_every_subcommand_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"train", "compress", "inspect", "merge", "generate", "demo"}
    assert set(sub.choices) == set(COMMANDS)  # every parsed command has a function, and no function is unreachable
    for name, p in sub.choices.items():
        assert p.description, name
        assert "--help" in p.format_help()


def test_inspect_a_quantized_base_and_its_recovery_adapter(tmp_path, capsys):
    """`lowra inspect` on a base file shows the base (not a blob parser's refusal): bits, widths, recovery."""
    from tests.device_runtime.native.test_liblowra import write_recovered_blob

    recovered = write_recovered_blob(tmp_path / "rec.safetensors")
    plain = tmp_path / "plain-rec.safetensors"
    assert main(["inspect", str(plain)]) == 0
    out = capsys.readouterr().out
    assert "lowra quantized base v1 (checksum and fingerprint ok)" in out and "recovery adapter  none" in out
    assert main(["inspect", str(recovered)]) == 0
    out = capsys.readouterr().out
    assert "lowra quantized base v3" in out and "rank 3 on 2 layers, compressed:" in out
    assert "codebooks         float16 levels, " in out
    assert main(["inspect", "--json", str(recovered)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["base"]["recovery"]["stored"] == "compressed blob" and doc["base"]["layers"] == 3
    assert doc["base"]["codebook_format"] == "float16"
    assert doc["base"]["bits"]["recovery_bytes"] > 0
    assert main(["inspect", "--trust", str(tmp_path), str(recovered)]) == 2  # nothing signed to verify
    assert "is not signed" in capsys.readouterr().err
    from lowra.sdk.signing import load_private_key, new_key, sign_bytes

    key = new_key(tmp_path / "keys", "server")
    signed_base = tmp_path / "rec.signed"
    signed_base.write_bytes(sign_bytes(recovered.read_bytes(), load_private_key(key.private_path), sequence=1))
    assert main(["inspect", "--trust", str(tmp_path / "keys"), str(signed_base)]) == 0
    out = capsys.readouterr().out
    assert "signature         verified" in out and "inner file: lowra quantized base v3" in out
    assert "rank 3 on 2 layers" in out
    doc = json.loads(main(["inspect", "--json", str(signed_base)]) == 0 and capsys.readouterr().out)
    assert doc["signed"]["claims"]["format"] == "lowra-base" and doc["base"]["recovery"]["modules"] == 2
    data = bytearray(recovered.read_bytes())
    data[-1] ^= 1
    recovered.write_bytes(bytes(data))
    assert main(["inspect", str(recovered)]) == 2  # the device reader's checks
    assert "sha256" in capsys.readouterr().err


@pytest.mark.parametrize("text, bits", [("1", 1.0), ("0.5", 0.5), ("float16", None), ("None", None)])
def test_recover_takes_bits_or_float16(text, bits):
    args = build_parser().parse_args(["recover", "--quantized-base", "b", "--out", "o", "--recovery-bits", text])
    assert args.recovery_bits == bits


@pytest.mark.parametrize("text", ["0", "-1", "17", "nan", "fp16"])
def test_recover_refuses_other_bits(text, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["recover", "--quantized-base", "b", "--out", "o", "--recovery-bits", text])
    assert "is not a number of bits in (0, 16] or 'float16'" in capsys.readouterr().err


def test_cli_compress_inspect_and_refusals(tiny_base_dir, tmp_path, capsys):
    model = build_tiny_model()
    factors = random_adapter(model)
    save_adapter(model, "u", tmp_path / "adapter", LORA)
    blob = tmp_path / "u.lowra"
    args = ["compress", "--adapter", str(tmp_path / "adapter"), "--base", str(tiny_base_dir), "--bits", "8.0",
            "--out", str(blob)]
    assert main(args) == 0
    assert "effective bits/param" in capsys.readouterr().out
    original = blob.read_bytes()

    # refuses to overwrite, and leaves the existing blob untouched
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert blob.read_bytes() == original

    # budget below what is storable: refused, nothing written
    low = tmp_path / "low.lowra"
    assert main(args[:-3] + ["0.001", "--out", str(low)]) == 2
    assert "below what any blob needs" in capsys.readouterr().err
    assert not low.exists() and not list(tmp_path.glob(".low.lowra*"))

    assert main(["inspect", str(blob), "--json", "--modules"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits"]["effective_bits"] <= 8.0
    assert info["metadata"]["adapter_id"] == "adapter"
    assert len(info["modules"]) == len(factors)

    corrupted = tmp_path / "bad.lowra"
    data = bytearray(original)
    data[-1] ^= 0xFF
    corrupted.write_bytes(bytes(data))
    assert main(["inspect", str(corrupted)]) == 2
    assert "corrupted" in capsys.readouterr().err

    assert main(["merge", "--blob", str(blob), "--base", str(tiny_base_dir), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "config.json").is_file()


def test_cli_missing_base_dir(tmp_path, capsys):
    assert main(["merge", "--blob", "x.lowra", "--base", str(tmp_path / "nope"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "does not exist" in err


def test_cli_missing_dataset(tmp_path, capsys):
    code = main(["train", "--user", str(tmp_path / "nobody"), "--out", str(tmp_path / "a"), "--base", str(tmp_path)])
    assert code == 2
    assert "nobody" in capsys.readouterr().err


def test_adapter_on_a_quantized_base_binds_to_its_decoded_weights(tmp_path):
    """Train-side LowBitLinear model and device runtime on the lowra-base file agree on the fingerprint and the
    merged weights, and the fp base is refused for that adapter."""
    from lowra.sdk.quant.base.apply import quantize_model
    from lowra.sdk.quant.base.config import QuantizeConfig
    from lowra.sdk.quant.lowbit_linear import replace_linears

    model = build_tiny_model()
    fp_dir = tmp_path / "fp"
    model.save_pretrained(fp_dir)
    quantized = quantize_model(model, QuantizeConfig(bits=8.0, group_size=32, calibration=None), progress=False)
    base_file = quantized.write(tmp_path / "base.lowra-base")
    replace_linears(model, quantized.layers)
    factors = random_adapter(model)
    c = make_blob(model, factors, model_fingerprint(model, list(factors)))
    runtime = DeviceRuntime(base_file)
    runtime.load_user(c.blob_bytes)
    layers = lora_layers(model)
    for n in factors:
        sdk = (layers[n].base.dequantize() + torch.from_numpy(c.blob.delta(n))).numpy()
        np.testing.assert_allclose(runtime.weight(f"{n}.weight"), sdk, rtol=0, atol=1e-6)
    with pytest.raises(BaseMismatchError):
        DeviceRuntime(fp_dir).load_user(c.blob_bytes)


def test_cli_train_compress_generate_on_a_quantized_base(tmp_path, capsys, tiny_tokenizer, tiny_user_dir):
    """`--quantized-base` end to end: the adapter trains on the low-bit base, binds to the file, and the fp base
    refuses it."""
    from lowra.device_runtime import read_blob
    from lowra.device_runtime.runtime import BaseWeights

    base_dir = tmp_path / "tiny-base"
    build_tiny_model().save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    qfile = tmp_path / "base-q.safetensors"
    assert main(["quantize-base", "--base", str(base_dir), "--bits", "8", "--group-size", "16", "--out", str(qfile)]) == 0
    common = ["--base", str(base_dir), "--quantized-base", str(qfile)]
    assert main(["train", "--user", str(tiny_user_dir), "--out", str(tmp_path / "adapter"), "--steps", "2",
                 "--rank", "4", *common]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(qfile)
    blob = tmp_path / "u.lowra"
    assert main(["compress", "--adapter", str(tmp_path / "adapter"), "--bits", "8", "--out", str(blob), *common]) == 0
    parsed = read_blob(blob)
    modules = [m.name for m in parsed.modules]
    assert parsed.base_fingerprint == BaseWeights(qfile).fingerprint(modules)
    capsys.readouterr()
    assert main(["generate", "--prompt", "Tell me about cheese.", "--blob", str(blob), "--max-new-tokens", "4",
                 *common]) == 0
    assert "merged adapter" in capsys.readouterr().err
    # the full-precision base is another base for this adapter
    assert main(["generate", "--prompt", "hi", "--blob", str(blob), "--base", str(base_dir)]) == 2
    assert "trained against base" in capsys.readouterr().err
    assert main(["train", "--user", str(tiny_user_dir), "--out", str(tmp_path / "a2"), *common[:2],
                 "--quantized-base", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_cli_recover_then_users_train_on_the_recovered_base(tmp_path, capsys, tiny_tokenizer, tiny_user_dir):
    """`lowra recover` writes a version-4 base (integer codebooks, its adapter compressed); a user's adapter trained on it binds to it (the recovery adapter is
    part of the base, under the user's), the plain base refuses that blob, and `lowra eval` names the recovery."""
    from lowra.device_runtime.errors import BaseMismatchError
    from lowra.device_runtime.formats.quantized_base import read_quantized_base

    base_dir = tmp_path / "tiny-base"
    build_tiny_model().save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    plain, recovered = tmp_path / "plain.safetensors", tmp_path / "recovered.safetensors"
    assert main(["quantize-base", "--base", str(base_dir), "--bits", "7", "--group-size", "0", "--calibration",
                 "none", "--out", str(plain)]) == 0
    capsys.readouterr()
    assert main(["recover", "--base", str(base_dir), "--quantized-base", str(plain), "--out", str(recovered),
                 "--steps", "6", "--rank", "2", "--batch-size", "2", "--length", "16", "--sequences", "4",
                 "--user", str(tiny_user_dir), "--recovery-bits", "16"]) == 0  # the tiny adapter's header needs ~7
    out = capsys.readouterr().out
    assert "recovery adapter rank 2 on 14 layers" in out and "recovered base" in out and "plain low-bit base" in out
    stored = read_quantized_base(recovered)
    assert stored.recovery.info["plain_fingerprint"] == read_quantized_base(plain).fingerprint
    assert stored.recovery.blob is not None and stored.metadata["format_version"] == "4"  # integer codebooks
    assert stored.codebook_format == "int"
    assert main(["inspect", str(recovered)]) == 0
    assert "codebooks         integers x 2**e per row (6 bits; 8 in 4-bit rows)" in capsys.readouterr().out
    assert main(["recover", "--base", str(base_dir), "--quantized-base", str(plain), "--out", str(recovered)]) == 2
    assert "already exists" in capsys.readouterr().err
    common = ["--base", str(base_dir), "--quantized-base", str(recovered)]
    assert main(["train", "--user", str(tiny_user_dir), "--out", str(tmp_path / "adapter"), "--steps", "2",
                 "--rank", "4", *common]) == 0
    blob = tmp_path / "u.lowra"
    assert main(["compress", "--adapter", str(tmp_path / "adapter"), "--bits", "8", "--out", str(blob), *common]) == 0
    DeviceRuntime(recovered).load_user(blob.read_bytes())
    with pytest.raises(BaseMismatchError):
        DeviceRuntime(plain).load_user(blob.read_bytes())
    capsys.readouterr()
    assert main(["eval", "--user", str(tiny_user_dir), "--blob", str(blob), *common]) == 0
    assert "base (quantized + recovery)" in capsys.readouterr().out


def test_cli_train_loftq_starts_the_adapter_on_the_base_residual(tmp_path, capsys, tiny_tokenizer, tiny_user_dir):
    import re

    base_dir = tmp_path / "tiny-base"
    build_tiny_model().save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    qfile = tmp_path / "q.safetensors"
    assert main(["quantize-base", "--base", str(base_dir), "--bits", "7", "--group-size", "0", "--calibration",
                 "none", "--out", str(qfile)]) == 0
    capsys.readouterr()
    assert main(["train", "--user", str(tiny_user_dir), "--out", str(tmp_path / "a"), "--steps", "1", "--rank", "4",
                 "--loftq", "--base", str(base_dir), "--quantized-base", str(qfile)]) == 0
    before, after = map(float, re.search(r"relative residual of the base ([\d.]+) -> ([\d.]+)",
                                         capsys.readouterr().out).groups())
    assert 0 < after < before
    assert main(["train", "--user", str(tiny_user_dir), "--out", str(tmp_path / "b"), "--loftq",
                 "--base", str(base_dir)]) == 2
    err = capsys.readouterr().err
    assert "--loftq" in err and "needs --quantized-base" in err
