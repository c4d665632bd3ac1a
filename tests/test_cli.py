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


def test_demo_streams_tokens_and_usage(tmp_path):
    out = subprocess.run(KVPILOT + ["demo", "--kv-pool-mb", "16"], env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "--- stream ---" in out.stdout or "answer" in out.stdout.lower()
    assert "finish:" in out.stdout and "KV: peak" in out.stdout


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
