"""`kvpilot demo`: the main job. Starts the decoder in-process (engine + embedded policy + default model) behind
a real gRPC server on loopback, runs one episode through the client with the full cache and again under a bounded
policy (`--compare`, `--compare-budget`), streams both and prints peak KV and answers side by side."""
from __future__ import annotations

import sys
import time

from kvpilot.runtime import build_engine, runtime_options
from decoder_service.server import BackgroundServer
from kvpilot.client import build_request, connect, format_usage, stream_to_terminal

RANDOM_MODEL_PROMPT = "kvpilot serves long reasoning with a bounded KV cache. Question:"


def run_demo(args) -> int:
    started = time.monotonic()
    engine = build_engine(runtime_options(args))
    with BackgroundServer(engine) as server:
        print(f"kvpilot demo: decoder on {server.address}, model {engine.loaded.name} "
              f"({engine.model.num_parameters() / 1e6:.2f} M parameters, {engine.device}), "
              f"KV pool {engine.pool.capacity_bytes / 2**20:.0f} MiB "
              f"({engine.loaded.config.num_layers} layers x {engine.loaded.config.num_kv_heads} KV heads, "
              f"{engine.pool.slot_bytes} bytes per token)")
        stub = connect(server.address)
        if getattr(engine.tokenizer, "inner", None) is not None and _has_tasks(engine):
            from kvpilot.agent import run_episode_demo

            results = [(args.policy, args.budget, run_episode_demo(stub, engine, args))]
            if args.policy == "full" and args.compare != "none":
                print(f"\nThe same episode again under {args.compare} with {args.compare_budget} KV slots:\n")
                results.append((args.compare, args.compare_budget,
                                run_episode_demo(stub, engine, args, args.compare, args.compare_budget, intro=False)))
                print_comparison(results, engine.pool.slot_bytes)
            ok = all(r.answered for _, _, r in results)
        else:
            print("(random-weight model: the text is noise; the stream, the KV accounting and the usage are real)\n")
            print(f"prompt: {RANDOM_MODEL_PROMPT}\n--- stream ---")
            request = build_request(RANDOM_MODEL_PROMPT, max_new_tokens=48, temperature=0.0,
                                    policy=args.policy, budget=args.budget)
            complete = stream_to_terminal(stub, request)
            print("--- usage ---")
            print(format_usage(complete))
            ok = complete.usage.generated_tokens > 0
    print(f"demo finished in {time.monotonic() - started:.1f} s")
    return 0 if ok else 1


def print_comparison(results, slot_bytes: int) -> None:
    """Full cache and bounded policy side by side: what the memory bought and what it cost."""
    print("\n--- side by side ---")
    print(f"{'policy':<14} {'budget':>7} {'peak KV':>16} {'evicted':>8} {'answer':<16} verdict")
    for policy, budget, r in results:
        answer = r.episode.extract_answer(r.text)
        peak = f"{r.peak_kv_slots} ({r.peak_kv_slots * slot_bytes / 1024:.0f} KiB)"
        print(f"{policy:<14} {budget or '-':>7} {peak:>16} {r.evicted_tokens:>8} {str(answer):<16} "
              f"{'RIGHT' if r.correct else 'WRONG'}")
    full, bounded = results[0][2], results[-1][2]
    if full.peak_kv_slots:
        print(f"peak KV {bounded.peak_kv_slots / full.peak_kv_slots:.0%} of the full cache's")


def _has_tasks(engine) -> bool:
    """The task demo needs the bundled reasoner's vocabulary (the random model's tokenizer lacks it)."""
    try:
        from kvpilot.tasks import TASKS  # noqa: F401
    except ImportError:
        return False
    return engine.tokenizer.token_to_id("<call>") is not None


if __name__ == "__main__":
    from kvpilot.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))
