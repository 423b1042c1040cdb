"""``said evaluate``: leave-one-out, full-ranking comparison of the scorer variants.

Two protocols share the code:
- standard: every item is aligned and trained on; all users are tested;
- cold-start: 10% of items (chosen by seed) are held out of alignment and scorer training,
  then added through the incremental path; only test users whose target is held out count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.dataset import Dataset, load_dataset
from core.events import item_text
from core.settings import DEFAULTS
from models.llm import load_llm
from models.sasrec import SASRec, SASRecConfig
from training.align import AlignConfig
from training.fit_aligner import FidelityConfig, RefineConfig
from training.recommender import ScorerTrainConfig, evaluate, train_scorer
from training.variants import said_table, text_table

log = logging.getLogger(__name__)
VARIANTS = ("id", "text", "said")


@dataclass
class Split:
    train: list[list[int]]
    valid: tuple[list[list[int]], list[int]]
    test: tuple[list[list[int]], list[int]]


def leave_one_out(seqs: list[list[int]], held_out: set[int]) -> Split:
    """Last item = test, second to last = validation, the rest = training.

    With held-out items: they are removed from training sequences, validation skips users
    whose target is held out, and only users whose test target is held out are tested.
    """
    train, vh, vt, th, tt = [], [], [], [], []
    for s in seqs:
        if len(s) < 3:
            train.append([i for i in s if i not in held_out])
            continue
        train.append([i for i in s[:-2] if i not in held_out])
        if s[-2] not in held_out:
            vh.append(train[-1])  # filtered like training: held-out items do not exist yet
            vt.append(s[-2])
        if not held_out or s[-1] in held_out:
            th.append(s[:-1])
            tt.append(s[-1])
    return Split(train, (vh, vt), (th, tt))


def held_out_items(n_items: int, fraction: float, seed: int) -> set[int]:
    rng = random.Random(seed)
    return set(rng.sample(range(1, n_items + 1), round(n_items * fraction)))


def dataset_key(ds: Dataset) -> str:
    h = hashlib.sha256()
    for item_id, title in zip(ds.item_ids, ds.titles, strict=True):
        h.update(f"{item_id}\t{title}\n".encode())
    return h.hexdigest()[:12]


def run(
    dataset: str | Path,
    variants: list[str],
    seeds: list[int],
    cold_fraction: float,
    artifacts: Path,
    device: torch.device,
    llm_spec: str | None,
    llm_cache: Path,
    align_cfg: AlignConfig,
    k: int = DEFAULTS.soft_tokens,
    item_dim: int = DEFAULTS.item_dim,
    scorer_cfg: ScorerTrainConfig | None = None,
    lora_rank: int = DEFAULTS.lora_rank,
    prompt: str = DEFAULTS.prompt,
    refine: RefineConfig | None = None,
    fidelity_cfg: FidelityConfig | None = None,
    progress: bool = True,
    results_path: Path | None = None,
) -> dict:
    """Evaluate each variant over seeds, standard and (if ``cold_fraction``) cold-start.

    With ``results_path``, results so far are rewritten after every run, so a long
    evaluation that is stopped still leaves every finished number on disk.
    """
    ds = load_dataset(dataset)
    idx_of = {item_id: i + 1 for i, item_id in enumerate(ds.item_ids)}
    seqs = [[idx_of[i] for i in s] for _, s in ds.sequences]
    n = len(ds.item_ids)
    texts = [item_text(t, d) for t, d in zip(ds.titles, ds.descriptions, strict=True)]
    art = artifacts / f"{Path(dataset).name}-{dataset_key(ds)}"
    scorer_cfg = scorer_cfg or ScorerTrainConfig()
    llm = tok = None
    if "text" in variants or "said" in variants or cold_fraction:
        llm, tok = load_llm(llm_spec, llm_cache, device)
    feats = text_table(llm, tok, texts, device, art / "text.pt", progress) if llm else None

    results: dict = {
        "dataset": str(dataset),
        "items": n,
        "users": len(seqs),
        "align": asdict(align_cfg)
        | {"k": k, "item_dim": item_dim, "lora_rank": lora_rank, "prompt": prompt}
        | {"refine": asdict(refine or RefineConfig()), "fidelity": asdict(fidelity_cfg or FidelityConfig())},
        "runs": [],
    }
    protocols = [("standard", set())]
    if cold_fraction:
        protocols.append(("cold", held_out_items(n, cold_fraction, 12345)))
    for protocol, held in protocols:
        split = leave_one_out(seqs, held)
        tables: dict[str, torch.Tensor | None] = {"id": None}
        if "text" in variants:
            tables["text"] = feats
        if "said" in variants:
            config = json.dumps(
                results["align"] | {"llm": llm_spec, "held_out": sorted(held)}, sort_keys=True
            )
            name = f"said-{protocol}-{hashlib.sha256(config.encode()).hexdigest()[:12]}.pt"
            if lora_rank:  # each alignment adapts its own copy of the LLM
                llm, tok = load_llm(llm_spec, llm_cache, device, lora_rank)
            built = said_table(
                llm,
                tok,
                texts,
                feats,
                held,
                align_cfg,
                k,
                item_dim,
                device,
                art / name,
                refine,
                progress,
                prompt,
                fidelity_cfg,
            )
            tables["said"] = built["vectors"]
            results[f"said_report_{protocol}"] = _summarise_report(built["report"])
        for variant in variants:
            for seed in seeds:
                torch.manual_seed(seed)
                warm = torch.tensor(sorted(set(range(1, n + 1)) - held)) if held else None
                model = SASRec(SASRecConfig(n_items=n), tables[variant], standardise_on=warm)
                cfg = ScorerTrainConfig(**(asdict(scorer_cfg) | {"seed": seed}))
                model, info = train_scorer(
                    model, split.train, split.valid, cfg, device, progress, blocked=sorted(held)
                )
                metrics = evaluate(model, *split.test, device)
                results["runs"].append(
                    {"protocol": protocol, "variant": variant, "seed": seed, **metrics, **info}
                )
                log.info("%s %s seed %d: %s", protocol, variant, seed, metrics)
                if results_path:
                    write_results(results | {"summary": summarise(results["runs"])}, results_path)
    results["summary"] = summarise(results["runs"])
    return results


def _summarise_report(report: dict) -> dict:
    """Drop the per-item loss lists from what goes into the results JSON."""
    out = dict(report)
    out["reference"] = {k: v for k, v in report["reference"].items() if k not in ("losses", "token_accuracy")}
    if "fresh" in out:
        fresh = dict(out["fresh"])
        for part in ("estimate", "refined"):
            fresh[part] = {k: v for k, v in fresh[part].items() if k != "losses"}
        out["fresh"] = fresh
    return out


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds, per protocol and variant."""
    rows = []
    keys = sorted({(r["protocol"], r["variant"]) for r in runs})
    for protocol, variant in keys:
        group = [r for r in runs if (r["protocol"], r["variant"]) == (protocol, variant)]
        row = {"protocol": protocol, "variant": variant, "seeds": len(group)}
        for m in ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20"):
            vals = [r[m] for r in group if m in r]
            if vals:
                row[m] = statistics.mean(vals)
                row[m + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def format_table(summary: list[dict]) -> str:
    cols = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "recall@20", "ndcg@20")
    lines = ["| protocol | variant | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in summary:
        cells = [f"{r[c]:.4f} ± {r[c + '_sd']:.4f}" if c in r else "-" for c in cols]
        lines.append(f"| {r['protocol']} | {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
