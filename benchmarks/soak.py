"""Soak: a bounded mixed load on two decoders sharing Redis, to show that one bad request or one fault never
hurts another stream and that memory returns to baseline.

    python benchmarks/soak.py [--requests 300] [--concurrency 8] [--seed 0] [--redis-url redis://127.0.0.1:6379/0]

Starts two `kvpilot serve` processes (bundled model, --persist-kv, 16 MiB pool, 1 thread each) and sends a
seeded mix of five categories from a thread pool: `innocent` streams (greedy or sampled, some compressed),
`cancelled` streams (cancelled after 1-5 messages; half create a session whose id is read from the
`kvpilot-session-id` initial metadata), `bad` requests (each known kind of invalid input, plus an accepted
1e-40 temperature), multi-turn `session`s alternating decoders A, B, A..., and `deadline` requests (timeout
0.05-0.3 s). A session counts as one request of the mix; each of its turns is a row. At the end every session
is deleted, the decoders drain, and GetServerInfo must show no reserved pool slots.
Reports statuses per category, the max gap between messages of innocent streams, RSS growth per decoder and
leaked slots; writes benchmarks/results/soak_cpu.csv (one row per request) and soak_summary_cpu.csv.
Exit code 1 when slots leaked or any request ended with a status other than the expected one.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, write_csv
from kvpilot.client import build_request, connect
from kvpilot.tasks import make_episode
from kvpilot_protocol.v1 import decoder_pb2 as pb

CATEGORIES = ("innocent", "cancelled", "bad", "session", "deadline")
POLICIES = ("rkv", "snapkv", "h2o", "streaming_llm")
SESSION_METADATA = "kvpilot-session-id"
VOCAB = 351  # the bundled tokenizer; ids 0-2 are <bos>, <eos>, <pad>


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Decoder:
    """One `kvpilot serve` process; stdout/stderr go to files so a chatty server can never block on a pipe."""

    def __init__(self, name: str, redis_url: str, logdir: Path):
        self.name, self.address = name, f"127.0.0.1:{free_port()}"
        self.out, self.err = logdir / f"{name}.out", logdir / f"{name}.err"
        cmd = [sys.executable, "-m", "kvpilot.cli", "serve", "--address", self.address, "--redis-url", redis_url,
               "--persist-kv", "--kv-pool-mb", "16", "--threads", "1"]
        root = Path(__file__).resolve().parents[1]
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=root)
        self.stub = connect(self.address)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while "serving" not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"decoder {self.name} did not start:\n{self.err.read_text()[-2000:]}")
            time.sleep(0.2)

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def info(self) -> pb.ServerInfo:
        return self.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def stream(stub, request, timeout=None, cancel_after=None) -> dict:
    """One Generate call: status name, messages, max gap between consecutive messages (from the first one),
    and the session id the server sent in the initial metadata."""
    call = stub.Generate(request, timeout=timeout)
    messages, last, max_gap, final, session = 0, None, 0.0, False, ""
    try:
        for response in call:
            now = time.perf_counter()
            max_gap = max(max_gap, now - last) if last is not None else 0.0
            last, messages = now, messages + 1
            final |= response.WhichOneof("event") == "complete"
            if messages == 1:
                session = dict(call.initial_metadata()).get(SESSION_METADATA, "")
            if cancel_after is not None and messages >= cancel_after:
                call.cancel()
                break
        status = call.code().name
    except grpc.RpcError as exc:
        status = exc.code().name
    if status == "OK" and not final:
        status = "OK_WITHOUT_FINAL"  # the API promises exactly one final message
    return dict(status=status, messages=messages, max_gap_s=max_gap, session=session)


def make_plan(args, prefix: str) -> list[dict]:
    """The whole mix, drawn up front from --seed so thread scheduling cannot change it."""
    rng = random.Random(args.seed)
    prompts = [make_episode(task, s, "easy").prompt for task in ("multihop", "variables", "graph") for s in range(8)]
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(args.requests)]
    rng.shuffle(cats)

    def normal(**extra) -> dict:
        kw = dict(max_new_tokens=rng.randint(48, 128), temperature=rng.choice((0.0, 0.7)), seed=rng.randrange(1 << 31))
        if rng.random() < 0.25:
            kw["token_ids"] = [rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 64))]
        else:
            kw["text"] = rng.choice(prompts)
        if rng.random() < 0.5:
            kw.update(policy=rng.choice(POLICIES), budget=rng.randint(48, 96), interval=16)
        return kw | extra

    bad = [  # kind, request arguments over a greedy text request, expected status
        ("temperature=-1", dict(temperature=-1.0), "INVALID_ARGUMENT"),
        ("temperature=1e-40", dict(temperature=1e-40), "OK"),  # below 1e-5: greedy, accepted
        ("rkv window_queries=1e9", dict(policy="rkv", budget=64, params={"window_queries": "1000000000"}),
         "INVALID_ARGUMENT"),
        ("unknown policy", dict(policy="no_such_policy", budget=64), "INVALID_ARGUMENT"),
        ("budget<=sinks+window", dict(policy="h2o", budget=20, sinks=4, window=16), "INVALID_ARGUMENT"),
        ("session id with spaces", dict(session_id=f"{prefix} spaces", new_session=True), "INVALID_ARGUMENT"),
        ("unknown session", dict(session_id=f"{prefix}-missing"), "NOT_FOUND"),
        ("2 MiB text prompt", dict(text="k42 " * (1 << 19)), "INVALID_ARGUMENT"),
    ]
    plan, bad_sent = [], 0
    for n, cat in enumerate(cats):
        job = dict(n=n, category=cat, decoder=rng.randrange(2))
        if cat == "innocent":
            request = normal()
            job.update(kind="compressed" if "policy" in request else "full", request=request)
        elif cat == "cancelled":
            with_session = rng.random() < 0.5
            job.update(kind="cancel+session" if with_session else "cancel", cancel_after=rng.randint(1, 5),
                       request=normal(new_session=with_session))
        elif cat == "bad":  # each kind in turn
            kind, extra, expected = bad[bad_sent % len(bad)]
            bad_sent += 1
            base = dict(text=rng.choice(prompts), max_new_tokens=rng.randint(48, 128), temperature=0.0)
            job.update(kind=kind, expected=expected, request=base | extra)
        elif cat == "session":
            job.update(kind="session", session=f"{prefix}-{n}",
                       turns=[[rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 12))]
                              for _ in range(rng.randint(3, 4))])
        else:
            job.update(kind="deadline", timeout=rng.uniform(0.05, 0.3), request=normal())
        plan.append(job)
    return plan


def run_job(job: dict, decoders: list[Decoder], sessions: list) -> list[dict]:
    def row(kind, decoder, expected, result, seconds):
        return dict(category=job["category"], kind=kind, decoder=decoders[decoder].name, status=result["status"],
                    expected=expected, seconds=seconds, max_gap_s=result["max_gap_s"], messages=result["messages"])

    cat, d = job["category"], job["decoder"]
    if cat == "session":  # turns alternate A, B, A, ...: each continues from the shared store
        rows = []
        sessions.append((job["session"], "OK"))
        for t, ids in enumerate(job["turns"]):
            start = time.perf_counter()
            request = build_request(token_ids=ids, max_new_tokens=16, temperature=0, session_id=job["session"],
                                    new_session=t == 0)
            result = stream(decoders[t % 2].stub, request)
            if t == 0 and result["status"] == "OK" and result["session"] != job["session"]:
                result["status"] = "WRONG_SESSION_METADATA"
            rows.append(row(f"turn{t + 1}", t % 2, "OK", result, time.perf_counter() - start))
        return rows
    start = time.perf_counter()
    request = build_request(**job["request"])
    if cat == "cancelled":
        result = stream(decoders[d].stub, request, cancel_after=job["cancel_after"])
        if job["request"].get("new_session"):
            if result["session"]:
                sessions.append((result["session"], "OK|NOT_FOUND"))  # NOT_FOUND: cancelled before the session was kept
            elif result["messages"]:
                result["status"] = "NO_SESSION_METADATA"
        expected = "CANCELLED|OK"  # OK only if the stream ended before the cancel
    elif cat == "deadline":
        result = stream(decoders[d].stub, request, timeout=job["timeout"])
        expected = "DEADLINE_EXCEEDED|OK"
    else:
        result = stream(decoders[d].stub, request)
        expected = job.get("expected", "OK")
    return [row(job["kind"], d, expected, result, time.perf_counter() - start)]


def wait_idle(decoders: list[Decoder], timeout: float = 60.0) -> list[pb.ServerInfo]:
    deadline = time.monotonic() + timeout
    while True:
        infos = [d.info() for d in decoders]
        if all(i.running == 0 and i.waiting == 0 for i in infos) or time.monotonic() > deadline:
            return infos
        time.sleep(0.2)


def warm_up(decoders: list[Decoder], prefix: str) -> None:
    """Touch every code path once per decoder (full, compressed, a session) so the RSS baseline includes it."""
    for i, d in enumerate(decoders):
        for policy in ("", *POLICIES):
            stream(d.stub, build_request("Q: start k42 hops 4 .", max_new_tokens=64, temperature=0, policy=policy,
                                         budget=48 if policy else 0, interval=16))
        sid = f"{prefix}-warmup-{i}"
        stream(d.stub, build_request(token_ids=[5, 6, 7], max_new_tokens=16, temperature=0, session_id=sid,
                                     new_session=True))
        d.stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)


def found(decoder: Decoder, session_id: str) -> bool:
    try:
        decoder.stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=10)
        return True
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        return False


def sample_rss(decoders: list[Decoder], samples: list, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        samples.append([d.rss_mib() for d in decoders])


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    prefix = f"soak-{os.getpid()}-{int(time.time())}"  # session ids of this run only
    plan = make_plan(args, prefix)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as logdir:
        decoders = [Decoder(name, args.redis_url, Path(logdir)) for name in ("A", "B")]
        try:
            for d in decoders:
                d.wait_ready()
            warm_up(decoders, prefix)
            wait_idle(decoders)
            rss_start = [d.rss_mib() for d in decoders]
            samples, stop, sessions = [], threading.Event(), []
            sampler = threading.Thread(target=sample_rss, args=(decoders, samples, stop), daemon=True)
            sampler.start()
            run_start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                rows = [r for rs in pool.map(lambda job: run_job(job, decoders, sessions), plan) for r in rs]
            run_s = time.perf_counter() - run_start
            stop.set()
            sampler.join()
            wait_idle(decoders)  # cancelled streams may still be leaving the engine: their sessions are busy
            rng = random.Random(args.seed + 1)
            for sid, expected in sessions:  # each on either decoder: the store is shared
                d = rng.randrange(2)
                start = time.perf_counter()
                try:
                    decoders[d].stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)
                    status = "OK"
                except grpc.RpcError as exc:
                    status = exc.code().name
                rows.append(dict(category="delete", kind="delete", decoder=decoders[d].name, status=status,
                                 expected=expected, seconds=time.perf_counter() - start, max_gap_s=0.0, messages=0))
            time.sleep(1.5)  # longer than the engine's 1 s sweep of expired sessions' parked KV
            infos = wait_idle(decoders)
            rss_end = [d.rss_mib() for d in decoders]
            alive = [d.proc.poll() is None for d in decoders]
            # Diagnosis, after the measurement: GetSession makes a decoder check the store (a copy deleted
            # elsewhere is dropped), so what stays reserved after it is held by sessions it still answers for.
            known = [[sid for sid, _ in sessions if found(d, sid)] for d in decoders]
            after_touch = [d.info() for d in decoders]
        finally:
            for d in decoders:
                d.stop()
    total_s = time.perf_counter() - t0

    # Category x status table.
    counts = collections.Counter((r["category"], r["status"]) for r in rows)
    statuses = sorted({s for _, s in counts})
    print(f"\n{'category':<10}" + "".join(f"{s:>20}" for s in statuses))
    for cat in (*CATEGORIES, "delete"):
        print(f"{cat:<10}" + "".join(f"{counts.get((cat, s), 0):>20}" for s in statuses))
    gaps = [r["max_gap_s"] for r in rows if r["category"] == "innocent" and r["status"] == "OK"]
    summary = dict(requests=args.requests, rows=len(rows), sessions_deleted=len(sessions), run_s=run_s,
                   total_wall_s=total_s, innocent_max_gap_p50_s=pct(gaps, 0.5), innocent_max_gap_p99_s=pct(gaps, 0.99),
                   innocent_max_gap_max_s=max(gaps, default=float("nan")))
    print(f"\ninnocent streams: max gap between messages p50 {summary['innocent_max_gap_p50_s'] * 1e3:.0f} ms, "
          f"p99 {summary['innocent_max_gap_p99_s'] * 1e3:.0f} ms, max {summary['innocent_max_gap_max_s'] * 1e3:.0f} ms "
          f"({len(gaps)} streams)")
    problems = []
    for i, d in enumerate(decoders):
        during = max((s[i] for s in samples), default=float("nan"))
        info = infos[i]
        print(f"decoder {d.name}: RSS start {rss_start[i]:.1f} MiB, peak during {during:.1f}, end {rss_end[i]:.1f} "
              f"(growth {rss_end[i] - rss_start[i]:+.1f} MiB); pool_reserved_slots {info.pool_reserved_slots}, "
              f"parked_sessions {info.parked_sessions}, stats_reserved_bytes {info.stats_reserved_bytes}, "
              f"failures {dict(info.failures)}, step_failures {info.step_failures}, engine_alive {info.engine_alive}")
        summary |= {f"{d.name}_rss_start_mib": rss_start[i], f"{d.name}_rss_peak_mib": during,
                    f"{d.name}_rss_end_mib": rss_end[i], f"{d.name}_rss_growth_mib": rss_end[i] - rss_start[i],
                    f"{d.name}_leaked_slots": info.pool_reserved_slots, f"{d.name}_parked_sessions": info.parked_sessions,
                    f"{d.name}_stats_reserved_bytes": info.stats_reserved_bytes,
                    f"{d.name}_failures": ";".join(f"{k}={v}" for k, v in sorted(info.failures.items())),
                    f"{d.name}_step_failures": info.step_failures,
                    f"{d.name}_reserved_after_get_session": after_touch[i].pool_reserved_slots,
                    f"{d.name}_stats_bytes_after_get_session": after_touch[i].stats_reserved_bytes,
                    f"{d.name}_deleted_sessions_still_found": len(known[i])}
        if info.pool_reserved_slots:
            problems.append(f"decoder {d.name}: {info.pool_reserved_slots} pool slots still reserved "
                            f"({info.parked_sessions} parked sessions, {info.parked_slots} parked slots) after every "
                            f"session was deleted; after a GetSession of every deleted id on it: "
                            f"{after_touch[i].pool_reserved_slots} reserved, {after_touch[i].parked_sessions} parked, "
                            f"{len(known[i])} deleted sessions still found there {known[i][:4]}")
        if not alive[i] or not info.engine_alive:
            problems.append(f"decoder {d.name}: process alive {alive[i]}, engine alive {info.engine_alive}")
    for r in rows:
        if r["status"] not in r["expected"].split("|"):
            problems.append(f"{r['category']}/{r['kind']} on {r['decoder']}: got {r['status']}, expected "
                            f"{r['expected']} ({r['seconds']:.2f} s, {r['messages']} messages)")
    summary["unexpected"] = len(problems)
    print(f"\n{len(rows)} rows in {run_s:.0f} s of load; total wall time {total_s:.0f} s")
    print(f"wrote {write_csv(RESULTS / 'soak_cpu.csv', rows)}")
    print(f"wrote {write_csv(RESULTS / 'soak_summary_cpu.csv', [dict(metric=k, value=v) for k, v in summary.items()])}")
    for p in problems:
        print(f"UNEXPECTED: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
