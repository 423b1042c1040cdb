"""The FLOP bound of an alignment step (a sibling module of the benchmarks, not one).

A step's matmul FLOPs are 2 x parameters x tokens forward, the same again backward for
the input gradients alone (the LLM is frozen, so no weight gradients); the LM head is
counted on the text tokens only (the steps also run it on their batch's padding, which is
work the bound does not credit). Divided into the matmul rate this machine reaches in the
same run under the steps' own autocast (bf16 where native, else fp32:
``models.llm.fast_bf16``), that gives a reference rate for the step, casts of fp32
operands included. It is not a hard
bound: on one AMX machine this rate measured 1,100 in some processes and 2,500 GFLOP/s in
another, and the multiply-adds alone (bf16 operands, no casts: ``matmul_gflops``'s dtype)
ran at 2,800-3,300.
"""

from __future__ import annotations

import statistics
import time

import torch

from models.llm import autocast


def matmul_gflops(
    device: torch.device, n: int = 2048, reps: int = 20, dtype: torch.dtype = torch.float32
) -> float:
    """The median rate of n x n matmuls under the steps' autocast, after a second of
    warm-up, GFLOP/s: the median of ``reps`` samples timed one by one (a total over 5 calls
    swung from 960 to 1,889 GFLOP/s between runs on one AMX machine; the median still
    differs between processes, 1,102 to 2,482, for reasons not known). A sample is one
    call on a CPU, 10 on CUDA (one 2048-cube matmul there is too short to time alone).

    ``dtype`` float32 (the rate the benchmarks divide by): each call also casts both
    operands to bf16, as the steps cast their fp32 weights. bfloat16: the multiply-adds
    alone, the rate a step holding bf16 weights could approach."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    calls = 10 if device.type == "cuda" else 1
    times = []
    with autocast(device):
        start = time.perf_counter()
        while time.perf_counter() - start < 1.0:
            a @ b
            _sync(device)
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(calls):
                a @ b
            _sync(device)
            times.append((time.perf_counter() - t0) / calls)
    return 2 * n**3 / statistics.median(times) / 1e9


def _sync(device: torch.device) -> None:
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
