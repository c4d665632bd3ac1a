"""CLI smoke tests: the real console script in subprocesses."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc

KVPILOT = [sys.executable, "-m", "kvpilot.cli"]


def env(tmp_path):
    e = dict(os.environ, KVPILOT_HOME=str(tmp_path / "home"), PYTHONUNBUFFERED="1")
    return e


def test_demo_streams_a_multihop_episode_and_checks_the_answer(tmp_path):
    out = subprocess.run(KVPILOT + ["demo", "--kv-pool-mb", "16"], env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "model reasoner" in out.stdout and "task multihop" in out.stdout
    assert "--- stream, full cache (tool outputs dimmed) ---" in out.stdout and "<call>" in out.stdout
    assert "<tool> #0" in out.stdout
    # The bundled model solves the demo's episode with the full cache: the verdict line says so.
    assert "expected" in out.stdout and ": RIGHT" in out.stdout, out.stdout[-600:]
    assert "peak KV" in out.stdout and "evicted 0 in 0 compressions" in out.stdout
    # Then the same episode under rkv with 112 slots, and the two side by side.
    assert "--- stream, policy rkv, budget 112 slots" in out.stdout and "[evicted " in out.stdout
    table = out.stdout.split("--- side by side ---")[1].splitlines()
    full = next(line for line in table if line.startswith("full")).split()
    bounded = next(line for line in table if line.startswith("rkv")).split()
    assert int(bounded[2]) < int(full[2]) and int(bounded[5]) > 0 == int(full[5])  # peak slots, evicted
    assert "of the full cache's" in out.stdout


def test_demo_with_a_budget_shows_evictions(tmp_path):
    out = subprocess.run(KVPILOT + ["demo", "--kv-pool-mb", "16", "--policy", "rkv", "--budget", "96"],
                         env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[evicted " in out.stdout and "->96 slots]" in out.stdout
    assert "evicted 0 in 0 compressions" not in out.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_then_generate(tmp_path):
    port = free_port()
    server = subprocess.Popen(KVPILOT + ["serve", "--address", f"127.0.0.1:{port}", "--kv-pool-mb", "16"],
                              env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{port}")).result(timeout=120)
        out = subprocess.run(KVPILOT + ["generate", "Hello", "--url", f"127.0.0.1:{port}", "--max-new-tokens", "8",
                                        "--temperature", "0"], env=env(tmp_path), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "generated 8" in out.stderr or "finish: eos" in out.stderr
        bad = subprocess.run(KVPILOT + ["generate", "Hello", "--url", f"127.0.0.1:{port}", "--policy", "nope", "--budget", "64"],
                             env=env(tmp_path), capture_output=True, text=True, timeout=120)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "unknown policy" in bad.stderr
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_kvpilot_up_serves_with_ray_policy_and_redis(tmp_path, redis_url):
    """`kvpilot up`: Redis + Ray-served policy + decoder from one command; a compressed request goes through
    the remote policy (no fallbacks) and the session lands in Redis."""
    decoder, policy = free_port(), free_port()
    up_env = dict(env(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(KVPILOT + ["up", "--address", f"127.0.0.1:{decoder}", "--policy-address", f"127.0.0.1:{policy}",
                                       "--redis-url", redis_url, "--kv-pool-mb", "16", "--max-replicas", "1"],
                            env=up_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        grpc.channel_ready_future(grpc.insecure_channel(f"127.0.0.1:{decoder}")).result(timeout=240)
        from kvpilot.client import build_request, connect

        stub = connect(f"127.0.0.1:{decoder}")
        request = build_request(token_ids=list(range(3, 200)), max_new_tokens=40, temperature=0.0, policy="h2o",
                                budget=64, interval=16, window=16, new_session=True)
        final = list(stub.Generate(request, timeout=120))[-1].complete
        assert final.usage.compression_events > 0 and final.usage.fallbacks == 0, final
        assert not final.warnings
        import redis

        assert redis.Redis.from_url(redis_url).exists(f"kvpilot:session:{{{final.session_id}}}")
        from kvpilot_protocol.v1 import decoder_pb2 as pb

        stub.DeleteSession(pb.DeleteSessionRequest(session_id=final.session_id))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch):
    import io

    from kvpilot.agent import YELLOW, styled

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert styled("x", YELLOW, io.StringIO()) == "x"  # a pipe or a file: plain text
    assert styled("x", YELLOW, Terminal()) == "\033[33mx\033[0m"
    monkeypatch.setenv("NO_COLOR", "1")
    assert styled("x", YELLOW, Terminal()) == "x"
