"""Alignment loops: full alignment (resumable), fresh-item refinement, and fidelity checks.

Batches group texts of similar token length (sorted, chunked, chunk order shuffled per
epoch), which removes most padding without biasing what an epoch sees.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from models.llm import autocast
from models.said import (
    FreshRows,
    ItemAligner,
    Prefix,
    alignment_loss,
    greedy_reconstruct,
    pad_batch,
)

log = logging.getLogger(__name__)


@dataclass
class AlignConfig:
    epochs: int = 20  # passes over all items
    batch_size: int = 16  # items per step
    lr_rows: float = 0.2  # item rows get one update per pass, so a large rate
    lr_proj: float = 1e-2  # projector (shared by all items)
    seed: int = 0
    checkpoint_every_s: float = 120.0  # mid-epoch checkpoints, so a kill loses little


def length_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Positions grouped by similar length; the order of the groups is shuffled by seed."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def _train_step(llm, prefix, soft_fn, keys: torch.Tensor, texts: list[list[int]], pad_id: int,
                device: torch.device, optimizers: list) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One teacher-forced step on a batch; returns detached (per-item loss, mean loss)."""
    text = pad_batch(texts, pad_id).to(device)
    with autocast(device):
        per_item, _, loss = alignment_loss(llm, prefix, soft_fn(keys), text)
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    for opt in optimizers:
        opt.step()
    return per_item.detach(), loss.detach()


def save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_full(
    aligner: ItemAligner,
    llm: nn.Module,
    prefix: Prefix,
    tokens: list[list[int]],
    item_idx: list[int],
    cfg: AlignConfig,
    device: torch.device,
    pad_id: int,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> list[float]:
    """Train rows and projector on (item_idx[i], tokens[i]); returns mean loss per epoch.

    With ``checkpoint``, state is saved atomically every ``checkpoint_every_s`` and at each
    epoch end, and a rerun resumes at the exact batch where the last save stopped.
    """
    opt_rows = torch.optim.SparseAdam(list(aligner.items.parameters()), lr=cfg.lr_rows)
    opt_proj = torch.optim.Adam(aligner.projector.parameters(), lr=cfg.lr_proj)
    state = {"epoch": 0, "batch": 0, "history": [], "running": [0.0, 0]}
    if checkpoint and checkpoint.exists():
        saved = torch.load(checkpoint, map_location=device, weights_only=False)
        aligner.load_state_dict(saved["aligner"])
        opt_rows.load_state_dict(saved["opt_rows"])
        opt_proj.load_state_dict(saved["opt_proj"])
        state = saved["state"]
        log.info("resuming alignment at epoch %d batch %d", state["epoch"], state["batch"])

    def save() -> None:
        if checkpoint:
            save_atomic({"aligner": aligner.state_dict(), "opt_rows": opt_rows.state_dict(),
                          "opt_proj": opt_proj.state_dict(), "state": state,
                          "config": asdict(cfg)}, checkpoint)  # fmt: skip

    lengths = [len(t) for t in tokens]
    last_save = time.monotonic()
    while state["epoch"] < cfg.epochs:
        batches = length_batches(lengths, cfg.batch_size, cfg.seed * 100_003 + state["epoch"])
        bar = tqdm(batches, desc=f"align epoch {state['epoch'] + 1}/{cfg.epochs}",
                   initial=state["batch"], total=len(batches), disable=not progress)  # fmt: skip
        for b in batches[state["batch"] :]:
            idx = torch.tensor([item_idx[i] for i in b], device=device)
            _, loss = _train_step(llm, prefix, aligner.soft_tokens, idx, [tokens[i] for i in b],
                                  pad_id, device, [opt_rows, opt_proj])  # fmt: skip
            state["batch"] += 1
            state["running"][0] += loss.item() * len(b)
            state["running"][1] += len(b)
            bar.update(1)
            bar.set_postfix(loss=f"{state['running'][0] / state['running'][1]:.3f}")
            if time.monotonic() - last_save > cfg.checkpoint_every_s:
                save()
                last_save = time.monotonic()
        bar.close()
        state["history"].append(state["running"][0] / max(1, state["running"][1]))
        log.info("align epoch %d/%d: mean loss %.4f", state["epoch"] + 1, cfg.epochs,
                 state["history"][-1])  # fmt: skip
        state.update(epoch=state["epoch"] + 1, batch=0, running=[0.0, 0])
        save()
    return state["history"]


def refine_fresh(
    fresh: FreshRows,
    llm: nn.Module,
    prefix: Prefix,
    tokens: list[list[int]],
    device: torch.device,
    pad_id: int,
    epochs: int,
    batch_size: int = 16,
    lr: float = 0.2,
    target_loss: float | None = None,
    progress: bool = False,
    after_epoch: Callable[[], object] | None = None,
) -> list[float]:
    """Train only the fresh rows (projector frozen); mean loss after each epoch.

    Stops early once the epoch mean loss reaches ``target_loss``. ``after_epoch`` runs
    between passes (the worker gives newly arrived items their estimate there).
    """
    opt = torch.optim.Adam([fresh.rows], lr=lr)
    lengths = [len(t) for t in tokens]
    history = []
    for epoch in tqdm(range(epochs), desc="refine fresh", disable=not progress):
        total, n = 0.0, 0
        for b in length_batches(lengths, batch_size, epoch):
            local = torch.tensor(b, device=device)
            per_item, _ = _train_step(llm, prefix, fresh.soft_tokens, local, [tokens[i] for i in b],
                                      pad_id, device, [opt])  # fmt: skip
            total += per_item.sum().item()
            n += len(b)
        history.append(total / n)
        if after_epoch is not None:
            after_epoch()
        if target_loss is not None and history[-1] <= target_loss:
            break
    return history


@torch.no_grad()
def fidelity(
    soft_fn,
    llm: nn.Module,
    prefix: Prefix,
    tokens: list[list[int]],
    keys: list[int],
    device: torch.device,
    pad_id: int,
    eos_id: int,
    batch_size: int = 64,
    reconstruct: bool = True,
    progress: bool = False,
) -> dict[str, object]:
    """Per-item loss and token accuracy (teacher forced), and greedy exact-match rate.

    ``soft_fn(keys_tensor)`` gives the soft tokens of ``keys``, so the same check serves
    the full table and fresh rows.
    """
    losses, accs, exact = [], [], 0
    lengths = [len(t) for t in tokens]
    for b in tqdm(length_batches(lengths, batch_size, 0), desc="fidelity", disable=not progress):
        soft = soft_fn(torch.tensor([keys[i] for i in b], device=device))
        text = pad_batch([tokens[i] for i in b], pad_id).to(device)
        with autocast(device):
            per_item, acc, _ = alignment_loss(llm, prefix, soft, text)
            if reconstruct:
                decoded = greedy_reconstruct(llm, prefix, soft, max(lengths[i] for i in b), eos_id)
                exact += sum(decoded[j] == tokens[i] for j, i in enumerate(b))
        losses += list(zip(b, per_item.tolist(), strict=True))
        accs += list(zip(b, acc.tolist(), strict=True))
    loss_by_pos = dict(losses)
    acc_by_pos = dict(accs)
    n = len(tokens)
    return {
        "loss": [loss_by_pos[i] for i in range(n)],
        "token_accuracy": [acc_by_pos[i] for i in range(n)],
        "mean_loss": sum(loss_by_pos.values()) / n,
        "mean_token_accuracy": sum(acc_by_pos.values()) / n,
        "exact_match": exact / n if reconstruct else None,
    }
