"""Chat prompts: the tokenizer's own chat template when it has one, else a plain documented template.

The template comes from ``chat_template.jinja`` or the ``chat_template`` key of
``tokenizer_config.json`` next to the model (as Hugging Face stores it). It is rendered in
jinja2's *sandboxed* environment: a template is untrusted input and must not reach
Python internals.

Base models (Spectra's TriLM/FloatLM ship none) get :data:`PLAIN_TEMPLATE`::

    System: {system content}

    User: {user content}

    Assistant: {assistant content}

    User: ...

    Assistant:

Turns are separated by a blank line and the prompt ends with ``Assistant:``; generation
stops at ``\\nUser:`` (:data:`PLAIN_STOP`) so a base model does not write the next user
turn itself. Documented in docs/serving.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from spectra.errors import SpectraError

ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "developer": "System", "tool": "Tool"}
PLAIN_STOP = ("\nUser:",)


def _content(msg: dict, i: int) -> str:
    c = msg.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # OpenAI content parts: only text parts are meaningful to a text model
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise SpectraError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise SpectraError(f"messages[{i}].content must be a string or a list of text parts")


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise SpectraError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise SpectraError(f"messages[{i}] must be an object with a string 'role'")
        if m["role"] not in ROLES:
            raise SpectraError(f"messages[{i}].role '{m['role']}' is not one of {', '.join(ROLES)}")
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


def render_plain(messages: list[dict]) -> str:
    turns = [f"{ROLES[m['role']]}: {m['content']}" for m in messages]
    return "\n\n".join(turns + ["Assistant:"])


class ChatTemplate:
    """Renders OpenAI ``messages`` to prompt text."""

    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos, self.eos = source, bos_token, eos_token
        self._tmpl = None
        if source is not None:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

            def raise_exception(msg):
                raise SpectraError(f"chat template: {msg}")

            env.globals["raise_exception"] = raise_exception
            try:
                self._tmpl = env.from_string(source)
            except TemplateError as e:
                raise SpectraError(f"the tokenizer's chat template does not parse: {e}") from None

    @property
    def plain(self) -> bool:
        return self._tmpl is None

    @property
    def default_stop(self) -> tuple[str, ...]:
        return PLAIN_STOP if self.plain else ()

    def render(self, messages) -> str:
        msgs = check_messages(messages)
        if self._tmpl is None:
            return render_plain(msgs)
        from jinja2 import TemplateError

        try:
            return self._tmpl.render(messages=msgs, add_generation_prompt=True, bos_token=self.bos,
                                     eos_token=self.eos)
        except TemplateError as e:
            raise SpectraError(f"the chat template failed on these messages: {e}") from None

    @classmethod
    def for_model(cls, path: str | Path) -> "ChatTemplate":
        """The model directory's template (chat_template.jinja or tokenizer_config.json), else the plain one."""
        path = Path(path)
        cfg = {}
        tc = path / "tokenizer_config.json"
        if tc.is_file():
            try:
                cfg = json.loads(tc.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise SpectraError(f"{tc}: not valid JSON ({e})") from None
        src = None
        if (path / "chat_template.jinja").is_file():
            src = (path / "chat_template.jinja").read_text()
        else:
            t = cfg.get("chat_template") if isinstance(cfg, dict) else None
            if isinstance(t, list):  # named templates: the 'default' one
                t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
            src = t if isinstance(t, str) else None

        def tok_str(v):
            return v.get("content", "") if isinstance(v, dict) else (v if isinstance(v, str) else "")

        return cls(src, tok_str(cfg.get("bos_token")), tok_str(cfg.get("eos_token")))


__all__ = ["ChatTemplate", "PLAIN_STOP", "check_messages", "render_plain"]
