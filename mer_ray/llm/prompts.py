"""Prompt templates as versioned files, and their rendering.

A template is a Jinja file in ``mer_ray/llm/templates/`` (or any path) that
starts with a ``{#--- ... ---#}`` YAML header (name, version, label prefixes,
top-k). Its body renders the user message from a context of plain values; if the
model has a chat template (and ``chat`` is on), the message is wrapped in it
with the assistant turn opened, so the label follows the template's newline.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import yaml
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import Field

from mer_ray.config import StrictModel

TEMPLATE_DIR = Path(__file__).parent / "templates"
DEFAULT_TEMPLATE = "lantern_v2"
_HEADER = re.compile(r"\A\{#---\n(.*?)\n---#\}\n", re.S)


class TemplateMeta(StrictModel):
    """A template's YAML header."""

    name: str = Field(description="template name, also its file stem")
    version: int = Field(ge=1, description="bumped whenever the rendered text changes")
    description: str = ""
    label_prefix_plain: str = Field(" ", description="put before each label when no chat template wraps the prompt")
    label_prefix_chat: str = Field("", description="put before each label after a chat template's assistant turn")
    top_k: int = Field(3, ge=0, description="how many vanilla emotion references per utterance")


@cache
def _env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)

    def raise_exception(msg):
        raise ValueError(f"chat template error: {msg}")

    env.globals["raise_exception"] = raise_exception
    return env


@lru_cache(maxsize=64)
def _compiled(source: str):
    """A template compiled once (compiling costs milliseconds; a job renders thousands of prompts)."""
    return _env().from_string(source)


@dataclass
class PromptTemplate:
    """A loaded template."""

    meta: TemplateMeta
    source: str
    path: Path

    @classmethod
    def load(cls, name_or_path: str | Path = DEFAULT_TEMPLATE) -> PromptTemplate:
        """Load a template by name (``lantern_v1``) or from a ``.j2`` path."""
        p = Path(name_or_path)
        if not p.suffix:
            p = TEMPLATE_DIR / f"{name_or_path}.j2"
        if not p.exists():
            known = sorted(x.stem for x in TEMPLATE_DIR.glob("*.j2"))
            raise FileNotFoundError(f"prompt template {str(name_or_path)!r} not found; shipped: {known}")
        text = p.read_text(encoding="utf-8")
        m = _HEADER.match(text)
        if not m:
            raise ValueError(f"{p}: a template must start with a '{{#---' YAML header '---#}}'")
        meta = TemplateMeta.model_validate(yaml.safe_load(m.group(1)))
        return cls(meta, text[m.end():], p)

    @property
    def tag(self) -> str:
        return f"{self.meta.name}@v{self.meta.version}"

    def labels(self, labels: Sequence[str], chat: bool) -> list[str]:
        """The label strings the backend scores after the prompt."""
        prefix = self.meta.label_prefix_chat if chat else self.meta.label_prefix_plain
        return [prefix + lab for lab in labels]

    def render_user(self, context: dict[str, Any], chat: bool) -> str:
        """The user message (or the whole prompt without a chat template)."""
        return _compiled(self.source).render(**context, chat=chat).strip("\n")

    def render(self, context: dict[str, Any], chat_template: str | None = None,
               bos_token: str = "", eos_token: str = "") -> str:
        """The full prompt text; wrapped in ``chat_template`` when one is given."""
        user = self.render_user(context, chat=chat_template is not None)
        if chat_template is None:
            return user
        return apply_chat_template(chat_template, [{"role": "user", "content": user}], bos_token, eos_token)


def apply_chat_template(template: str, messages: list[dict], bos_token: str = "", eos_token: str = "") -> str:
    """Render a Hugging Face style Jinja chat template with the assistant turn opened."""
    return _compiled(template).render(messages=messages, add_generation_prompt=True,
                                               bos_token=bos_token, eos_token=eos_token)
