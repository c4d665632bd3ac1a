"""The decoder with a policy service in another process/server: identical decisions, failure and recovery."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from kvpilot_protocol.frame import MergePlanSpec
from policy_service.local import InProcessPolicy
from decoder_service.remote_policy import RemotePolicy
from decoder_service.requests import CompressionConfig, EvictionEvent, FinishEvent, GenerationRequest, SamplingParams
from policy_service.server import BackgroundPolicyServer

PROMPT = list(range(3, 123))


def request(rid="r", policy="h2o", budget=40, n=50, max_lag=4, prompt=PROMPT):
    return GenerationRequest(rid, list(prompt), SamplingParams(temperature=0, max_new_tokens=n, ignore_eos=True, seed=3),
                             compression=CompressionConfig(policy=policy, budget=budget, interval=8, window=8, sinks=4,
                                                           max_lag=max_lag))


def run(engine, req):
    events = []
    engine.add_request(req, events.append)
    engine.run_until_done()
    return events


@pytest.fixture
def policy_server():
    with BackgroundPolicyServer() as server:
        yield server


@pytest.fixture
def remote(policy_server):
    client = RemotePolicy(policy_server.address)
    assert client.wait_until_available(10), "policy client never connected"
    yield client
    client.close()


def same_plan(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, MergePlanSpec):
        return (a.groups == b.groups and a.anchors == b.anchors and a.guards == b.guards
                and all(torch.allclose(torch.tensor(x), torch.tensor(y)) for x, y in zip(a.weights, b.weights)))
    return a is None or (torch.equal(a.indices, b.indices) and a.guards == b.guards)


@pytest.mark.parametrize("policy, params", [("h2o", {}), ("snapkv", {}), ("rkv", {}), ("vase", {}),
                                            ("triattention", {}), ("triattention", {"mode": "per_kv_head"}),
                                            ("cask", {"base": "rkv", "recent_window": "8"}),
                                            ("cask", {"recent_window": "8"})])
def test_remote_and_in_process_give_identical_decisions(make_engine, remote, policy, params):
    """Frame by frame: the same frame decided in-process and by the service gives the same plan."""
    engine = make_engine(prefill_chunk=64)
    frames = []
    decide = engine.compressor.policy.decide
    engine.compressor.policy.decide = lambda frame, name, params=None: (frames.append((frame, name)), decide(frame, name, params))[1]
    req = request(policy=policy)
    req.compression.params = dict(params)
    run(engine, req)
    assert len(frames) >= 3
    kinds = set()
    for frame, scorer in frames:
        local = InProcessPolicy().decide(frame, policy, params)
        key = remote.submit(frame, policy, params, {})
        deadline = time.monotonic() + 10
        while (result := remote.poll(key)) is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert result is not None and not isinstance(result, Exception) and not result.note, getattr(result, "note", result)
        assert same_plan(result.plan, local.plan)
        assert result.seed == frame.seed
        kinds.add(type(local.plan).__name__)
    if policy == "cask":
        assert "MergePlanSpec" in kinds, "cask must have merged at least once in this run"


def test_synchronous_remote_reproduces_in_process_generation(make_engine, remote):
    """With max_lag 0 the sequence waits for each decision: tokens and evictions equal the embedded run."""
    local = run(make_engine(prefill_chunk=64), request(max_lag=0))
    engine = make_engine(prefill_chunk=64)
    engine.compressor.policy = remote
    far = run(engine, request(max_lag=0))
    assert far[-1].token_ids == local[-1].token_ids
    local_ev = [(e.frame_id, e.slots_before, e.slots_after) for e in local if isinstance(e, EvictionEvent)]
    far_ev = [(e.frame_id, e.slots_before, e.slots_after) for e in far if isinstance(e, EvictionEvent)]
    assert far_ev == local_ev and far[-1].usage.fallbacks == 0


def test_asynchronous_decisions_keep_the_bound_and_count_staleness(make_engine, remote):
    engine = make_engine(prefill_chunk=64)
    engine.compressor.policy = remote
    counts = []
    engine.step_hooks.append(lambda e, s: counts.append(s.kv.n))
    events = run(engine, request(n=120, max_lag=6))
    final = events[-1]
    assert isinstance(final, FinishEvent) and final.usage.generated_tokens == 120
    assert max(counts) <= 40 + 8 + 6
    evictions = [e for e in events if isinstance(e, EvictionEvent)]
    assert evictions and final.usage.compression_events == len(evictions)
    assert all(e.staleness_steps <= 6 for e in evictions if not e.fallback)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_policy_process(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "kvpilot.cli", "policy", "serve", "--address", f"127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    line = proc.stdout.readline()
    assert "policy service on" in line, f"policy service did not start: {line}{proc.stdout.read() if proc.poll() is not None else ''}"
    return proc


def test_policy_service_killed_mid_generation_then_back(make_engine):
    """Kill -9 the policy process while streams decode: all complete, fallbacks counted, then it reconnects."""
    port = free_port()
    proc = start_policy_process(port)
    client = RemotePolicy(f"127.0.0.1:{port}", backoff_s=(0.05, 0.2))
    try:
        assert client.wait_until_available(20)
        engine = make_engine(prefill_chunk=64)
        engine.compressor.policy = client
        done = {}
        for i in range(4):
            engine.add_request(request(f"r{i}", n=150, prompt=PROMPT[i:]),
                               lambda ev, i=i: isinstance(ev, FinishEvent) and done.setdefault(i, ev))
        killed = False
        while engine.has_work():
            engine.step()
            if not killed and sum(s.usage.compression_events for s in engine.running) >= 6:
                proc.kill()
                proc.wait()
                killed = True
        assert killed and len(done) == 4
        assert all(ev.usage.generated_tokens == 150 for ev in done.values())
        assert sum(ev.usage.fallbacks for ev in done.values()) > 0
        assert not client.available
        proc = start_policy_process(port)
        assert client.wait_until_available(20), "client did not reconnect to the restarted service"
        after = run(engine, request("again"))
        assert after[-1].usage.fallbacks == 0 and after[-1].usage.compression_events > 0
        assert client.reconnects >= 1
    finally:
        client.close()
        proc.kill()
        proc.wait()


def test_policy_process_serves_its_own_prometheus_metrics(make_engine):
    """`kvpilot policy serve --metrics-port`: decisions by policy and outcome, and decide seconds, scraped."""
    import urllib.request

    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvpilot.cli", "policy", "serve", "--address", f"127.0.0.1:{port}",
                             "--metrics-port", str(metrics_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))
    try:
        assert "policy metrics on" in proc.stdout.readline()
        assert "policy service on" in proc.stdout.readline()
        client = RemotePolicy(f"127.0.0.1:{port}")
        assert client.wait_until_available(20)
        engine = make_engine(prefill_chunk=64)
        engine.compressor.policy = client
        done = engine.generate([request("m", n=60)])
        assert done[0].usage.compression_events > done[0].usage.fallbacks  # some decided remotely (late ones fall back)
        client.close()
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        decided = re.search(r'^kvpilot_policy_decisions_total\{[^}]*kvpilot_policy="h2o"[^}]*outcome="ok"[^}]*\} (\S+)$',
                            text, re.M)
        assert decided and float(decided.group(1)) >= 1, text[-2000:]
        assert re.search(r'^kvpilot_policy_decide_duration_seconds_bucket\{', text, re.M)
    finally:
        proc.kill()
        proc.wait()
    bad = subprocess.run([sys.executable, "-m", "kvpilot.cli", "policy", "serve", "--ray", "--metrics-port", "9000"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Ray Serve replicas run in their own processes" in bad.stderr
