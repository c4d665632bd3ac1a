"""Chat templates: found where transformers finds them, rendered as transformers renders them, tokenized without a
second BOS, and served by /v1/chat/completions (the bundled reasoner's own template keeps its prompts unchanged)."""
from __future__ import annotations

import json
import shutil

import openai
import pytest

from decoder_service.chat_template import ChatTemplate, ChatTemplateError, load_chat_template
from decoder_service.checkpoint import load_checkpoint
from decoder_service.engine import Engine, EngineConfig
from decoder_service.server import BackgroundServer
from kvpilot.client import build_request, connect
from kvpilot.models import BUNDLED_MODELS
from policy_service.local import InProcessPolicy

# Qwen2.5's ChatML template, shortened to what these tests need (system default, roles, generation prompt).
CHATML = ("{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are helpful.<|im_end|>\\n' }}"
          "{%- endif %}{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
          "{%- endif %}")
MESSAGES = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "what is 2 + 2?"}]


def test_where_the_template_comes_from(tmp_path):
    assert load_chat_template(tmp_path) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ bos_token }}default"}],
        "bos_token": {"content": "<s>"}}))
    assert load_chat_template(tmp_path).render(MESSAGES) == "<s>default"
    (tmp_path / "chat_template.jinja").write_text("file wins")
    assert load_chat_template(tmp_path).render(MESSAGES) == "file wins"


def test_rendering_matches_transformers(tmp_path, tokenizer_json):
    import transformers  # a test dependency (pyproject's [test] extra)

    shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": None}))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for add in (True, False):
        assert load_chat_template(tmp_path).render(MESSAGES, add_generation_prompt=add) == \
            reference.apply_chat_template(MESSAGES, add_generation_prompt=add, tokenize=False)


def test_a_template_that_refuses_says_why():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        template.render(MESSAGES)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        ChatTemplate("{% for %}")


@pytest.fixture(scope="module")
def chatml_server(make_checkpoint, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chatml") / "model"
    shutil.copytree(make_checkpoint("qwen2"), directory)  # a tiny random Qwen2-style model with Qwen's ChatML
    (directory / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    engine = Engine(load_checkpoint(directory), EngineConfig(kv_pool_bytes=8 << 20), policy=InProcessPolicy())
    with BackgroundServer(engine, http_address="127.0.0.1:0") as server:
        yield server


def test_chat_renders_every_message_and_adds_no_second_bos(chatml_server):
    engine = chatml_server.server.async_engine.engine
    rendered = load_chat_template(engine.loaded.path).render(MESSAGES)
    client = openai.OpenAI(base_url=f"http://{chatml_server.http_address}/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model=engine.loaded.name, messages=MESSAGES, max_tokens=5, temperature=0)
    tokens = engine.tokenizer.encode(rendered)  # no BOS: the template did not write one
    assert out.usage.prompt_tokens == len(tokens)
    request = build_request(token_ids=tokens, max_new_tokens=5, temperature=0.0)
    request.add_bos = False
    expected = list(connect(chatml_server.address).Generate(request, timeout=60))[-1].complete
    assert out.choices[0].message.content == expected.text
    streamed = client.chat.completions.create(model=engine.loaded.name, messages=MESSAGES, max_tokens=5, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text


@pytest.mark.parametrize("name", sorted(BUNDLED_MODELS))
def test_bundled_template_is_bos_and_the_last_message(name):
    model = load_checkpoint(BUNDLED_MODELS[name])
    template = load_chat_template(model.path, bos_token="<bos>")
    prompt = "Q: start k75 hops 4 . report end and color of start ."
    text = template.render([{"role": "system", "content": "ignored"}, {"role": "user", "content": prompt}])
    assert model.tokenizer.encode(text) == model.tokenizer.encode(prompt, add_bos=True)
    with pytest.raises(ChatTemplateError, match="last message must come from the user or a tool"):
        template.render([{"role": "user", "content": prompt}, {"role": "assistant", "content": "x"}])


@pytest.mark.parametrize("config, bos", [({"tokenizer_class": "PreTrainedTokenizerFast"}, False),
                                         ({"tokenizer_class": "LlamaTokenizerFast", "add_bos_token": True}, True),
                                         (None, True)])
def test_bos_follows_the_tokenizer_as_transformers_does(make_checkpoint, tmp_path, config, bos):
    """A Hugging Face checkpoint's prompt starts with BOS only when its tokenizer adds one (tokenizer_config.json's
    add_bos_token, else tokenizer.json's post-processor); kvpilot's own checkpoints (no tokenizer_config.json) were
    trained with BOS and keep it. An explicit add_bos wins either way."""
    from decoder_service.requests import GenerationRequest, SamplingParams

    directory = tmp_path / "model"
    shutil.copytree(make_checkpoint("llama"), directory)
    if config is not None:
        bos_id = json.loads((directory / "config.json").read_text())["bos_token_id"]
        bos_text = load_checkpoint(directory).tokenizer.inner.id_to_token(bos_id)
        (directory / "tokenizer_config.json").write_text(json.dumps(config | {"bos_token": bos_text}))
    loaded = load_checkpoint(directory)
    engine = Engine(loaded, EngineConfig(kv_pool_bytes=4 << 20), policy=InProcessPolicy())
    ids = loaded.tokenizer.encode("hello there")

    def prompt_tokens(**kw) -> int:
        request = GenerationRequest("b", list(ids), SamplingParams(temperature=0, max_new_tokens=1), **kw)
        return engine.generate([request])[0].usage.prompt_tokens

    assert prompt_tokens() == len(ids) + bos
    assert prompt_tokens(add_bos=True) == len(ids) + 1 and prompt_tokens(add_bos=False) == len(ids)
    if config is not None and "add_bos_token" not in config:  # (its handling varies by transformers class/version)
        import transformers  # a test dependency

        expected = transformers.AutoTokenizer.from_pretrained(str(directory))("hello there")["input_ids"]
        assert prompt_tokens() == len(expected)
