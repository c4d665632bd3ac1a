"""`kvpilot` command line: serve, generate, demo, policies, train-model, train-scorer, train-breadcrumbs-rl, eval, bench, calibrate."""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from kvpilot.runtime import add_runtime_arguments, build_engine, runtime_options


def cmd_serve(args) -> int:
    from decoder_service.server import DecoderServer
    from kvpilot_protocol.security import server_security
    from kvpilot_protocol.telemetry import setup_telemetry

    if args.session_ttl <= 0:
        raise SystemExit(f"--session-ttl must be > 0 seconds (got {args.session_ttl})")
    try:
        security = server_security(args)
        engine = build_engine(runtime_options(args))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    http_address = None
    if args.http_port is not None:
        host = args.http_host or args.address.rpartition(":")[0] or "127.0.0.1"
        http_address = f"{host}:{args.http_port}"
    setup_telemetry("kvpilot-decoder", prometheus=http_address is not None)  # /metrics reads the OTel metrics
    engine.store.ttl_s = args.session_ttl  # the engine's own copy expires like the durable one

    async def main() -> None:
        store = None
        if args.redis_url:
            from decoder_service.session_store import make_session_store

            store = make_session_store(args.redis_url, ttl_s=args.session_ttl)
        server = DecoderServer(engine, args.address, session_store=store, persist_kv=args.persist_kv,
                               security=security, http_address=http_address)
        await server.start()
        tls = "TLS" if security is not None and security.tls else "plaintext"
        auth = "bearer auth" if security is not None and security.auth is not None else "no auth"
        print(f"kvpilot decoder serving {engine.loaded.name} on {server.address} ({tls}, {auth}; "
              f"KV pool {engine.pool.capacity_bytes / 2**20:.0f} MiB, {engine.pool.capacity_slots} slots)", flush=True)
        if server.http_address is not None:
            scheme = "https" if security is not None and security.tls else "http"
            print(f"OpenAI-compatible HTTP API on {scheme}://{server.http_address}/v1 (health /health, "
                  "metrics /metrics)", flush=True)
        await server.serve_forever()

    asyncio.run(main())
    return 0


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (server default 1.0)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--policy", default="", help="KV policy (see `kvpilot policies`); default full")
    p.add_argument("--budget", type=int, default=0, help="KV slots to keep per (layer, KV head); 0 = unbounded")
    p.add_argument("--interval", type=int)
    p.add_argument("--window", type=int)
    p.add_argument("--sinks", type=int)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="policy parameter (repeatable)")


def request_kwargs(args) -> dict:
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param expects KEY=VALUE, got {item!r}")
        params[key] = value
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop, policy=args.policy, budget=args.budget, interval=args.interval,
                window=args.window, sinks=args.sinks, params=params)


def cmd_generate(args) -> int:
    import grpc

    from kvpilot.client import build_request, connect, format_usage, stream_to_terminal
    from kvpilot_protocol.security import load_client_token

    stub = connect(args.url, tls_ca=args.tls_ca, token=load_client_token(args.auth_token_file))
    request = build_request(args.prompt, session_id=args.session or "", new_session=args.new_session,
                            tool_output=args.tool_output, **request_kwargs(args))
    try:
        complete = stream_to_terminal(stub, request, timeout=args.timeout)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(format_usage(complete), file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    from kvpilot.demo import run_demo

    return run_demo(args)


def cmd_policies(args) -> int:
    from policy_service.registry import POLICIES

    for name in sorted(POLICIES):
        doc = (POLICIES[name].__doc__ or "").strip().splitlines()
        # Evaluation-only oracles (golden) run from kvpilot eval / bench only; the server refuses them.
        tag = "[eval only] " if POLICIES[name].eval_only else ""
        print(f"{name:16s} {tag}{doc[0] if doc else ''}")
    return 0


def cmd_train_model(args) -> int:
    from kvpilot.training import train_model

    return train_model.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvpilot", description="gRPC inference with a bounded KV cache")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the decoder gRPC server (embedded in-process policy)")
    add_runtime_arguments(p)
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--redis-url", help="durable session store shared by decoders (e.g. redis://127.0.0.1:6379/0)")
    p.add_argument("--persist-kv", action="store_true", help="also persist each session's compressed KV snapshot")
    p.add_argument("--session-ttl", type=float, default=3600.0, help="seconds an idle session is kept")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
                        "/v1/models, /health, /metrics) on this port (0 = any free port; default: off)")
    p.add_argument("--http-host", help="host the HTTP API binds (default: the host of --address)")
    from kvpilot_protocol.security import add_client_arguments, add_server_arguments

    add_server_arguments(p)
    add_client_arguments(p, prefix="policy-", env_var="KVPILOT_POLICY_AUTH_TOKEN")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("up", help="the distributed shape on one machine: Redis + Ray-served policy + decoder")
    from kvpilot.up import add_arguments as add_up_arguments

    add_up_arguments(p)

    p = sub.add_parser("generate", help="stream a generation from a running server to the terminal")
    p.add_argument("prompt")
    p.add_argument("--url", default="127.0.0.1:50051")
    p.add_argument("--session", help="continue this session")
    p.add_argument("--new-session", action="store_true", help="start a session (its id is printed at the end)")
    p.add_argument("--tool-output", action="store_true", help="the prompt is a tool output (session segment)")
    p.add_argument("--timeout", type=float)
    add_client_arguments(p)
    add_request_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job: start a server in-process with the default model and run a request")
    add_runtime_arguments(p)
    p.add_argument("--task", default="multihop", help="task shown with the bundled model")
    p.add_argument("--seed", type=int, default=7, help="which episode")
    p.add_argument("--policy", default="full")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--compare", default="rkv",
                   help="with the full cache (the default), run the episode again under this policy ('none': don't)")
    p.add_argument("--compare-budget", type=int, default=112,
                   help="KV slots for --compare (the default episode is 190 tokens)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("calibrate", help="measure a model's TriAttention query centres (written beside it)")
    from kvpilot import calibration

    calibration.add_arguments(p)

    p = sub.add_parser("eval", help="accuracy of a policy on the bundled tasks through the real engine")
    from kvpilot import evaluate

    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.run)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from kvpilot.bench import pareto

    p = bench.add_parser("pareto", help="accuracy vs KV budget for every policy (CSV + PNG + AUC)")
    pareto.add_arguments(p)
    p.set_defaults(func=pareto.run)

    from kvpilot.bench import fidelity

    p = bench.add_parser("fidelity", help="teacher-forced replay fidelity per policy and budget (CSV + PNG)")
    fidelity.add_arguments(p)
    p.set_defaults(func=fidelity.run)

    p = sub.add_parser("policy", help="the policy service")
    from policy_service.cli import add_arguments as add_policy_arguments

    add_policy_arguments(p)

    p = sub.add_parser("policies", help="list the KV policies")
    p.set_defaults(func=cmd_policies)

    from kvpilot.training import train_model

    p = sub.add_parser("train-model", help="train the bundled reasoning model from a seed")
    train_model.add_arguments(p)
    p.set_defaults(func=cmd_train_model)

    from kvpilot.training import train_scorer

    p = sub.add_parser("train-scorer", help="train a learned KV scorer (foresight) on Golden Eviction labels")
    train_scorer.add_arguments(p)
    p.set_defaults(func=train_scorer.run)

    from kvpilot.training import breadcrumbs_rl

    p = sub.add_parser("train-breadcrumbs-rl",
                       help="Breadcrumbs' joint stage: RL on exact match + distillation for a beacon-trained student")
    breadcrumbs_rl.add_arguments(p)
    p.set_defaults(func=breadcrumbs_rl.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
