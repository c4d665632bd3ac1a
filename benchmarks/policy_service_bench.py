"""Policy service: round-trip latency, decisions/s per replica, and decode-step staleness of applied
decisions at interval 64 and 128, with the plain gRPC server and with 1 and 2 Ray Serve replicas, in one run.

    python benchmarks/policy_service_bench.py [--batch 8] [--new-tokens 384] [--seconds 8]

Frames are real: snapshots of the small random-weight model's cache (h2o statistics). Round trip = frame sent
on the Decide stream -> decision back in the decoder's client. Throughput = frames kept in flight by 8
submitters for --seconds, divided by the number of replicas. Staleness = decode steps of the sequence between
the snapshot and the application of its decision (reported per applied decision), with max_lag 16.
Writes benchmarks/results/policy_service_<device>.csv.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, write_csv

from benchmarks.decode_throughput import make_model
from decoder_service.checkpoint import load_checkpoint
from decoder_service.engine import Engine, EngineConfig
from policy_service.local import InProcessPolicy
from decoder_service.remote_policy import RemotePolicy
from decoder_service.requests import CompressionConfig, EvictionEvent, GenerationRequest, SamplingParams
from policy_service.server import BackgroundPolicyServer

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_frames(loaded, count: int):
    """Real frames: snapshot an h2o-compressed generation's cache at each compression."""
    engine = Engine(loaded, EngineConfig(kv_pool_bytes=256 << 20, prefill_chunk=512), policy=InProcessPolicy())
    frames = []
    decide = engine.compressor.policy.decide
    engine.compressor.policy.decide = lambda f, name, p=None: (frames.append(f), decide(f, name, p))[1]
    engine.generate([GenerationRequest("f", list(range(3, 300)), SamplingParams(temperature=0, max_new_tokens=64 * count,
                                                                               ignore_eos=True),
                                       compression=CompressionConfig(policy="h2o", budget=256, interval=64, window=32))])
    return frames[:count]


def round_trips(client: RemotePolicy, frames, repeats: int) -> list[float]:
    out = []
    for r in range(repeats):
        for i, frame in enumerate(frames):
            frame.frame_id = r * len(frames) + i + 1
            frame.session_id = f"rt-{i % 4}"
            start = time.perf_counter()
            key = client.submit(frame, "h2o", {}, {})
            while (result := client.poll(key)) is None:
                time.sleep(0.0002)
            assert not isinstance(result, Exception) and not result.note, result
            out.append(time.perf_counter() - start)
    return out


def throughput(client: RemotePolicy, frames, seconds: float, submitters: int = 8) -> float:
    done = [0] * submitters
    stop = time.monotonic() + seconds

    def work(w: int) -> None:
        i = 0
        while time.monotonic() < stop:
            # A copy per submission: the submitters share the sample frames.
            frame = dataclasses.replace(frames[i % len(frames)], frame_id=(w << 32) + i + 1, session_id=f"tp-{w}")
            key = client.submit(frame, "h2o", {}, {})
            while (result := client.poll(key)) is None:
                time.sleep(0.0002)
            done[w] += 1
            i += 1

    threads = [threading.Thread(target=work, args=(w,)) for w in range(submitters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / seconds


def staleness(loaded, client: RemotePolicy, interval: int, batch: int, new_tokens: int) -> dict:
    engine = Engine(loaded, EngineConfig(kv_pool_bytes=256 << 20, max_running=batch, prefill_chunk=512), policy=InProcessPolicy())
    engine.compressor.policy = client
    events = []
    for i in range(batch):
        engine.add_request(GenerationRequest(f"s{i}-{interval}-{time.monotonic_ns()}", list(range(3 + i, 260 + i)),
                                             SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True),
                                             compression=CompressionConfig(policy="h2o", budget=256, interval=interval,
                                                                           window=32, max_lag=16)),
                           lambda ev: events.append(ev) if isinstance(ev, EvictionEvent) else None)
    engine.run_until_done()
    applied = [e.staleness_steps for e in events if not e.fallback]
    return dict(events=len(events), fallbacks=sum(e.fallback for e in events),
                staleness_mean=statistics.mean(applied) if applied else float("nan"),
                staleness_max=max(applied) if applied else -1)


def measure(name: str, replicas: int, address: str, loaded, frames, args, streams: int) -> list[dict]:
    client = RemotePolicy(address, streams=streams)
    assert client.wait_until_available(60), f"{name}: no connection to {address}"
    rt = round_trips(client, frames, args.repeats)
    tput = throughput(client, frames, args.seconds)
    rows = []
    for interval in (64, 128):
        st = staleness(loaded, client, interval, args.batch, args.new_tokens)
        rows.append(dict(service=name, replicas=replicas, interval=interval,
                         rtt_p50_ms=1e3 * statistics.median(rt), rtt_p95_ms=1e3 * sorted(rt)[int(0.95 * len(rt))],
                         decisions_per_s=tput, decisions_per_s_per_replica=tput / replicas, **st))
        print(f"{name:>10} x{replicas} interval {interval:>3}: rtt p50 {rows[-1]['rtt_p50_ms']:.2f} ms, "
              f"p95 {rows[-1]['rtt_p95_ms']:.2f} ms, {tput:.0f} decisions/s ({tput / replicas:.0f}/replica), "
              f"staleness mean {st['staleness_mean']:.2f} max {st['staleness_max']} steps, "
              f"{st['fallbacks']}/{st['events']} fallbacks", flush=True)
    client.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ray-cpus", type=int, default=4)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_checkpoint(make_model("small", Path(tmp), torch.float32))
        frames = sample_frames(loaded, 6)
        rows = []
        with BackgroundPolicyServer() as plain:
            rows += measure("grpc", 1, plain.address, loaded, frames, args, streams=1)
        if not args.skip_ray:
            from policy_service import ray_app

            port = free_port()
            for replicas in (1, 2):
                config = ray_app.RayPolicyConfig(grpc_port=port, http_port=free_port(), min_replicas=replicas,
                                                 max_replicas=replicas, num_cpus=0.25)
                ray_app.start(config, num_cpus=args.ray_cpus)
                time.sleep(2)
                rows += measure("ray-serve", replicas, f"127.0.0.1:{port}", loaded, frames, args, streams=2 * replicas)
            ray_app.shutdown()
    out = RESULTS / "policy_service_cpu.csv"
    write_csv(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
