"""`lowra eval`: held-out NLL of the base and of a user's blob, computed with the device runtime's weights."""
from __future__ import annotations

import json

from lowra.sdk.cli.main import main
from lowra.sdk.training.eval import heldout_nll
from lowra.sdk.workflow import model_fingerprint

from tests.conftest import build_tiny_model
from tests.sdk.cli.conftest import make_blob, random_adapter


def test_eval_prints_base_and_blob_rows_equal_to_heldout_nll(tmp_path, capsys, tiny_tokenizer, tiny_user_dir):
    base = tmp_path / "base"
    model = build_tiny_model()
    model.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    blob_model = build_tiny_model()
    factors = random_adapter(blob_model)
    blob = make_blob(blob_model, factors, model_fingerprint(blob_model, list(factors))).write(tmp_path / "u.lowra")

    assert main(["eval", "--base", str(base), "--user", str(tiny_user_dir), "--blob", str(blob), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (base_label, user_label) = result
    assert base_label == "base" and user_label == "base + u"
    want = heldout_nll(build_tiny_model(), tiny_tokenizer, [tiny_user_dir])
    assert result["base"]["tokens"] == want["tokens"] > 0
    assert abs(result["base"]["nll"] - want["nll"]) < 1e-5
    assert abs(result["base + u"]["nll"] - result["base"]["nll"]) > 1e-3  # the adapter changes the model

    assert main(["eval", "--base", str(base), "--user", str(tiny_user_dir)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("held-out NLL per answer token") and "tiny-user" in table[1]
    assert table[2].split()[0] == "base" and f"{want['nll']:.3f}" in table[2]
