"""Text generation shared by every device engine (ExecuTorch, ONNX Runtime): tokenizer, sampling, decode loop.

numpy + ``tokenizers`` only, never torch. An engine supplies two callables over its own program/session:

- ``prefill(ids: np.ndarray[int64, (n,)]) -> logits of the last position (float32, [vocab])``: resets the
  engine's KV cache and runs the prompt;
- ``decode(token: int, position: int) -> logits (float32, [vocab])``: one token at ``position`` on top of the cache.

:func:`generate` drives them with greedy decoding (``temperature == 0``) or temperature + nucleus (top-p)
sampling from a seeded ``numpy`` generator, so a given seed gives the same text on every run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lowra.device_runtime.errors import LowraError
from lowra.device_runtime.formats.constants import CHATML_PROMPT_TEMPLATE, TOKENIZER_FILE

__all__ = ["GenerationConfig", "Tokenizer", "generate", "sample_next"]

Prefill = Callable[[np.ndarray], np.ndarray]
Decode = Callable[[int, int], np.ndarray]


class Tokenizer:
    """A ``tokenizer.json`` (HF ``tokenizers``), the end-of-sequence ids that stop generation, and the prompt
    template the model was trained with (an export's manifest records it; see ``formats.manifest``)."""

    def __init__(self, path: str | Path, eos_tokens: Sequence[str] = ("<|im_end|>", "<|endoftext|>", "</s>"),
                 prompt_template: str = CHATML_PROMPT_TEMPLATE) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise LowraError(f"tokenizer not found: {path} (expected a tokenizer.json written by the export)")
        from tokenizers import Tokenizer as _HFTokenizer

        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise LowraError(f"{path} is not a valid tokenizer.json: {exc}") from exc
        self.path = path
        self.prompt_template = prompt_template
        ids = (self._tok.token_to_id(t) for t in eos_tokens)
        self.eos_ids = frozenset(i for i in ids if i is not None)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, user_text: str) -> str:
        """``user_text`` as the one user turn the model answers next, in the model's prompt template."""
        return self.prompt_template.format(prompt=user_text)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise LowraError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature >= 0.0:
            raise LowraError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise LowraError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_next(logits: np.ndarray, config: GenerationConfig, rng: np.random.Generator) -> int:
    """Next token id: argmax when ``temperature == 0``, else a draw from the top-p nucleus of softmax(logits / T)."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if config.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits / config.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    cumulative = np.cumsum(p[order])
    # smallest prefix whose mass reaches top_p (1e-9 of slack so 0.5 + 0.3 counts as reaching 0.8)
    keep = min(int(np.searchsorted(cumulative, config.top_p - 1e-9) + 1), p.size)
    nucleus = order[:keep]
    q = p[nucleus] / p[nucleus].sum()
    return int(nucleus[rng.choice(keep, p=q)])


def generate(
    prefill: Prefill,
    decode: Decode,
    prompt_ids: np.ndarray,
    config: GenerationConfig = GenerationConfig(),
    eos_ids: frozenset[int] = frozenset(),
    max_positions: int | None = None,
) -> list[int]:
    """New token ids after ``prompt_ids`` (stops at an EOS id, which is not returned, or after max_new_tokens)."""
    prompt_ids = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
    if prompt_ids.size == 0:
        raise LowraError("empty prompt: generation needs at least one token")
    budget = config.max_new_tokens
    if max_positions is not None:
        if prompt_ids.size >= max_positions:
            raise LowraError(f"prompt of {prompt_ids.size} tokens does not fit the program's {max_positions} positions")
        budget = min(budget, max_positions - prompt_ids.size)
    rng = np.random.default_rng(config.seed)
    out: list[int] = []
    token = sample_next(prefill(prompt_ids), config, rng)
    position = prompt_ids.size
    while token not in eos_ids:
        out.append(token)
        if len(out) >= budget:
            break
        token = sample_next(decode(token, position), config, rng)
        position += 1
    return out
