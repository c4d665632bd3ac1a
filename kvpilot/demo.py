"""`kvpilot demo`: the main job. Starts the decoder in-process (engine + embedded policy + default model) behind
a real gRPC server on loopback, runs one request through the client, prints the stream and the usage."""
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

            ok = run_episode_demo(stub, engine, args)
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
