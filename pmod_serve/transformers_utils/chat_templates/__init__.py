"""Chat templates of the catalogue (docs/p-mod.md, "Prompts"), as Jinja files vLLM and transformers can load."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

TEMPLATE_DIR = Path(__file__).resolve().parent

# LLaVA's conv_vicuna_v1 system prompt, the default when the messages carry no system message.
VICUNA_V1_SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def chat_template_path(name: str = "vicuna_v1") -> Path:
    """The .jinja file of a chat template (pass it to vLLM's --chat-template)."""
    path = TEMPLATE_DIR / f"{name}.jinja"
    if not path.is_file():
        known = sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))
        raise KeyError(f"unknown chat template {name!r}: expected one of {known}")
    return path


def _raise_exception(message: str) -> None:
    raise ValueError(message)


@cache
def _compiled(name: str):
    # The environment transformers' apply_chat_template uses, so the template renders the same here.
    import jinja2.ext
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(chat_template_path(name).read_text())


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    template: str = "vicuna_v1",
) -> str:
    """Render OpenAI-style messages with a catalogue chat template (text content or content parts)."""
    return _compiled(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt)
