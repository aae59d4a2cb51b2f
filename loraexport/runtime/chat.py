"""Chat prompts through the export's own chat template (the base's ``chat_template.jinja``, or
``tokenizer_config.json``'s ``chat_template``), rendered as transformers renders it: Jinja in a
sandbox (``ImmutableSandboxedEnvironment``), blocks trimmed, ``loopcontrols``, the ``tojson``
filter, ``raise_exception`` and ``strftime_now``, the messages, ``add_generation_prompt`` and the
tokenizer's special tokens as variables.

Rendering needs jinja2, which ``loraexport.runtime`` does not require: an app that renders chat
prompts installs it (``pip install jinja2``, or ``loraexport[chat]``); without it a chat call
says so, and the app can pass a prompt it templated itself. The standard library otherwise.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from loraexport.core.untrusted import read_bounded, short_repr
from loraexport.errors import first_line
from loraexport.runtime.files import RuntimeInputError

TEMPLATE_FILE = "chat_template.jinja"
MAX_TEMPLATE_BYTES = 1024 * 1024  # real templates are a few kB (the largest known ~30 kB)


def find_template(directory: Path, config: dict) -> str | None:
    """The export's chat template: ``chat_template.jinja`` (transformers 5 writes it), else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates: the one
    named "default"); None where there is none."""
    path = directory / TEMPLATE_FILE
    if os.path.lexists(path):
        raw = read_bounded(path, RuntimeInputError, MAX_TEMPLATE_BYTES, "chat template")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RuntimeInputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        where = directory / "tokenizer_config.json"
        raise RuntimeInputError(f"{where}: chat_template must be a string, not {short_repr(template)}")
    return template


def messages_of(prompt: str | list) -> list[dict]:
    """A chat prompt as messages: a string is one user message; a list must hold
    ``{"role": str, "content": str}`` objects."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    ok = isinstance(prompt, list) and len(prompt) > 0
    if not ok or not all(
        isinstance(m, dict) and {type(m.get("role")), type(m.get("content"))} == {str} for m in prompt
    ):
        raise RuntimeInputError(
            'prompt must be a string or a list of {"role": str, "content": str} messages with chat=True, '
            f"not {short_repr(prompt)}"
        )
    return prompt


def _raise(message: str):
    import jinja2

    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def render(template: str, messages: list[dict], special: dict[str, str]) -> str:
    """``template`` rendered for ``messages``, ending with the prompt of the assistant's turn."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError as e:
        raise RuntimeInputError(
            "the export's chat template needs jinja2 to render (pip install jinja2); or pass the "
            "prompt already templated, with chat=False"
        ) from e
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, **special)
    except Exception as e:  # a template is a program: a syntax error, a sandbox refusal, its own errors
        raise RuntimeInputError(
            f"the export's chat template cannot render these messages: {first_line(e)}"
        ) from e
