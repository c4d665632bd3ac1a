"""Decode throughput: kvpilot's engine vs transformers' generate on the same weights, side by side in one run.

    python benchmarks/decode_throughput.py [--batch-sizes 1 4 16] [--prompt-len 64] [--new-tokens 64]
                                           [--shape small | --model reasoner-v2]

Both sides run greedy decoding of equal-length prompts (no padding) with EOS ignored, so they produce the same
number of tokens. Prints tokens/s and the kvpilot/transformers ratio per batch size and writes
benchmarks/results/decode_throughput_<device>.csv. Absolute numbers mean something only on a GPU; on a CPU
quote the ratios.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository root importable
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, add_device_arguments, apply_device_arguments, write_csv

from decoder_service.checkpoint import load_checkpoint, save_checkpoint
from decoder_service.engine import Engine, EngineConfig
from decoder_service.model import ModelConfig, Transformer
from decoder_service.requests import GenerationRequest, SamplingParams
from decoder_service.tokenizer import build_byte_level_tokenizer


SHAPES = {
    # A small model that still spends its time in matmuls on a CPU.
    "small": dict(hidden_size=256, intermediate_size=704, num_layers=4, num_heads=8, num_kv_heads=2, head_dim=32),
    # The attention/MLP shapes of Qwen2.5-1.5B (28 layers, 12 query / 2 KV heads of 128): for GPUs.
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                         head_dim=128, model_type="qwen2", qkv_bias=True, rope_theta=1_000_000.0),
}


def make_model(shape: str, directory: Path, dtype: torch.dtype) -> Path:
    tokenizer = build_byte_level_tokenizer(512)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = ModelConfig(vocab_size=512, max_position_embeddings=4096, bos_token_id=0, eos_token_ids=[1], **SHAPES[shape])
    model = Transformer(config).init_random(0).to(dtype)
    return save_checkpoint(model, directory / "tokenizer.json", directory / shape)


def model_under_test(args, directory: Path, dtype: torch.dtype) -> tuple[Path, str]:
    """(checkpoint, label): `--model` (a checkpoint or a bundled model's name, e.g. the default reasoner-v2), else
    a random-weight model of `--shape`."""
    if args.model:
        from kvpilot.models import resolve_model

        path = resolve_model(args.model)
        return path, path.name
    return make_model(args.shape, directory, dtype), args.shape


def add_model_arguments(parser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="random-weight model shape")
    parser.add_argument("--model", default=None,
                        help="a checkpoint directory or a bundled model's name (reasoner-v2, ...) instead of --shape")


def bench_kvpilot(loaded, prompts, new_tokens, device) -> float:
    engine = Engine(loaded, EngineConfig(max_running=len(prompts), max_batch_tokens=max(512, len(prompts) * len(prompts[0])),
                                         prefill_chunk=4096, kv_pool_bytes=1 << 30))
    requests = [GenerationRequest(f"r{i}", p, SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True))
                for i, p in enumerate(prompts)]
    sync(device)
    start = time.perf_counter()
    results = engine.generate(requests)
    sync(device)
    elapsed = time.perf_counter() - start
    assert all(r.usage.generated_tokens == new_tokens for r in results)
    return len(prompts) * new_tokens / elapsed


def bench_transformers(path, prompts, new_tokens, device, dtype) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
        sync(device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return len(prompts) * new_tokens / elapsed


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    add_device_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2, help="best of N (the first run also warms up)")
    args = parser.parse_args()
    dtype, device_name = apply_device_arguments(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path, label = model_under_test(args, Path(tmp), dtype)
        loaded = load_checkpoint(path, device=args.device, dtype=dtype)
        vocab = loaded.config.vocab_size
        print(f"model {label} ({loaded.model.num_parameters() / 1e6:.1f} M params), {args.device} ({device_name}), "
              f"{args.dtype}, prompt {args.prompt_len}, new tokens {args.new_tokens}, torch threads {torch.get_num_threads()}")
        print(f"{'batch':>5} {'kvpilot tok/s':>14} {'transformers tok/s':>19} {'ratio':>7}")
        for batch in args.batch_sizes:
            gen = torch.Generator().manual_seed(batch)
            prompts = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).tolist()
            ours = max(bench_kvpilot(loaded, prompts, args.new_tokens, args.device) for _ in range(args.repeats))
            theirs = max(bench_transformers(path, prompts, args.new_tokens, args.device, dtype) for _ in range(args.repeats))
            rows.append(dict(shape=label, device=args.device, device_name=device_name, dtype=args.dtype, batch=batch,
                             prompt_len=args.prompt_len, new_tokens=args.new_tokens, kvpilot_tok_s=round(ours, 1),
                             transformers_tok_s=round(theirs, 1), ratio=round(ours / theirs, 3)))
            print(f"{batch:>5} {ours:>14.1f} {theirs:>19.1f} {ours / theirs:>7.2f}")
    out = RESULTS / f"decode_throughput_{label}_{args.device.split(':')[0]}.csv"
    write_csv(out, rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
