"""kvpilot kernels: Triton kernels, each with a torch reference.

Public entry points dispatch per call: Triton for CUDA tensors (or everywhere when KVPILOT_FORCE_TRITON=1,
which the kernel tests use under the Triton interpreter), the torch reference otherwise (the engine on CPU).

    compact_(k, v, positions, keep, n_valid, *, slot_map=None) -> int
                                                           in-place keep-set compaction (global or per head)
    merge_(k, v, positions, plan, n_valid, *, slot_map=None) -> int
                                                           in-place weighted merge with a global MergePlan
    key_redundancy(keys, threshold=0.5) -> Tensor          R-KV key redundancy [H, n] of one layer's keys
    paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, block_size, scale=None, *,
                           with_stats=False) -> (out, slot_attention | None)
                                                           decode attention over the paged pool, optionally
                                                           with each slot's softmax summed over its GQA group

Paged pool: k, v [L, H, S, D] and positions [L, H, S] hold every sequence, S = num_blocks * block_size; a
sequence's logical slot j lives at physical slot block_table[j // block_size] * block_size + j % block_size
(`slot_map_from_block_table`). compact_/merge_ without `slot_map` work on one sequence's [L, H, cap, D]
cache, with it on the whole pool in the sequence's logical slots, touching no physical slot outside
slot_map[:n_valid]. paged_decode_attention takes one layer of the pool (pool.k[layer], [H, S, D]).
"""
import os as _os
import sys as _sys

# Without a GPU, Triton can only run through its interpreter, and the interpreter needs TRITON_INTERPRET=1
# before triton is first imported (its own library helpers are jitted at that import). Default it here,
# ahead of our `import triton`, so that forcing the Triton path on CPU works whatever imports this package
# first. An explicit setting always wins; with CUDA present nothing changes.
if "triton" not in _sys.modules and "TRITON_INTERPRET" not in _os.environ:
    import torch as _torch

    if not _torch.cuda.is_available():
        _os.environ["TRITON_INTERPRET"] = "1"

from .compaction import compact_, compact_reference, compact_triton, use_triton  # noqa: E402
from .merge import MergePlan, merge_, merge_reference, merge_triton  # noqa: E402
from .redundancy import key_redundancy, key_redundancy_reference, key_redundancy_triton  # noqa: E402
from .paged_attention import (  # noqa: E402
    paged_decode_attention, paged_decode_attention_reference, paged_decode_attention_triton, slot_map_from_block_table,
)

__all__ = [
    "compact_", "compact_reference", "compact_triton",
    "merge_", "merge_reference", "merge_triton", "MergePlan",
    "key_redundancy", "key_redundancy_reference", "key_redundancy_triton",
    "paged_decode_attention", "paged_decode_attention_reference", "paged_decode_attention_triton",
    "slot_map_from_block_table",
    "use_triton",
]
