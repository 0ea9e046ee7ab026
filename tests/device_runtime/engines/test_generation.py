"""Sampling and the decode loop shared by the device engines (numpy only)."""
from __future__ import annotations

import numpy as np
import pytest

from lowra.device_runtime.errors import LowraError
from lowra.device_runtime.engines.generation import GenerationConfig, Tokenizer, generate, sample_next


def test_greedy_is_argmax_and_tiny_top_p_is_greedy():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert sample_next(logits, GenerationConfig(temperature=0.0), rng) == 1
    # a nucleus that only the top token fills: always the argmax, whatever the temperature
    assert {sample_next(logits, GenerationConfig(temperature=5.0, top_p=1e-6), rng) for _ in range(50)} == {1}


def test_sampling_matches_the_softmax_of_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    config = GenerationConfig(temperature=1.0, top_p=0.8)  # nucleus = {0, 1}: 0.5 + 0.3 reaches 0.8
    rng = np.random.default_rng(1)
    draws = np.array([sample_next(logits, config, rng) for _ in range(4000)])
    assert set(np.unique(draws)) == {0, 1}
    assert abs((draws == 0).mean() - 0.5 / 0.8) < 0.03
    # temperature sharpens: T=0.5 squares the probabilities before renormalizing
    config = GenerationConfig(temperature=0.5, top_p=1.0)
    draws = np.array([sample_next(logits, config, np.random.default_rng(i)) for i in range(3000)])
    p = np.array([0.5, 0.3, 0.15, 0.05]) ** 2
    assert abs((draws == 0).mean() - p[0] / p.sum()) < 0.03


def _toy_engine(eos: int = 7):
    """A 'model' whose next token is (last + 1) % 8, recording the positions it was asked for."""
    calls = []

    def logits_for(token: int) -> np.ndarray:
        out = np.zeros(8, dtype=np.float32)
        out[(token + 1) % 8] = 10.0
        return out

    def prefill(ids: np.ndarray) -> np.ndarray:
        calls.append(("prefill", ids.tolist()))
        return logits_for(int(ids[-1]))

    def decode(token: int, position: int) -> np.ndarray:
        calls.append(("decode", token, position))
        return logits_for(token)

    return prefill, decode, calls


def test_generate_stops_at_eos_and_counts_positions():
    prefill, decode, calls = _toy_engine()
    out = generate(prefill, decode, np.array([2, 3]), GenerationConfig(max_new_tokens=10), eos_ids=frozenset({7}))
    assert out == [4, 5, 6]  # 7 is EOS: not returned
    assert calls == [("prefill", [2, 3]), ("decode", 4, 2), ("decode", 5, 3), ("decode", 6, 4)]


def test_generate_respects_max_new_tokens_and_positions():
    prefill, decode, _ = _toy_engine()
    assert generate(prefill, decode, np.array([0]), GenerationConfig(max_new_tokens=3)) == [1, 2, 3]
    assert generate(prefill, decode, np.array([0, 0]), GenerationConfig(max_new_tokens=30), max_positions=5) == [1, 2, 3]
    with pytest.raises(LowraError, match="does not fit the program's 2 positions"):
        generate(prefill, decode, np.array([0, 0]), max_positions=2)
    with pytest.raises(LowraError, match="empty prompt"):
        generate(prefill, decode, np.array([], dtype=np.int64))


def test_seeded_sampling_is_reproducible():
    rng_logits = np.random.default_rng(3).standard_normal((64, 8)).astype(np.float32)

    def prefill(ids):
        return rng_logits[0]

    def decode(token, position):
        return rng_logits[position % 64]

    config = GenerationConfig(max_new_tokens=20, temperature=0.9, top_p=0.9, seed=42)
    first = generate(prefill, decode, np.array([1, 2]), config)
    assert first == generate(prefill, decode, np.array([1, 2]), config)
    assert len(first) == 20


@pytest.mark.parametrize(
    "kwargs, message",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p")],
)
def test_bad_generation_config(kwargs, message):
    with pytest.raises(LowraError, match=message):
        GenerationConfig(**kwargs)


def test_tokenizer_round_trip_and_errors(tmp_path, tiny_tokenizer):
    tiny_tokenizer.save_pretrained(tmp_path)
    tok = Tokenizer(tmp_path)
    ids = tok.encode("the quick brown fox")
    assert ids.dtype == np.int64 and ids.size > 0
    assert tok.decode(ids) == "the quick brown fox"
    assert tok.eos_ids == {tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")}
    with pytest.raises(LowraError, match="tokenizer not found"):
        Tokenizer(tmp_path / "nope")
    bad = tmp_path / "bad" / "tokenizer.json"
    bad.parent.mkdir()
    bad.write_text("{not json")
    with pytest.raises(LowraError, match="not a valid tokenizer.json"):
        Tokenizer(bad)
