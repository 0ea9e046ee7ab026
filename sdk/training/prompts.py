"""The one prompt template: how a user's prompt becomes the model's input, in training, evaluation and generation.

The tokenizer's own chat template (one user turn, generation prompt added) when it has one, else
:data:`FALLBACK_TEMPLATE`. Exporters record :func:`prompt_template` in their manifests, so the device wraps
prompts exactly as the adapter was trained (``device_runtime`` has no Jinja and never imports the sdk).
"""
from __future__ import annotations

from typing import Any

FALLBACK_TEMPLATE = "User: {prompt}\nAssistant: "
_SENTINEL = "\x00lowra-prompt\x00"


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, prompt: str) -> str:
    """``prompt`` as the user turn the model answers next (the text before the reply)."""
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return FALLBACK_TEMPLATE.format(prompt=prompt)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of :func:`render_prompt`. A chat template renders its special tokens as text, so none are
    added; the plain fallback gets the tokenizer's usual special tokens (e.g. BOS)."""
    text = render_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=not _has_chat_template(tokenizer))["input_ids"])


def prompt_template(tokenizer: Any) -> str:
    """The rendered template as a ``str.format`` pattern with one ``{prompt}`` field (braces escaped), what an
    export records for the device."""
    rendered = render_prompt(tokenizer, _SENTINEL)
    if rendered.count(_SENTINEL) != 1:
        raise ValueError("the tokenizer's chat template does not place the user prompt exactly once")
    before, after = rendered.split(_SENTINEL)
    escape = lambda s: s.replace("{", "{{").replace("}", "}}")  # noqa: E731
    return escape(before) + "{prompt}" + escape(after)
