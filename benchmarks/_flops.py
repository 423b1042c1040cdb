"""The FLOP bound of an alignment step (a sibling module of the benchmarks, not one).

A step's matmul FLOPs are 2 x parameters x tokens forward, the same again backward for
the input gradients alone (the LLM is frozen, so no weight gradients); the LM head runs on
the text tokens only. Divided into the matmul rate this machine reaches in the same run
under the steps' own autocast (bf16 where native, else fp32: ``models.llm.fast_bf16``),
that gives the items/s no implementation of the step could beat.
"""

from __future__ import annotations

import time

import torch

from models.llm import autocast


def matmul_gflops(device: torch.device, n: int = 2048, reps: int = 5) -> float:
    """The matmul rate of ``device`` on n x n operands under the steps' autocast, GFLOP/s."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    with autocast(device):
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


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
