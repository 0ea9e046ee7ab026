from __future__ import annotations

import pytest
import torch

from lowra.sdk.adapters.config import LoraConfig
from lowra.sdk.adapters.model import get_adapter_factors, lora_layers
from lowra.sdk.errors import ConfigError
from lowra.sdk.training.config import TrainConfig
from lowra.sdk.training.data import load_user_dataset
from lowra.sdk.training.train import evaluate_loss, train_adapter

FAST = TrainConfig(steps=6, batch_size=4, learning_rate=1e-2, warmup_steps=2, max_len=64)


def _base_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".base.", "."): v for k, v in state.items()}


def _trained(tiny_model, tiny_tokenizer, tiny_user_dir, lora: LoraConfig | None = None, config=FAST):
    ds = load_user_dataset(tiny_user_dir)
    result = train_adapter(tiny_model, tiny_tokenizer, ds, lora or LoraConfig(rank=4), config, progress=False)
    return ds, result


@pytest.mark.parametrize(
    "kwargs",
    [{"steps": 0}, {"batch_size": 0}, {"learning_rate": 0.0}, {"weight_decay": -1.0}, {"warmup_steps": -1},
     {"max_len": 1}, {"eval_batch_size": 0}, {"steps": 2.5}],
)
def test_train_config_validation(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)


def test_training_reduces_heldout_loss_and_keeps_base(tiny_model, tiny_tokenizer, tiny_user_dir) -> None:
    ds = load_user_dataset(tiny_user_dir)
    before_state = _base_state(tiny_model)
    before = evaluate_loss(tiny_model, tiny_tokenizer, ds.heldout, max_len=64)
    config = TrainConfig(steps=40, batch_size=4, learning_rate=1e-2, max_len=64)
    result = train_adapter(tiny_model, tiny_tokenizer, ds, LoraConfig(rank=8), config, progress=False)
    after = evaluate_loss(tiny_model, tiny_tokenizer, ds.heldout, max_len=64)
    assert len(result.losses) == 40 and result.seconds > 0
    assert after < before - 0.2, (before, after)
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    # Only LoRA tensors moved: every base tensor is bit-identical.
    after_state = _strip_wrappers(_base_state(tiny_model))
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], before_state[k]) for k in before_state)
    assert not tiny_model.training
    # Statistics cover every adapted module, one positive mean square per input feature.
    layers = lora_layers(tiny_model)
    assert set(result.input_stats) == set(layers)
    for path, stats in result.input_stats.items():
        assert stats.shape == (layers[path].in_features,) and stats.dtype == torch.float32
        assert bool((stats > 0).all())
    assert not any(layer.record_input_stats for layer in layers.values())


def test_training_is_deterministic(tiny_model_factory, tiny_tokenizer, tiny_user_dir) -> None:
    runs = []
    for _ in range(2):
        model = tiny_model_factory()
        _, result = _trained(model, tiny_tokenizer, tiny_user_dir)
        runs.append((get_adapter_factors(model, "default"), result.losses))
    (f1, l1), (f2, l2) = runs
    assert l1 == l2
    assert f1.keys() == f2.keys()
    assert all(torch.equal(f1[k][0], f2[k][0]) and torch.equal(f1[k][1], f2[k][1]) for k in f1)
    assert any(f1[k][1].abs().sum() > 0 for k in f1)


def test_evaluate_loss_is_token_weighted(tiny_model, tiny_tokenizer, tiny_user_dir) -> None:
    ds = load_user_dataset(tiny_user_dir)
    whole = evaluate_loss(tiny_model, tiny_tokenizer, ds.heldout, batch_size=8)
    one_by_one = evaluate_loss(tiny_model, tiny_tokenizer, ds.heldout, batch_size=1)
    assert whole == pytest.approx(one_by_one, rel=1e-5)


def test_answer_losses_equal_the_full_logits_reference_and_the_head_sees_only_answers(
        tiny_model, tiny_tokenizer, tiny_user_dir) -> None:
    from torch.nn import functional as F

    from lowra.sdk.training.data import IGNORE_INDEX, collate, encode_example
    from lowra.sdk.training.train import answer_token_losses

    ds = load_user_dataset(tiny_user_dir)
    batch = collate([encode_example(tiny_tokenizer, ex, 96) for ex in ds.train[:5]], tiny_tokenizer.pad_token_id)
    head_rows: list[int] = []
    hook = tiny_model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: head_rows.append(out.reshape(-1, out.shape[-1]).shape[0]))
    try:
        losses, rows = answer_token_losses(tiny_model, batch)
    finally:
        hook.remove()
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none").reshape(labels.shape)
    mask = labels != IGNORE_INDEX
    assert 0 < losses.numel() == int(mask.sum()) < labels.numel()  # prompts and padding are not answers
    assert head_rows[0] == losses.numel()  # the head ran on the answer positions alone
    torch.testing.assert_close(losses, reference[mask], rtol=1e-5, atol=1e-5)
    assert torch.equal(rows, mask.nonzero(as_tuple=True)[0])
