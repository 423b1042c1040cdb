"""The FLOP bound of an alignment step (a sibling module of the benchmarks, not one).

A step's matmul FLOPs are 2 x parameters x tokens forward, the same again backward for
the input gradients alone (the LLM is frozen, so no weight gradients); the LM head runs on
the text tokens only. Divided into the matmul rate this machine reaches in the same run
under the steps' own autocast (bf16 where native, else fp32: ``models.llm.fast_bf16``),
that gives the items/s no implementation of the step that keeps fp32 weights could beat.
The multiply-adds alone (bf16 operands, no casts) run faster: ``matmul_gflops``'s dtype.
"""

from __future__ import annotations

import statistics
import time

import torch

from models.llm import autocast


def matmul_gflops(
    device: torch.device, n: int = 2048, reps: int = 20, dtype: torch.dtype = torch.float32
) -> float:
    """The median rate of single n x n matmuls under the steps' autocast, after a second of
    warm-up, GFLOP/s. The median of calls timed one by one: a total over a few calls swung
    from 960 to 1,889 GFLOP/s between runs on one AMX machine (clock and power-state ramps).

    ``dtype`` float32 (the bound the benchmarks divide by): each call also casts both
    operands to bf16, as the steps cast their fp32 weights. bfloat16: the multiply-adds
    alone, the rate a step holding bf16 weights could approach (about 3x the other on AMX)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    times = []
    with autocast(device):
        start = time.perf_counter()
        while time.perf_counter() - start < 1.0:
            _sync(device, a @ b)
        for _ in range(reps):
            t0 = time.perf_counter()
            _sync(device, a @ b)
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def _sync(device: torch.device, _result: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_per_item(llm: torch.nn.Module, tokens_per_item: float, text_tokens: float) -> float:
    """Forward + backward (input gradients only) matmul FLOPs of one item's step."""
    emb = llm.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in llm.parameters()) - emb  # tied head counted once, below
    forward = 2 * body * tokens_per_item + 2 * emb * text_tokens  # the head runs on text only
    return 2 * forward


def bound_line(bound: float, gflops: float, step_flops: float) -> str:
    """The bound as the benchmarks print it."""
    rate = f"{gflops:.0f} GFLOP/s matmul under the steps' autocast, {step_flops / 1e9:.2f} GFLOP an item"
    return f"FLOP bound {bound:.1f} items/s ({rate})"
