"""Alignment loops: full alignment (resumable), fresh-item refinement, and fidelity checks.

Batches group texts of similar token length (sorted, chunked, chunk order shuffled per
epoch), which removes most padding without biasing what an epoch sees.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from core.files import load_torch, save_torch
from core.settings import AlignSettings
from models.aligner import (
    FreshRows,
    FrozenLM,
    ItemAligner,
    alignment_loss,
    greedy_reconstruct,
    pad_batch,
)
from models.llm import adapter_state, autocast, load_adapter_state, lora_rank_of
from training.optim import batch_scaled_lr, lr_factor, row_optimizer

log = logging.getLogger(__name__)


# The files whose code decides what an alignment produces: a cached table or a training
# checkpoint made by other code must not be reused (a faster but different loop would
# silently serve old results).
ALIGNMENT_CODE = (
    "models/aligner.py",
    "models/llm.py",
    "training/align.py",
    "training/fit_aligner.py",
    "training/optim.py",
    "training/variants.py",
)


def code_version() -> str:
    """A short hash of the alignment code (``ALIGNMENT_CODE``), part of every cache key."""
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for name in ALIGNMENT_CODE:
        digest.update((root / name).read_bytes())
    return digest.hexdigest()[:12]


def length_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Positions grouped by similar length; the order of the groups is shuffled by seed."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches


def _train_step(
    lm: FrozenLM, soft_fn, keys: torch.Tensor, texts: list[list[int]], optimizers: list
) -> tuple[torch.Tensor, torch.Tensor]:
    """One teacher-forced step on a batch; returns detached (per-item loss, per-item token
    accuracy), both measured before the update."""
    text = pad_batch(texts, lm.pad_id).to(lm.device)
    with autocast(lm.device):
        per_item, acc, loss = alignment_loss(lm, soft_fn(keys), text)
    for opt in optimizers:
        opt.zero_grad()
    loss.backward()
    for opt in optimizers:
        opt.step()
    return per_item.detach(), acc.detach()


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _pass_members(state: dict, n: int, cfg: AlignSettings) -> list[int]:
    """Positions trained in this pass: the unconverged ones, or all of them on a re-check
    pass (every ``recheck_every`` passes, and whenever all had converged)."""
    active = [i for i in range(n) if not state["converged"][i]]
    recheck = (state["epoch"] + 1) % cfg.recheck_every == 0
    return list(range(n)) if recheck or not active else active


def _run_identity(cfg: AlignSettings, aligner: ItemAligner, lm: FrozenLM) -> dict:
    """What a checkpoint must share with the run that resumes it (more passes may be asked
    for, and the save period may change)."""
    return cfg.schedule() | {
        "code": code_version(),
        "aligner": asdict(aligner.cfg),
        "prompt": lm.prefix.prompt.tolist(),
        "lead": lm.prefix.lead.tolist(),
        "lora_rank": lora_rank_of(lm.model),
        "llm": lm.model.config.name_or_path,
    }


def _check_resumable(saved: dict, wanted: dict, path: Path) -> None:
    """A checkpoint resumes only the run it came from."""
    differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if differ:
        raise ValueError(
            f"{path} was written with another alignment config ({', '.join(differ)} differ): "
            "remove it to start afresh, or run with the same settings"
        )


def train_full(
    aligner: ItemAligner,
    lm: FrozenLM,
    tokens: list[list[int]],
    item_idx: list[int],
    cfg: AlignSettings,
    checkpoint: Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train rows and projector on (item_idx[i], tokens[i]); returns one record per pass:
    mean loss and token accuracy of the items it trained, how many, and seconds.

    Per-item convergence: an item whose teacher-forced token accuracy (read in its training
    step, before the update) reaches ``acc_bar`` sits the next passes out, and is trained
    and re-checked on every ``recheck_every``-th pass, since the shared projector moves.
    The run ends early after a re-check pass in which every item met the bar.

    With ``checkpoint``, state is saved atomically every ``checkpoint_every_s`` and at each
    pass end, and a rerun resumes at the exact batch where the last save stopped.
    """
    opt_rows = row_optimizer(cfg.row_optimizer, list(aligner.items.parameters()), cfg.lr_rows)
    lr_proj = batch_scaled_lr(cfg.lr_proj, cfg.batch_size)
    if cfg.compile:
        lm = lm.compiled()
    llm, device = lm.model, lm.device
    adapters = [p for p in llm.parameters() if p.requires_grad]  # LoRA, when the LLM has it
    opt_proj = torch.optim.Adam(list(aligner.projector.parameters()) + adapters, lr=lr_proj)
    n = len(tokens)
    state = {
        "epoch": 0,
        "batch": 0,
        "history": [],
        "running": [0.0, 0.0, 0, 0.0],
        "converged": [False] * n,
        "members": None,
        "done": False,
    }
    saved = load_torch(checkpoint, map_location=device) if checkpoint and checkpoint.exists() else None
    if saved is not None and saved.get("identity", {}).get("code") != code_version():
        log.warning("%s was written by other alignment code: starting afresh", checkpoint)
        saved = None
    if saved is not None:
        _check_resumable(saved.get("identity", {}), _run_identity(cfg, aligner, lm), checkpoint)
        aligner.load_state_dict(saved["aligner"])
        if saved.get("adapters"):
            load_adapter_state(llm, saved["adapters"], trainable=True)
        opt_rows.load_state_dict(saved["opt_rows"])
        opt_proj.load_state_dict(saved["opt_proj"])
        state = saved["state"]
        log.info("resuming alignment at epoch %d batch %d", state["epoch"], state["batch"])

    def save() -> None:
        if checkpoint:
            save_torch(
                {
                    "aligner": aligner.state_dict(),
                    "opt_rows": opt_rows.state_dict(),
                    "opt_proj": opt_proj.state_dict(),
                    "adapters": adapter_state(llm),
                    "state": state,
                    "config": cfg.model_dump(),
                    "identity": _run_identity(cfg, aligner, lm),
                },
                checkpoint,
            )

    lengths = [len(t) for t in tokens]
    last_save = time.monotonic()
    while state["epoch"] < cfg.epochs and not state["done"]:
        if state["members"] is None:
            state["members"] = _pass_members(state, n, cfg)
        members = state["members"]
        batches = length_batches(
            [lengths[i] for i in members], cfg.batch_size, cfg.seed * 100_003 + state["epoch"]
        )
        bar = tqdm(
            batches,
            desc=f"align pass {state['epoch'] + 1}/{cfg.epochs}",
            initial=state["batch"],
            total=len(batches),
            disable=not progress,
        )
        started = time.monotonic()
        for b in batches[state["batch"] :]:
            pos = [members[j] for j in b]
            frac = (state["epoch"] + state["batch"] / len(batches)) / cfg.epochs
            _set_lr(opt_rows, cfg.lr_rows * lr_factor(frac, 0.0, cfg.lr_final))
            _set_lr(opt_proj, lr_proj * lr_factor(frac, cfg.warmup, cfg.lr_final))
            idx = torch.tensor([item_idx[i] for i in pos], device=device)
            per_item, acc = _train_step(
                lm, aligner.soft_tokens, idx, [tokens[i] for i in pos], [opt_rows, opt_proj]
            )
            for i, a in zip(pos, acc.tolist(), strict=True):
                state["converged"][i] = a >= cfg.acc_bar
            run = state["running"]
            run[0] += per_item.sum().item()
            run[1] += acc.sum().item()
            run[2] += len(pos)
            state["batch"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{run[0] / run[2]:.3f}", acc=f"{run[1] / run[2]:.3f}")
            if time.monotonic() - last_save > cfg.checkpoint_every_s:
                run[3] += time.monotonic() - started
                started = time.monotonic()
                save()
                last_save = time.monotonic()
        bar.close()
        run = state["running"]
        record = {
            "pass": state["epoch"] + 1,
            "loss": run[0] / max(1, run[2]),
            "token_accuracy": run[1] / max(1, run[2]),
            "trained": run[2],
            "seconds": run[3] + time.monotonic() - started,
        }
        state["history"].append(record)
        log.info(
            "align pass %d/%d: %d items trained, loss %.4f, token accuracy %.4f, %.0fs",
            record["pass"],
            cfg.epochs,
            record["trained"],
            record["loss"],
            record["token_accuracy"],
            record["seconds"],
        )
        everyone = len(members) == n
        done = everyone and all(state["converged"])
        state.update(epoch=state["epoch"] + 1, batch=0, running=[0.0, 0.0, 0, 0.0], members=None, done=done)
        save()
        if done:
            log.info("every item reached token accuracy %.2f: alignment done", cfg.acc_bar)
    return state["history"]


def refine_fresh(
    fresh: FreshRows,
    lm: FrozenLM,
    tokens: list[list[int]],
    cfg: AlignSettings,
    target_accuracy: float | None,
    after_epoch: Callable[[], object] | None = None,
    progress: bool = False,
) -> list[dict]:
    """Train only the fresh rows (projector frozen); one record per pass (mean loss and
    token accuracy of the items it trained, and how many).

    The rows train as the catalogue's did (``cfg.row_optimizer``) at the rate and for at
    most the passes of ``cfg.refine``, ``cfg.refine.batch`` rows a step. An item whose token accuracy
    reaches ``target_accuracy`` (the catalogue's bar) leaves the refinement; it ends when
    every item has, or after the last pass. ``after_epoch`` runs between passes (the
    worker gives newly arrived items their estimate there).
    """
    opt = row_optimizer(cfg.row_optimizer, [fresh.rows], cfg.refine.lr, sparse_grads=False)
    lengths = [len(t) for t in tokens]
    done = [False] * len(tokens)
    history = []
    for epoch in tqdm(range(cfg.refine.max_passes), desc="refine fresh rows", disable=not progress):
        members = [i for i, d in enumerate(done) if not d]
        if not members:
            break
        loss_sum, acc_sum = 0.0, 0.0
        for b in length_batches([lengths[i] for i in members], cfg.refine.batch, epoch):
            pos = [members[j] for j in b]
            local = torch.tensor(pos, device=lm.device)
            per_item, acc = _train_step(lm, fresh.soft_tokens, local, [tokens[i] for i in pos], [opt])
            loss_sum += per_item.sum().item()
            acc_sum += acc.sum().item()
            for i, a in zip(pos, acc.tolist(), strict=True):
                done[i] = target_accuracy is not None and a >= target_accuracy
        history.append(
            {
                "pass": epoch + 1,
                "loss": loss_sum / len(members),
                "token_accuracy": acc_sum / len(members),
                "trained": len(members),
            }
        )
        if after_epoch is not None:
            after_epoch()
    return history


@torch.no_grad()
def fidelity(
    soft_fn,
    lm: FrozenLM,
    tokens: list[list[int]],
    keys: list[int],
    batch_size: int = 64,
    reconstruct: bool = True,
    progress: bool = False,
) -> dict[str, object]:
    """Per-item loss and token accuracy (teacher forced), and with ``reconstruct`` each
    item's greedy decoding (token ids), whether it is exact, and the exact-match rate.

    ``soft_fn(keys_tensor)`` gives the soft tokens of ``keys``, so the same check serves
    the full table and fresh rows.
    """
    losses, accs, exact = [], [], 0
    decoded_at: dict[int, list[int]] = {}
    lengths = [len(t) for t in tokens]
    batches = length_batches(lengths, batch_size, 0)
    for b in tqdm(
        batches, desc="fidelity (greedy decoding)" if reconstruct else "fidelity", disable=not progress
    ):
        soft = soft_fn(torch.tensor([keys[i] for i in b], device=lm.device))
        text = pad_batch([tokens[i] for i in b], lm.pad_id).to(lm.device)
        with autocast(lm.device):
            per_item, acc, _ = alignment_loss(lm, soft, text)
            if reconstruct:
                decoded = greedy_reconstruct(lm.model, lm.prefix, soft, max(lengths[i] for i in b), lm.eos_id)
                exact += sum(decoded[j] == tokens[i] for j, i in enumerate(b))
                decoded_at |= {i: decoded[j] for j, i in enumerate(b)}
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
        "decoded": [decoded_at.get(i) for i in range(n)],
        "exact": [decoded_at[i] == tokens[i] if i in decoded_at else None for i in range(n)],
    }
