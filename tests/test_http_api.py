"""The OpenAI-compatible HTTP API end to end: the real decoder (gRPC + HTTP on loopback, the bundled model) driven by
the official `openai` client and raw HTTP; errors carry the gRPC statuses' messages; /health and /metrics."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import grpc
import openai
import pytest

try:  # the openai client's HTTP library: httpx2 in newer releases, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

from decoder_service.checkpoint import load_checkpoint
from decoder_service.engine import Engine, EngineConfig
from decoder_service.server import BackgroundServer
from kvpilot.client import build_request, connect
from kvpilot.models import BUNDLED_MODEL
from kvpilot_protocol.security import BearerAuth, TransportSecurity
from policy_service.local import InProcessPolicy

MULTIHOP = "Q: start k75 hops 4 . report end and color of start ."
VARIABLES = ("V: x1 = 4 ; x2 = 7 ; x3 diff x2 x1 ; x4 diff x1 x3 ; x5 diff x3 x2 ; x6 diff x2 x5 ; x7 diff x4 x3 ; "
             "x8 diff x1 x2 ; x9 diff x2 x8 ; x10 sum x2 x6 ; x11 sum x9 x8 ; x12 diff x5 x9 ; ask x12 .")


def bundled_engine() -> Engine:
    return Engine(load_checkpoint(BUNDLED_MODEL), EngineConfig(kv_pool_bytes=16 << 20), policy=InProcessPolicy())


@pytest.fixture(scope="module")
def server():
    with BackgroundServer(bundled_engine(), http_address="127.0.0.1:0") as srv:
        yield srv


@pytest.fixture(scope="module")
def model_name(server):
    return server.server.async_engine.engine.loaded.name


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://{server.http_address}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=f"http://{server.http_address}", timeout=60) as c:
        yield c


def grpc_text(server, prompt: str, max_new_tokens: int) -> str:
    responses = list(connect(server.address).Generate(
        build_request(prompt, max_new_tokens=max_new_tokens, temperature=0.0), timeout=60))
    return responses[-1].complete.text


def grpc_error(server, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        list(connect(server.address).Generate(build_request(MULTIHOP, max_new_tokens=4, **kwargs), timeout=60))
    return info.value.code(), info.value.details()


def test_completion_equals_the_grpc_greedy_text(client, server, model_name):
    out = client.completions.create(model=model_name, prompt=MULTIHOP, max_tokens=12, temperature=0)
    [choice] = out.choices
    assert out.object == "text_completion" and out.model == model_name and out.id.startswith("cmpl-")
    assert choice.text == grpc_text(server, MULTIHOP, 12) and choice.text
    assert choice.finish_reason in ("stop", "length")
    u = out.usage
    assert u.completion_tokens <= 12 and u.prompt_tokens > 10 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    kv = u.model_extra["kv"]
    assert kv["peak_kv_slots"] == u.prompt_tokens + u.completion_tokens - 1 and kv["evicted_tokens"] == 0


def test_sampling_extras_through_the_openai_client_match_grpc(client, server, model_name):
    """OpenAI's penalties natively, vLLM's min_p / repetition_penalty / min_tokens through extra_body: the same
    text as the gRPC request with the same fields (tests/test_engine.py checks what each processor does)."""
    fields = dict(presence_penalty=1.5, frequency_penalty=0.5)
    extra = dict(min_p=0.05, repetition_penalty=1.3, min_tokens=6)
    out = client.completions.create(model=model_name, prompt=MULTIHOP, max_tokens=12, temperature=0, **fields,
                                    extra_body=extra)
    stub = connect(server.address)
    request = build_request(MULTIHOP, max_new_tokens=12, temperature=0.0, **fields, **extra)
    expected = list(stub.Generate(request, timeout=60))[-1].complete
    assert out.choices[0].text == expected.text and out.usage.completion_tokens >= 6
    kept = client.completions.create(model=model_name, prompt=MULTIHOP, max_tokens=12, temperature=0, stop=["</call>"],
                                     extra_body={"include_stop_str_in_output": True})
    dropped = client.completions.create(model=model_name, prompt=MULTIHOP, max_tokens=12, temperature=0, stop=["</call>"])
    assert kept.choices[0].text == dropped.choices[0].text + "</call>" and kept.choices[0].finish_reason == "stop"


def test_logprobs_in_both_openai_shapes_streamed_or_not_match_grpc(client, server, model_name):
    stub = connect(server.address)
    chunks = [r.chunk for r in stub.Generate(build_request(MULTIHOP, max_new_tokens=6, temperature=0.0, logprobs=2),
                                             timeout=60) if r.WhichOneof("event") == "chunk"]
    grpc_lps = [lp for c in chunks for lp in c.logprobs]
    assert len(grpc_lps) == sum(len(c.token_ids) for c in chunks) == 6
    assert all(len(lp.top) == 2 and lp.top[0].logprob >= lp.top[1].logprob for lp in grpc_lps)

    out = client.completions.create(model=model_name, prompt=MULTIHOP, max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x.logprob for x in grpc_lps], abs=1e-5)
    assert "".join(lp.tokens).replace(" ", "") == out.choices[0].text.replace(" ", "")
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0

    chat = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": MULTIHOP}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx([x.logprob for x in grpc_lps], abs=1e-5)
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)

    streamed = [c for part in client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": MULTIHOP}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=1, stream=True) if part.choices and part.choices[0].logprobs
        for c in part.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([x.logprob for x in grpc_lps], abs=1e-5)
    plain = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": MULTIHOP}],
                                           max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_streaming_chat_equals_the_non_streamed_text(client, model_name):
    messages = [{"role": "system", "content": "ignored by the fallback template"}, {"role": "user", "content": MULTIHOP}]
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1  # tokens arrived as they were generated
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_n_samples_through_grpc_and_both_openai_shapes(client, server, model_name):
    """n samples of one prompt: gRPC messages carry their sample's index and the stream ends after n completes;
    the OpenAI shapes have one choice per index (streamed or not), usage counts the prompt once and every sample's
    tokens; sample i equals the n = 1 request with seed + i."""
    stub = connect(server.address)
    responses = list(stub.Generate(build_request(MULTIHOP, max_new_tokens=10, temperature=1.0, seed=11, n=3), timeout=60))
    completes = {r.index: r.complete for r in responses if r.WhichOneof("event") == "complete"}
    assert sorted(completes) == [0, 1, 2] and responses[-1].WhichOneof("event") == "complete"
    for index in range(3):
        streamed = [t for r in responses if r.index == index and r.WhichOneof("event") == "chunk" for t in r.chunk.token_ids]
        alone = list(stub.Generate(build_request(MULTIHOP, max_new_tokens=10, temperature=1.0, seed=11 + index),
                                   timeout=60))[-1].complete
        assert completes[index].text == alone.text and len(streamed) == completes[index].usage.generated_tokens
    assert completes[1].usage.cached_tokens == completes[0].usage.prompt_tokens  # the prompt was prefilled once

    out = client.completions.create(model=model_name, prompt=MULTIHOP, max_tokens=10, temperature=1.0, seed=11, n=3)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [completes[i].text for i in range(3)]
    assert out.usage.prompt_tokens == completes[0].usage.prompt_tokens
    assert out.usage.completion_tokens == sum(c.usage.generated_tokens for c in completes.values())

    messages = [{"role": "user", "content": MULTIHOP}]
    whole = client.chat.completions.create(model=model_name, messages=messages, max_tokens=10, temperature=1.0,
                                           seed=5, n=2)
    chunks = list(client.chat.completions.create(model=model_name, messages=messages, max_tokens=10, temperature=1.0,
                                                 seed=5, n=2, stream=True, stream_options={"include_usage": True}))
    for choice in whole.choices:
        deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert "".join(deltas) == choice.message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].index == choice.index][-1] \
            == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_models_list(client, model_name, server):
    [card] = client.models.list().data
    assert card.id == model_name and card.owned_by == "kvpilot"
    assert card.model_extra["max_model_len"] == server.server.async_engine.engine.model_config.max_position_embeddings
    assert client.models.retrieve(model_name).id == model_name


def test_bounded_policy_through_extra_body_evicts(client, model_name):
    budget, interval = 28, 8
    out = client.completions.create(model=model_name, prompt=VARIABLES, max_tokens=24, temperature=0, extra_body={
        "kv_policy": "streaming_llm", "kv_budget": budget, "kv_interval": interval, "kv_window": 16, "kv_sinks": 4})
    kv = out.usage.model_extra["kv"]
    assert out.usage.prompt_tokens > budget + interval
    assert kv["evicted_tokens"] > 0 and kv["compression_events"] > 0 and kv["fallbacks"] == 0
    assert kv["peak_kv_slots"] <= budget + interval + 4  # + max_lag


def test_sessions_continue_across_requests(client, model_name, http):
    first = http.post("/v1/chat/completions", json={
        "model": model_name, "messages": [{"role": "user", "content": MULTIHOP}], "max_tokens": 6, "temperature": 0,
        "create_session": True})
    assert first.status_code == 200, first.text
    sid = first.json()["session_id"]
    assert first.headers["kvpilot-session-id"] == sid
    second = client.completions.create(model=model_name, prompt=" k75", max_tokens=4, temperature=0,
                                       extra_body={"session_id": sid})
    assert second.model_extra["session_id"] == sid
    assert second.usage.prompt_tokens_details.cached_tokens > 0


def test_errors_carry_the_grpc_messages_and_the_server_keeps_serving(http, server, model_name, client):
    base = {"model": model_name, "prompt": MULTIHOP, "max_tokens": 4}

    def error(response, status: int) -> dict:
        assert response.status_code == status, response.text
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        return err

    code, details = grpc_error(server, policy="streaming_llm", budget=10)  # not above sinks + window
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    err = error(http.post("/v1/completions", json=base | {"kv_policy": "streaming_llm", "kv_budget": 10}), 400)
    assert err["message"] == details and err["code"] == "INVALID_ARGUMENT" and err["type"] == "invalid_request_error"
    assert err["param"] == "kv_budget"

    code, details = grpc_error(server, policy="no_such_policy", budget=64)
    err = error(http.post("/v1/completions", json=base | {"kv_policy": "no_such_policy", "kv_budget": 64}), 400)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and err["message"] == details and err["param"] == "kv_policy"

    code, details = grpc_error(server, temperature=101.0)
    assert error(http.post("/v1/completions", json=base | {"temperature": 101}), 400)["message"] == details

    err = error(http.post("/v1/completions", json=base | {"kv_budget": "lots"}), 400)
    assert err["param"] == "kv_budget" and "integer" in err["message"]

    err = error(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
                404)
    assert err["code"] == "model_not_found" and "gpt-4o" in err["message"]

    err = error(http.post("/v1/completions", content=b'{"prompt": "Q: start', headers={"content-type": "application/json"}),
                400)
    assert "JSON" in err["message"]

    for field, value, grpc_field in (("min_p", 1.5, "min_p"), ("repetition_penalty", 0, "repetition_penalty"),
                                     ("presence_penalty", 2.5, "presence_penalty"),
                                     ("frequency_penalty", -3, "frequency_penalty"), ("min_tokens", 9, "min_tokens")):
        code, details = grpc_error(server, **{grpc_field: value})  # max_new_tokens is 4: min_tokens 9 is too many
        err = error(http.post("/v1/completions", json=base | {field: value}), 400)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and err["message"] == details and err["param"] == field
        assert details.startswith(f"{field} must be in")
    assert error(http.post("/v1/completions", json=base | {"min_p": "high"}), 400)["param"] == "min_p"
    code, details = grpc_error(server, logprobs=21)
    err = error(http.post("/v1/completions", json=base | {"logprobs": 21}), 400)
    assert err["message"] == details and err["param"] == "logprobs" and details.startswith("logprobs must be in")
    chat = {"model": model_name, "messages": [{"role": "user", "content": MULTIHOP}], "max_tokens": 2}
    err = error(http.post("/v1/chat/completions", json=chat | {"top_logprobs": 3}), 400)
    assert err["param"] == "top_logprobs" and "logprobs" in err["message"]
    assert error(http.post("/v1/chat/completions", json=chat | {"logprobs": True, "top_logprobs": 25}),
                 400)["param"] == "logprobs"
    for n in (0, 17):
        code, details = grpc_error(server, n=n)
        err = error(http.post("/v1/completions", json=base | {"n": n}), 400)
        assert err["message"] == details and err["param"] == "n" and details.startswith("n must be in [1, 16]")
    assert error(http.post("/v1/completions", json=base | {"n": "two"}), 400)["param"] == "n"
    err = error(http.post("/v1/completions", json=base | {"n": 2, "create_session": True}), 400)
    assert "cannot continue or create a session" in err["message"]
    code, details = grpc_error(server, session_id="never-made")
    err = error(http.post("/v1/completions", json=base | {"session_id": "never-made"}), 404)
    assert code == grpc.StatusCode.NOT_FOUND and err["message"] == details
    assert error(http.get("/v1/no-such-route"), 404)["type"] == "invalid_request_error"

    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_name, prompt=MULTIHOP, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="not-" + model_name, prompt=MULTIHOP, max_tokens=4)

    # Unknown fields are ignored (as vLLM); the server still serves, and nothing leaked.
    ok = http.post("/v1/completions", json=base | {"temperature": 0, "some_future_field": {"x": 1}})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == grpc_text(server, MULTIHOP, 4)
    engine = server.server.async_engine.engine
    deadline = time.monotonic() + 10
    while (engine.running or engine.waiting) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not engine.running and not engine.waiting


def test_health_and_metrics(http, client, model_name):
    assert http.get("/health").status_code == 200
    client.completions.create(model=model_name, prompt=VARIABLES, max_tokens=8, temperature=0,
                              extra_body={"kv_policy": "streaming_llm", "kv_budget": 28, "kv_interval": 8})
    http.post("/v1/completions", json={"prompt": MULTIHOP, "max_tokens": 0})  # an error outcome
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("gen_ai_server_time_to_first_token_seconds_bucket", "gen_ai_server_time_per_output_token_seconds_count",
                 "gen_ai_server_request_duration_seconds_sum", "kvpilot_requests_total", "kvpilot_tokens_total",
                 "kvpilot_requests_running", "kvpilot_requests_waiting", "kvpilot_kv_pool_blocks",
                 "kvpilot_kv_pool_free_blocks", "kvpilot_kv_pool_usage", "kvpilot_evicted_tokens_total",
                 "kvpilot_decode_tokens_total"):
        assert re.search(rf"^{name}\{{", text, re.M), name
    assert re.search(r'^kvpilot_requests_total\{.*error_type="INVALID_ARGUMENT".*outcome="error"', text, re.M)
    assert re.search(r'^kvpilot_requests_total\{.*kvpilot_api="http".*outcome="(length|eos|stop)"', text, re.M)
    blocks = re.search(r"^kvpilot_kv_pool_blocks\{.*\} (\S+)$", text, re.M)
    assert float(blocks.group(1)) > 0


def test_bearer_auth_guards_the_api_but_not_health():
    security = TransportSecurity(auth=BearerAuth({"s3cret": "alice"}))
    with BackgroundServer(bundled_engine(), http_address="127.0.0.1:0", security=security) as srv:
        url = f"http://{srv.http_address}"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.completions.create(model=srv.server.async_engine.engine.loaded.name, prompt=MULTIHOP,
                                       max_tokens=2, temperature=0).usage.completion_tokens >= 1
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + "/v1/completions", json={"prompt": "x"}).json()["error"]["code"] == "UNAUTHENTICATED"


def test_kvpilot_serve_http_port(tmp_path):
    """The CLI flag: gRPC and HTTP in one process, /metrics from the OTel Prometheus reader `kvpilot serve` installs."""
    env = dict(os.environ, KVPILOT_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "kvpilot.cli", "serve", "--address", "127.0.0.1:0", "--http-port", "0",
                             "--kv-pool-mb", "8", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    try:
        lines = []
        address = None
        deadline = time.monotonic() + 120
        while address is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"HTTP API on http://(\S+)/v1", line)
            address = found.group(1) if found else None
        assert address, "".join(lines)
        url = f"http://{address}"
        assert httpx.get(url + "/health").status_code == 200
        out = httpx.post(url + "/v1/completions", json={"prompt": MULTIHOP, "max_tokens": 3, "temperature": 0},
                         timeout=60).json()
        assert out["usage"]["completion_tokens"] >= 1, json.dumps(out)
        text = httpx.get(url + "/metrics").text
        for name in ("gen_ai_server_request_duration_seconds_count", "kvpilot_kv_pool_free_blocks",
                     "kvpilot_decode_tokens_total"):  # the last one made by the engine before the provider was set
            assert name in text, name
    finally:
        proc.terminate()
        proc.wait(timeout=30)
