"""``said dataset evaluate``: leave-one-out, full-ranking comparison of the scorer variants.

Three protocols share the code:
- standard: every item is aligned and trained on; all users are tested;
- cold-start: 10% of items (chosen by seed) are held out of alignment and scorer training,
  then added through the incremental path; only test users whose target is held out count;
- mixed (training/mixed.py): the same held-out items, split into cold-validation and
  cold-test, ranked with every other item: all, warm-target and cold-target test users from
  one training. The composite variants (models/composite.py) run here only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import get_args

import torch

from core.dataset import Dataset, load_dataset
from core.events import item_text
from core.files import write_atomic
from core.settings import AlignSettings, CompositeSettings, ScorerSettings, Settings, Variant
from models.aligner import FrozenLM
from models.blend import Blend
from models.composite import Composite
from models.llm import load_llm, pick_device
from models.sasrec import SASRec, SASRecConfig, init_id_rows, principal_axes
from training.align import code_version
from training.composite import Judges, judges_for, new_composite, pick_gate_and_boost, train_student
from training.mixed import (
    HALVES_SEED,
    MixedSplit,
    by_target,
    compare,
    halves,
    interaction_counts,
    measure,
    mixed_split,
    trained_items,
)
from training.recommender import evaluate, train_scorer, validator
from training.variants import prompt_table, said_table, text_table

log = logging.getLogger(__name__)
VARIANTS = get_args(Variant)
# they depend on the alignment
JOINT = {"said-joint-init", "composite-said-joint"}  # on an alignment of every item, cold ones too
SAID_VARIANTS = {
    "said",
    "said+text",
    "prompt",
    "hybrid",
    "said-init",
    "composite-said",
    "composite-said+text",
    "said+text-fair-init",  # composite-said+text's teacher
    *JOINT,
}
COMPOSITES = {
    "composite-said": "said",
    "composite-text": "text",
    "composite-said+text": "said+text-fair",
    "composite-said-joint": "said-joint",
}
# variant -> its table; measured in the mixed protocol only
MIXED_ONLY = COMPOSITES | {"blend-text": "text", "said-joint-init": "said-joint"}
BLEND_PARTS = ("composite-text", "text")  # a blend's ID side (with its gate) and its cold side
DIAGNOSTICS = {"blend-text", *JOINT}  # measured, not served: never the default variant
Kept = dict[tuple[str, int], "SASRec | Composite"]  # models trained in a mixed run, by (variant, seed)
MIXED_METRICS = ("warm_ndcg@10", "cold_ndcg@10", "cold_share_top10_warm_users")
METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "best_val_ndcg@10", *MIXED_METRICS)


def kept_part(variant: str) -> bool:
    """Whether a mixed run keeps ``variant``'s models for others to read back: a
    composite's teacher (``id``, ``*-init``) or a blend's part."""
    return variant == "id" or variant.endswith("-init") or variant in BLEND_PARTS


@dataclass(frozen=True)
class Plan:
    """What one evaluation measures: the data set, variants and seeds. ``model_options``
    (``SASRecConfig`` fields) run an experiment, its runs labelled by ``variant_label``;
    ``only_protocol`` ("standard" or "cold") runs one protocol. ``split_seed`` draws
    another held-out set (and another cold-validation half): 0 is the draw every earlier
    table used, so their cached alignments stay valid."""

    dataset: Path
    variants: list[str]
    seeds: list[int]
    align_seeds: list[int]
    cold_fraction: float = 0.1
    model_options: dict = field(default_factory=dict)
    only_protocol: str | None = None
    split_seed: int = 0


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


HELD_OUT_SEED = 12345  # the held-out draw of split seed 0


def held_out_items(n_items: int, fraction: float, seed: int) -> set[int]:
    rng = random.Random(seed)
    return set(rng.sample(range(1, n_items + 1), round(n_items * fraction)))


def dataset_key(ds: Dataset) -> str:
    h = hashlib.sha256()
    for item_id, title in zip(ds.item_ids, ds.titles, strict=True):
        h.update(f"{item_id}\t{title}\n".encode())
    return h.hexdigest()[:12]


def align_meta(cfg: AlignSettings) -> dict:
    """Everything that changes an alignment's result (its cache key, with the LLM and the
    held-out set): the schedule, rates, batch, passes and seed, k, item_dim, LoRA, prompt,
    the fresh path and the fidelity sample. Not the checkpoint period, nor ``compile``: like
    the device, it changes how fast the same steps run (and their rounding), not the steps."""
    return cfg.model_dump(exclude={"checkpoint_every_s", "compile"})


def said_cache_path(art: Path, meta: dict, llm_spec: str | None, held: set[int]) -> Path:
    config = json.dumps(
        meta | {"llm": llm_spec, "held_out": sorted(held), "code": code_version()}, sort_keys=True
    )
    return art / f"said-{hashlib.sha256(config.encode()).hexdigest()[:12]}.pt"


def run(
    plan: Plan,
    settings: Settings,
    artifacts: Path | None = None,
    results_path: Path | None = None,
    done: list[dict] | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate each variant over alignment and scorer seeds, standard and cold-start.

    One alignment per alignment seed serves every variant and both protocols: the cold
    items (``cold_fraction``, a fixed seeded sample) are held out of it and enter through
    the incremental path, as new items do in production. The standard protocol then
    trains on every item's interactions; the cold one never shows the scorer a cold item.
    Variants that do not depend on the alignment run once per scorer seed. The device,
    the LLM, the alignment (``settings.align``) and the scorers (``settings.scorer``) come
    from ``settings``; tables are cached under ``artifacts`` (default ``<data_dir>/artifacts``).

    With ``results_path``, results so far are rewritten after every run, so a long
    evaluation that is stopped still leaves every finished number on disk; ``done`` (the
    runs of such a file) are kept and not run again.
    """
    unknown = set(plan.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    acfg, device = settings.align, pick_device(settings.device)
    ds = load_dataset(plan.dataset)
    idx_of = {item_id: i + 1 for i, item_id in enumerate(ds.item_ids)}
    seqs = [[idx_of[i] for i in s] for _, s in ds.sequences]
    n = len(ds.item_ids)
    texts = [item_text(t, d) for t, d in zip(ds.titles, ds.descriptions, strict=True)]
    art = (artifacts or settings.data_dir / "artifacts") / f"{Path(plan.dataset).name}-{dataset_key(ds)}"
    held: set[int] = set()
    if plan.cold_fraction:
        held = held_out_items(n, plan.cold_fraction, HELD_OUT_SEED + plan.split_seed)
    lm = None
    if set(plan.variants) - {"id"} or plan.cold_fraction:
        lm = _load_lm(settings, device)
    feats = text_table(lm, texts, art / "text.pt", progress) if lm else None
    meta = align_meta(acfg)
    results: dict = {"dataset": str(plan.dataset), "items": n, "users": len(seqs), "device": str(device)}
    results |= {"split_seed": plan.split_seed, "align": meta, "models": model_settings(settings)}
    results["runs"] = list(done or [])
    finished = {(r["protocol"], r["variant"], r["align_seed"], r["seed"]) for r in results["runs"]}
    protocols = [("standard", set())] + ([("cold", held), ("mixed", held)] if held else [])
    if plan.only_protocol not in (None, *(name for name, _ in protocols)):
        raise ValueError(f"no protocol {plan.only_protocol!r} here; choose from {[n for n, _ in protocols]}")
    protocols = [(name, h) for name, h in protocols if plan.only_protocol in (None, name)]
    splits = {name: leave_one_out(seqs, h) for name, h in protocols if name != "mixed"}
    if "mixed" in dict(protocols):
        splits["mixed"] = mixed_split(seqs, n, *halves(held, HALVES_SEED + plan.split_seed))
    teachers: Kept = {}  # the mixed protocol's models by (variant, seed): composites' and blends' parts
    label_of = {v: variant_label(v, plan.model_options) for v in plan.variants}
    for a, align_seed in enumerate(plan.align_seeds):
        # a teacher on this alignment's table (said-init, said+text-fair-init) is not the last one's
        teachers = {k: m for k, m in teachers.items() if k[0] not in SAID_VARIANTS}
        tables: dict[str, torch.Tensor | None] = {"id": None, "text": feats, "text-init": feats}
        if set(plan.variants) & (SAID_VARIANTS - JOINT):
            built, path, lm = _alignment(settings, lm, texts, feats, art, align_seed, held, bool(a), progress)
            tables["said"] = tables["hybrid"] = tables["said-init"] = built["vectors"]
            tables["said+text"] = torch.cat([built["vectors"], feats], 1)
            tables["said+text-fair"] = fair_concat(
                [built["vectors"], feats], sorted(set(range(1, n + 1)) - held)
            )
            if "prompt" in plan.variants:
                tables["prompt"] = prompt_table(
                    built, lm.with_prompt(acfg.prompt), path.with_suffix(".prompt.pt")
                )
            results[f"said_report_align{align_seed}"] = _summarise_report(built["report"])
        if set(plan.variants) & JOINT:  # every item aligned at once: the fresh path's yardstick
            joint, _, _ = _alignment(settings, lm, texts, feats, art, align_seed, set(), True, progress)
            tables["said-joint"] = tables["said-joint-init"] = joint["vectors"]
            results[f"said_joint_report_align{align_seed}"] = _summarise_report(joint["report"])
        for variant in plan.variants:  # variant first: a stopped run has whole variants
            if a and variant not in SAID_VARIANTS:
                continue  # does not depend on the alignment: measured once
            run_align_seed = align_seed if variant in SAID_VARIANTS else None
            for protocol, held_here in protocols:
                if variant in MIXED_ONLY and protocol != "mixed":
                    continue  # a composite or a blend is measured in the mixed protocol only
                for seed in plan.seeds:
                    if (protocol, label_of[variant], run_align_seed, seed) in finished:
                        continue
                    cfg = settings.scorer.model_copy(update={"seed": seed})
                    trained = Trained(variant, tables[MIXED_ONLY.get(variant, variant)], plan.model_options)
                    if protocol == "mixed":
                        seeded = settings.model_copy(update={"scorer": cfg})
                        metrics = train_and_measure(
                            trained, splits[protocol], seeded, device, teachers, progress
                        )
                    else:
                        metrics = train_and_test(
                            trained, splits[protocol], held_here, n, cfg, device, progress
                        )
                    run_row = {"protocol": protocol, "variant": label_of[variant], "seed": seed}
                    run_row["align_seed"] = run_align_seed
                    results["runs"].append(run_row | metrics)
                    log.info(
                        "%s %s align %s seed %d: %s",
                        protocol,
                        run_row["variant"],
                        run_align_seed,
                        seed,
                        {k: v for k, v in metrics.items() if k != "per_user_ndcg@10"},
                    )
                    if results_path:
                        write_results(results | {"summary": summarise(results["runs"])}, results_path)
    results["summary"] = summarise(results["runs"])
    results["paired"] = paired(results["runs"])
    if "mixed" in splits:
        mixed = [r for r in results["runs"] if r["protocol"] == "mixed"]
        split = splits["mixed"]
        results["mixed"] = compare(mixed, torch.tensor([t in split.cold_test for t in split.test[1]]))
    return results


def model_settings(settings: Settings) -> dict:
    """The scorer and composite sections a results file's runs were trained and chosen
    under: a resumed evaluation must not mix runs of two rules (``changed_settings``)."""
    return {
        "scorer": settings.scorer.model_dump(mode="json"),
        "composite": settings.composite.model_dump(mode="json"),
    }


def changed_settings(earlier: dict, settings: Settings) -> list[str]:
    """The ``section.key`` settings that differ from those an earlier results file recorded
    (none where it recorded none: a file from before they were kept)."""
    recorded, now = earlier.get("models"), model_settings(settings)
    if recorded is None:
        return []
    return sorted(
        f"{section}.{key}"
        for section in now
        for key in now[section].keys() | recorded.get(section, {}).keys()
        if now[section].get(key) != recorded.get(section, {}).get(key)
    )


def _load_lm(settings: Settings, device: torch.device) -> FrozenLM:
    model, tok = load_llm(
        settings.llm, settings.data_dir / "llm", device, settings.align.lora_rank, settings.attention
    )
    return FrozenLM.around(model, tok, device, settings.align.prompt)


@dataclass(frozen=True)
class Trained:
    """The scorer variant a run trains: its name, its frozen table (None for ``id``) and
    any experimental ``SASRecConfig`` options."""

    variant: str
    table: torch.Tensor | None
    model_options: dict = field(default_factory=dict)


def fair_concat(tables: list[torch.Tensor], fit_on: list[int], width: int = 576) -> torch.Tensor:
    """Tables side by side, each standardised and reduced to its own top ``width / len``
    principal axes (fitted on ``fit_on`` rows) and scaled to unit variance in all: no block
    dominates the concatenation by its width or scale, as the 2,304-d SAID block dominated a
    plain concatenation with 576-d text. (N+1, width)."""
    parts, d = [], width // len(tables)
    for t in tables:
        fit = t[fit_on].float()
        mean, std = fit.mean(0), fit.std(0).clamp(min=1e-6)
        z = (t.float() - mean) / std
        p = z @ principal_axes(z[fit_on], d)  # (N+1, d)
        parts.append(p / p[fit_on].pow(2).sum(1).mean().sqrt())
    out = torch.cat(parts, 1)
    out[0] = 0.0
    return out


def _model(trained: Trained, train_seqs: list[list[int]], n: int, held: set[int]) -> SASRec:
    """The untrained SASRec of a (non-composite) variant."""
    variant, table = trained.variant, trained.table
    warm = torch.tensor(sorted(set(range(1, n + 1)) - held)) if held else None
    residual_on = None
    if variant == "hybrid":  # ID rows only for items the scorer trains on; zero for the rest
        residual_on = trained_items(train_seqs)
    mcfg = SASRecConfig(n_items=n, **trained.model_options)
    if variant.endswith("-init"):  # an ID scorer whose rows start from its table (a teacher's too)
        model = SASRec(mcfg)  # fitted on the items it trains on, as the composite's read rows
        init_id_rows(model, table, trained_items(train_seqs))
        return model
    return SASRec(mcfg, table, standardise_on=warm, residual_on=residual_on)


def _alignment(
    settings: Settings,
    lm: FrozenLM,
    texts: list[str],
    feats: torch.Tensor,
    art: Path,
    align_seed: int,
    held: set[int],
    fresh: bool,
    progress: bool,
) -> tuple[dict, Path, FrozenLM]:
    """One SAID alignment of every item but ``held`` (added after by the fresh path), cached
    by its settings, LLM, held-out set and code: the table, its cache path and the LLM it
    adapted. With LoRA an alignment that is not the run's first (``fresh``) adapts its own
    fresh copy of the LLM, loaded only when the table is not cached. An empty ``held``
    aligns every item at once: alignment reads text only, so cold items' rows then see none
    of their interactions, which is what makes it the fresh path's yardstick."""
    seed_cfg = settings.align.model_copy(update={"seed": align_seed})
    path = said_cache_path(art, align_meta(seed_cfg), settings.llm, held)
    if fresh and settings.align.lora_rank and not path.exists():
        lm = _load_lm(settings, lm.device)
    return said_table(lm, texts, feats, held, seed_cfg, path, progress), path, lm


def train_and_measure(
    trained: Trained,
    split: MixedSplit,
    settings: Settings,
    device: torch.device,
    teachers: Kept,
    progress: bool,
) -> dict:
    """One model under the mixed protocol, trained (``train_mixed``) and measured
    (``training.mixed.measure``), with the headline figures also as flat keys."""
    model, info = train_mixed(trained, split, settings, device, teachers, progress)
    figures = measure(model, split, interaction_counts(split.train, split.n_items), device)
    flat = {"ndcg@10": figures["all"]["ndcg@10"], "recall@10": figures["all"]["recall@10"]}
    for group in ("warm", "cold"):
        if group in figures:
            flat[f"{group}_ndcg@10"] = figures[group]["ndcg@10"]
    flat["cold_share_top10_warm_users"] = figures["cold_share_top10_warm_users"]
    return flat | figures | info


def train_mixed(
    trained: Trained,
    split: MixedSplit,
    settings: Settings,
    device: torch.device,
    teachers: Kept,
    progress: bool,
) -> tuple[SASRec | Composite | Blend, dict]:
    """A SASRec variant early-stopped on the mixed validation users, a composite whose
    teacher is the ID model of the same seed (``teacher_variant``), or a blend of the
    ``composite-text`` and ``text`` models of the same seed. Each part is taken from
    ``teachers`` (trained here if missing), and only such parts are kept there, by (variant,
    seed)."""
    seed = settings.scorer.seed
    counts = interaction_counts(split.train, split.n_items)
    validate = validator(split.valid, device)
    judged = judges_for(*by_target(split.valid, split.cold_valid), device)  # a composite's choices
    if trained.variant == "blend-text":
        parts = [_kept(v, trained, split, settings, device, teachers, progress) for v in BLEND_PARTS]
        blend = Blend(*[copy.deepcopy(p) for p in parts])
        return blend, pick_gate_and_boost(blend, blend.composite, blend.boost, judged, settings.composite)
    if trained.variant in COMPOSITES:
        name = teacher_variant(trained.variant, settings.composite)
        on = replace(trained, table=None if name == "id" else trained.table)
        teacher = _kept(name, on, split, settings, device, teachers, progress)
        torch.manual_seed(seed)  # after the teacher: a resumed run starts the student alike
        composite = new_composite(copy.deepcopy(teacher), trained.table, counts, settings.composite)
        composite, info = train_student(composite, split.train, judged, settings.composite, device, progress)
        if trained.variant in BLEND_PARTS:
            teachers[(trained.variant, seed)] = composite
        return composite, info
    torch.manual_seed(seed)
    model = _model(trained, split.train, split.n_items, split.held)
    model, info = train_scorer(
        model, split.train, validate, settings.scorer, device, progress, sorted(split.held)
    )
    model.impute_residuals()
    if kept_part(trained.variant):
        teachers[(trained.variant, seed)] = model
    return model, info | by_target_validation(model, judged)


def teacher_variant(composite: str, cfg: CompositeSettings) -> str:
    """The plain variant a composite's ID teacher is: ``id``, or with ``cfg.teacher_init``
    "content" the ID scorer whose rows start from the composite's own content table
    (``text-init`` for ``composite-text``), as ``updater.retrain`` trains the served one."""
    return "id" if cfg.teacher_init == "random" else f"{COMPOSITES[composite]}-init"


def by_target_validation(model: SASRec, judged: Judges) -> dict:
    """A plain variant's validation NDCG@10 on warm-target and cold-validation users, as a
    composite reports at each of its choices: where ``text`` itself sits on validation is
    what says whether a composite choice could reach it on cold users."""
    cold = judged.cold(model) if judged.cold else 0.0
    return {"val_warm_ndcg@10": judged.warm(model), "val_cold_ndcg@10": cold}


def _kept(
    variant: str,
    trained: Trained,
    split: MixedSplit,
    settings: Settings,
    device: torch.device,
    teachers: Kept,
    progress: bool,
) -> SASRec | Composite:
    """The ``variant`` model of this seed from ``teachers``, trained first if missing (e.g.
    its run was resumed from a results file) on ``trained``'s table."""
    key = (variant, settings.scorer.seed)
    if key not in teachers:
        train_mixed(replace(trained, variant=variant), split, settings, device, teachers, progress)
    return teachers[key]


def train_and_test(
    trained: Trained,
    split: Split,
    held: set[int],
    n: int,
    cfg: ScorerSettings,
    device: torch.device,
    progress: bool,
) -> dict:
    """Train one scorer (early-stopped on validation, seeded by ``cfg.seed``) and measure
    it on the test users."""
    torch.manual_seed(cfg.seed)
    model = _model(trained, split.train, n, held)
    validate = validator(split.valid, device, blocked=sorted(held))
    model, info = train_scorer(model, split.train, validate, cfg, device, progress, blocked=sorted(held))
    model.impute_residuals()
    return evaluate(model, *split.test, device) | info


def variant_label(variant: str, model_options: dict | None) -> str:
    """How a run is named in the results: the variant, plus any model options, e.g.
    ``hybrid[residual_dropout=0.5]``, so experiments never mix with the defaults' rows."""
    opts = ",".join(f"{k}={v}" for k, v in sorted((model_options or {}).items()))
    return f"{variant}[{opts}]" if opts else variant


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
    """Mean and sample standard deviation over all seeds (alignment x scorer), per protocol
    and variant. ``best_val_ndcg@10`` is the validation figure the model was chosen on (a
    scorer's early stopping; for a composite, the mixed figure of its chosen gate and boost);
    the others are test figures, on users the scorer never validated on."""
    rows = []
    for protocol, variant in sorted({(r["protocol"], r["variant"]) for r in runs}):
        group = [r for r in runs if (r["protocol"], r["variant"]) == (protocol, variant)]
        row = {"protocol": protocol, "variant": variant, "runs": len(group)}
        for m in METRICS:
            vals = [r[m] for r in group if m in r]
            if vals:
                row[m] = statistics.mean(vals)
                row[m + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def paired(runs: list[dict], baseline: str = "id", metric: str = "ndcg@10") -> list[dict]:
    """Each variant against ``baseline`` with the same scorer seed and protocol: the mean
    difference, the ratio of means, and in how many of the pairs the variant won."""
    runs = [r for r in runs if metric in r]  # a protocol with no test users has none
    base = {(r["protocol"], r["seed"]): r[metric] for r in runs if r["variant"] == baseline}
    out = []
    for protocol, variant in sorted({(r["protocol"], r["variant"]) for r in runs}):
        if variant == baseline:
            continue
        pairs = [
            (r[metric], base[(protocol, r["seed"])])
            for r in runs
            if (r["protocol"], r["variant"]) == (protocol, variant) and (protocol, r["seed"]) in base
        ]
        if not pairs:
            continue
        diffs = [v - b for v, b in pairs]
        mean_base = statistics.mean(b for _, b in pairs)
        out.append(
            {
                "protocol": protocol,
                "variant": variant,
                "baseline": baseline,
                "pairs": len(pairs),
                "mean_diff": statistics.mean(diffs),
                "diff_sd": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                "ratio": statistics.mean(v for v, _ in pairs) / mean_base if mean_base else float("nan"),
                "wins": sum(d > 0 for d in diffs),
            }
        )
    return out


def pick_default(summary: list[dict], protocol: str = "standard") -> str | None:
    """The variant with the best mean validation NDCG@10: chosen without looking at test.
    None when the summary has no run of ``protocol`` (a cold-only experiment)."""
    rows = [r for r in summary if r["protocol"] == protocol and "best_val_ndcg@10" in r]
    rows = [r for r in rows if r["variant"] not in DIAGNOSTICS]  # never the default: not served
    return max(rows, key=lambda r: r["best_val_ndcg@10"])["variant"] if rows else None


def format_table(summary: list[dict], pairs: list[dict] | None = None) -> str:
    cols = METRICS
    head = "| protocol | variant | runs | " + " | ".join(c.replace("best_val_", "val ") for c in cols) + " |"
    lines = [head, "|---|---|---|" + "---|" * len(cols)]
    for r in summary:
        cells = [f"{r[c]:.4f} ± {r[c + '_sd']:.4f}" if c in r else "-" for c in cols]
        lines.append(f"| {r['protocol']} | {r['variant']} | {r['runs']} | " + " | ".join(cells) + " |")
    if pairs:
        lines += [
            "",
            "| protocol | variant vs id | pairs | NDCG@10 diff | ratio | wins |",
            "|---|---|---|---|---|---|",
        ]
        for p in pairs:
            lines.append(
                f"| {p['protocol']} | {p['variant']} | {p['pairs']} "
                f"| {p['mean_diff']:+.4f} ± {p['diff_sd']:.4f} "
                f"| {p['ratio']:.3f} | {p['wins']}/{p['pairs']} |"
            )
    return "\n".join(lines)


def write_results(results: dict, path: Path) -> None:
    """Replace the results file atomically: it is rewritten after every run, and a run
    stopped mid-write (a deadline's SIGTERM, a full disk) must leave the last whole file,
    which ``--resume`` reads, not a truncated one."""
    write_atomic(path, json.dumps(results, indent=2).encode())
