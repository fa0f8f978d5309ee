"""Chat templates: the tokenizer's own (sandboxed jinja2) or the plain documented one; /health while loading."""

import json

import pytest

from spectra.errors import SpectraError
from spectra.serve.chat import PLAIN_STOP, ChatTemplate, check_messages, render_plain

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": [{"type": "text", "text": "more"}]}]


def test_plain_template():
    t = ChatTemplate()
    assert t.plain and t.default_stop == PLAIN_STOP
    assert t.render(MSGS) == "System: be brief\n\nUser: hi\n\nAssistant: hello\n\nUser: more\n\nAssistant:"
    assert render_plain([{"role": "user", "content": "x"}]) == "User: x\n\nAssistant:"


@pytest.mark.parametrize("bad", [[], "hi", [{"content": "x"}], [{"role": "wizard", "content": "x"}],
                                 [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}],
                                 [{"role": "user", "content": 5}]])
def test_bad_messages(bad):
    with pytest.raises(SpectraError):
        check_messages(bad)


def test_tokenizer_template_from_config(tmp_path):
    src = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": src, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    t = ChatTemplate.for_model(tmp_path)
    assert not t.plain and t.default_stop == ()
    assert t.render(MSGS[:2]) == "<s><|system|>be brief</s><|user|>hi</s><|assistant|>"
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}|{% endfor %}")
    assert ChatTemplate.for_model(tmp_path).render(MSGS[:2]) == "be brief|hi|"


def test_template_is_sandboxed_and_errors_are_spectra_errors(tmp_path):
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SpectraError):
        evil.render(MSGS)
    with pytest.raises(SpectraError, match="only user"):
        ChatTemplate("{{ raise_exception('only user turns') }}").render(MSGS)
    with pytest.raises(SpectraError, match="does not parse"):
        ChatTemplate("{% for %}")
    (tmp_path / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(SpectraError, match="not valid JSON"):
        ChatTemplate.for_model(tmp_path)


def test_health_is_503_while_loading():
    pytest.importorskip("fastapi", reason="spectra serve needs the serve extra (fastapi, uvicorn)")
    from starlette.testclient import TestClient

    from spectra.serve.app import ServerState, build_asgi

    state = ServerState("m")
    with TestClient(build_asgi(state)) as c:
        assert c.get("/health").status_code == 503 and c.get("/health").json() == {"status": "loading"}
        r = c.post("/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert c.get("/metrics").status_code == 200


def test_cli_refuses_bad_setups(tmp_path, capsys):
    pytest.importorskip("fastapi", reason="spectra serve needs the serve extra (fastapi, uvicorn)")
    from spectra.cli import main

    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--parallel", "0"]) == 2
    assert "--parallel must be >= 1" in capsys.readouterr().err
