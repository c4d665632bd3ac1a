"""Chat templates, applied as transformers' `apply_chat_template` applies them.

Where the template comes from (the first that exists, as transformers looks): `chat_template.jinja` beside the
checkpoint, then `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates: the one named
"default"). It is rendered in a sandboxed Jinja2 environment with transformers' settings (trim_blocks,
lstrip_blocks, loop controls), its helpers (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII)
and variables (`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `tools` = None).

A rendered prompt is tokenized without adding BOS: a template that wants one writes `{{ bos_token }}` itself
(transformers' `apply_chat_template(tokenize=True)` does the same, so a Llama-3 prompt gets one BOS, not two).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


class ChatTemplateError(ValueError):
    """The template refused the messages (its raise_exception) or failed to render them."""


def _raise(message: str):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(value) -> str:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


@dataclass
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template does not parse: {exc}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, tools=None)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"the chat template failed on these messages: {exc}") from None


def load_chat_template(directory: str | Path, bos_token: str = "", eos_token: str = "") -> ChatTemplate | None:
    """The checkpoint's chat template, or None when it has none. `bos_token` / `eos_token`: the tokenizer's, used
    where tokenizer_config.json does not name them."""
    directory = Path(directory)
    config_path = directory / TOKENIZER_CONFIG
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    source = None
    if (directory / TEMPLATE_FILE).is_file():
        source = (directory / TEMPLATE_FILE).read_text()
    elif isinstance(config.get("chat_template"), str):
        source = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):
        named = {t.get("name"): t.get("template") for t in config["chat_template"] if isinstance(t, dict)}
        source = named.get("default")
    if source is None:
        return None
    return ChatTemplate(source, bos_token=_token_text(config.get("bos_token")) or bos_token,
                        eos_token=_token_text(config.get("eos_token")) or eos_token)
