"""Shared fixtures: a tiny Llama model and an offline tokenizer, built in memory.

They keep the SDK tests fast (milliseconds per forward) and independent of any
downloaded weights; the real SmolLM2 base is exercised only by ``slow`` tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

TINY_VOCAB = 300
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is your favourite food? I love pizza with extra cheese.",
    "Please write a short reply to my friend about the weekend trip.",
    "Summarise the meeting notes and list the action items.",
    "user assistant system hello thanks sure of course",
]


def _build_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<pad>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    assert len(fast) <= TINY_VOCAB
    return fast


def build_tiny_model(seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama with random but reproducible weights, frozen and in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Any:
    return _build_tokenizer()


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return build_tiny_model()


@pytest.fixture
def tiny_model_factory() -> Callable[..., torch.nn.Module]:
    """Builds fresh copies with identical weights (e.g. a clean base for PEFT)."""
    return build_tiny_model


def write_user_dir(root: Path, n_train: int = 16, n_heldout: int = 4, card: bool = True) -> Path:
    """A user folder whose responses follow one fixed pattern, so a LoRA can learn it fast."""
    root.mkdir(parents=True, exist_ok=True)
    topics = ["pizza", "the weekend", "the meeting", "my friend", "the fox", "cheese", "the trip", "food"]

    def rows(n: int, offset: int) -> list[dict[str, str]]:
        out = []
        for i in range(n):
            topic = topics[(i + offset) % len(topics)]
            out.append({"prompt": f"Tell me about {topic}.", "response": f"Sure! I love {topic}. Thanks!"})
        return out

    with (root / "train.jsonl").open("w") as fh:
        for row in rows(n_train, 0):
            fh.write(json.dumps(row) + "\n")
    with (root / "heldout.jsonl").open("w") as fh:
        for row in rows(n_heldout, 3):
            fh.write(json.dumps(row) + "\n")
    if card:
        info = {
            "id": "tiny-user",
            "task": "chat",
            "style": "enthusiastic",
            "source": "synthetic test data",
            "license": "CC0-1.0",
            "n_train": n_train,
            "n_heldout": n_heldout,
        }
        (root / "user.json").write_text(json.dumps(info))
    return root


@pytest.fixture
def make_user_dir() -> Callable[..., Path]:
    """``make_user_dir(root, n_train=16, n_heldout=4, card=True)`` writes a user folder."""
    return write_user_dir


@pytest.fixture
def tiny_user_dir(tmp_path: Path) -> Path:
    return write_user_dir(tmp_path / "tiny-user")


_BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {blocked!r}):
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, _Block())
"""
_CHECK = """
import sys as _sys
_leaked = [m for m in _sys.modules if any(m == b or m.startswith(b + ".") for b in {blocked!r})]
assert not _leaked, f"blocked modules got imported: {{_leaked[:5]}}"
"""


def run_with_blocked_imports(code: str, blocked: tuple[str, ...] = ("torch",), timeout: float = 120,
                             args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing any of ``blocked`` (and their submodules) raises
    ImportError; the run fails if one of them is in ``sys.modules`` at the end anyway. The one no-torch check
    every device-side test uses."""
    script = _BLOCKER.format(blocked=blocked) + textwrap.dedent(code) + _CHECK.format(blocked=blocked)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout)
