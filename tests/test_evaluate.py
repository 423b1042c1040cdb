"""The evaluation's bookkeeping: cache keys, the hybrid variant, paired comparisons and
the choice of the default variant on validation, never on test."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from core.settings import AlignSettings, CompositeSettings, ScorerSettings, Settings
from models.sasrec import SASRec, SASRecConfig
from training.evaluate import (
    align_meta,
    changed_settings,
    kept_part,
    model_settings,
    paired,
    pick_default,
    said_cache_path,
    summarise,
    teacher_variant,
    write_results,
)
from training.recommender import train_scorer, validator

CPU = torch.device("cpu")

BASE = AlignSettings(k=4, item_dim=64, lora_rank=0, prompt="p")


def _path(tmp_path, cfg=BASE, llm="a", held=frozenset({3})):
    return said_cache_path(tmp_path, align_meta(cfg), llm, set(held))


def _with(**update) -> AlignSettings:
    return BASE.model_copy(update=update)


def test_said_cache_key_changes_with_everything_that_changes_the_table(tmp_path):
    base = _path(tmp_path)
    assert base == _path(tmp_path), "same config, same file"
    changed = [
        _path(tmp_path, cfg=_with(seed=1)),
        _path(tmp_path, cfg=_with(epochs=3)),
        _path(tmp_path, cfg=_with(batch_size=7)),
        _path(tmp_path, cfg=_with(lr_rows=0.123)),
        _path(tmp_path, cfg=_with(lr_proj=0.5)),
        _path(tmp_path, cfg=_with(k=1)),
        _path(tmp_path, cfg=_with(item_dim=32)),
        _path(tmp_path, llm="b"),
        _path(tmp_path, held={4}),
    ]
    assert len({base, *changed}) == len(changed) + 1
    assert _path(tmp_path, cfg=_with(checkpoint_every_s=1.0)) == base, "no effect, same key"
    assert _path(tmp_path, cfg=_with(compile=True)) == base, "how fast the same steps run: same key"


def test_hybrid_residual_starts_at_zero_and_never_moves_for_unseen_items():
    torch.manual_seed(0)
    table = torch.randn(13, 10)
    seen = torch.tensor([1, 2, 3, 4, 6, 7, 8])
    model = SASRec(SASRecConfig(n_items=12, hidden=8, max_len=6, dropout=0.0), table, residual_on=seen)
    plain = SASRec(SASRecConfig(n_items=12, hidden=8, max_len=6, dropout=0.0), table)
    plain.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(model.item_vectors(), plain.item_vectors()), "zero-initialised residual"
    seqs = [[1, 2, 3, 4], [2, 3, 4, 6], [7, 8, 3, 1]] * 4
    cfg = ScorerSettings(epochs=4, batch_size=4, eval_every=1, patience=5)
    train_scorer(model, seqs, validator(([[1, 2]], [3]), CPU), cfg, CPU, progress=False)
    with torch.no_grad():
        residual = model.item_vectors() - model.adapt(table)  # (13, 8)
    assert residual[[1, 2, 3, 4]].abs().sum() > 0, "warm items learn their ID rows"
    assert residual[[0, 5, 9, 10, 11, 12]].abs().max() < 1e-6, "cold items keep what the text gives"


def _runs():
    rows = []
    for seed, (i, s, v_i, v_s) in enumerate([(0.10, 0.12, 0.30, 0.20), (0.11, 0.12, 0.31, 0.21)]):
        rows.append(
            {"protocol": "standard", "variant": "id", "seed": seed, "ndcg@10": i, "best_val_ndcg@10": v_i}
        )
        for align in (0, 1):
            rows.append(
                {"protocol": "standard", "variant": "said", "seed": seed, "align_seed": align}
                | {"ndcg@10": s, "best_val_ndcg@10": v_s}
            )
    return rows


def test_paired_comparison_matches_each_run_with_the_baseline_of_its_scorer_seed():
    (row,) = paired(_runs())
    assert row["variant"] == "said" and row["pairs"] == 4
    assert abs(row["mean_diff"] - 0.015) < 1e-9
    assert row["wins"] == 4


def test_default_variant_is_chosen_on_validation_not_test():
    summary = summarise(_runs())
    assert pick_default(summary) == "id", "said is better on test but worse on validation"


def test_a_diagnostic_is_never_the_default_variant_however_well_it_validates():
    """``blend-text`` and the joint-alignment yardstick cannot be served, so validation
    never picks them, even when they validate best."""
    summary = [
        {"protocol": "mixed", "variant": v, "best_val_ndcg@10": val}
        for v, val in (("composite-said", 0.09), ("composite-said-joint", 0.2), ("blend-text", 0.3))
    ]
    assert pick_default(summary, "mixed") == "composite-said"


def test_residual_dropout_scores_dropped_items_as_cold_ones_in_training_only():
    torch.manual_seed(0)
    table = torch.randn(13, 10)
    cfg = SASRecConfig(n_items=12, hidden=8, max_len=6, dropout=0.0, residual_dropout=1.0)
    model = SASRec(cfg, table, residual_on=torch.tensor([1, 2, 3, 4]))
    with torch.no_grad():
        model.residual.weight.normal_()
    model.train()
    keep = model.residual_keep()
    assert keep is not None and keep.sum() == 0, "p = 1 drops every residual"
    with torch.no_grad():
        assert torch.allclose(model.item_vectors(keep=keep), model.adapt(table)), "dropped: adapter alone"
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]])).backward()
    assert model.residual.weight.grad.abs().max() == 0, "a dropped residual learns nothing that step"
    draws = []
    model.residual_keep = lambda: draws.append(1) or keep  # one draw per step, for history and candidates
    model(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 4]]))
    assert draws == [1]
    del model.residual_keep
    model.eval()
    assert model.residual_keep() is None, "never at evaluation or serving"
    with torch.no_grad():
        assert not torch.allclose(model.item_vectors()[1:5], model.adapt(table)[1:5])
    half = SASRec(replace(cfg, residual_dropout=0.5), table, residual_on=torch.tensor([1, 2, 3, 4])).train()
    kept = torch.stack([half.residual_keep() for _ in range(400)]).mean()
    assert 0.4 < float(kept) < 0.6


def test_whitened_input_has_unit_variance_on_every_axis():
    torch.manual_seed(0)
    mix = torch.randn(16, 16) * torch.logspace(0, 3, 16)  # anisotropic: spreads from 1 to 1000
    table = torch.cat([torch.zeros(1, 16), torch.randn(300, 16) @ mix])
    plain = SASRec(SASRecConfig(n_items=300, hidden=8), table)
    white = SASRec(SASRecConfig(n_items=300, hidden=8, whiten=True), table)
    cov = torch.cov(white.table_in[1:].T)  # (16, 16)
    assert torch.allclose(cov, torch.eye(16), atol=1e-3)
    spread = torch.linalg.eigvalsh(torch.cov(plain.table_in[1:].T))
    assert spread.max() / spread.min() > 100, "standardising alone leaves it anisotropic"


def test_id_rows_can_start_from_the_said_table_fitted_on_warm_items():
    from models.sasrec import init_id_rows

    torch.manual_seed(0)
    table = torch.cat([torch.zeros(1, 32), torch.randn(40, 3) @ torch.randn(3, 32)])  # rank 3
    model = SASRec(SASRecConfig(n_items=40, hidden=8))
    init_id_rows(model, table, fit_on=torch.arange(1, 31))
    rows = model.id_emb.weight.detach().clone()
    assert rows[0].abs().max() == 0, "padding stays zero"
    assert abs(float(rows[1:31].std()) - 8**-0.5) < 1e-4, "the ID table's own initial spread"
    fit = table[1:31]
    z = (table[1:] - fit.mean(0)) / fit.std(0)  # the table as the fit standardised it
    near = torch.cdist(rows[1:], rows[1:]).argsort(1)[:, 1]
    expect = torch.cdist(z, z).argsort(1)[:, 1]
    assert torch.equal(near, expect), "neighbours as in the table, also for the 10 rows not fitted on"
    far = table.clone()
    far[31:] *= 50  # held-out rows, far out: they must not shape the fit
    init_id_rows(model, far, fit_on=torch.arange(1, 31))
    assert torch.allclose(model.id_emb.weight.detach()[1:31], rows[1:31], atol=1e-5)


def test_a_composites_teacher_starts_from_its_own_table_as_the_served_retrain_does():
    """``SAID_COMPOSITE_TEACHER_INIT``: content starts each composite's teacher from the
    composite's table (``updater.retrain.content_start`` serves it so); random is ``id``."""
    content, random = CompositeSettings(teacher_init="content"), CompositeSettings(teacher_init="random")
    assert teacher_variant("composite-text", content) == "text-init"
    assert teacher_variant("composite-said", content) == "said-init"
    assert teacher_variant("composite-said+text", content) == "said+text-fair-init"
    assert teacher_variant("composite-said-joint", content) == "said-joint-init"
    assert {teacher_variant(c, random) for c in ("composite-text", "composite-said")} == {"id"}
    assert all(kept_part(teacher_variant(c, content)) for c in ("composite-text", "composite-said"))


@pytest.mark.slow
def test_said_evaluate_runs_every_variant_on_every_protocol_and_writes_the_table(tmp_path, tiny_hf_folder):
    """`said evaluate` end to end (tiny real-tokenizer LLM, generated data): one alignment
    with the cold items held out and added incrementally, then each variant's scorer per
    protocol; the cold protocol tests only users whose target was held out; the mixed one
    tests every user whose target is not a cold-validation item, composites included."""
    import json
    import os
    import subprocess
    import sys

    from tests.support.catalogue import write_dataset

    out = tmp_path / "results.json"
    env = os.environ | {
        "SAID_LLM": str(tiny_hf_folder),
        "SAID_DATA_DIR": str(tmp_path / "data"),
        "SAID_DEVICE": "cpu",
    }
    variants = ["id", "said", "hybrid", "said-init", "text-init"]
    composites = [
        "composite-said",
        "composite-text",
        "composite-said+text",
        "blend-text",
        "composite-said-joint",
    ]  # blend: text trained for it; joint: said-joint-init trained for it
    cmd = [sys.executable, "-m", "said.cli", "evaluate", "--dataset", str(write_dataset(tmp_path / "ds"))]
    cmd += [
        "--variant",
        *variants,
        *composites,
        "--seeds",
        "0",
        "--align-epochs",
        "1",
        "--scorer-epochs",
        "2",
    ]
    cmd += ["--cold-fraction", "0.2", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    got = {(r["protocol"], r["variant"]) for r in results["runs"]}
    assert got == {(p, v) for p in ("standard", "cold", "mixed") for v in variants} | {
        ("mixed", v) for v in composites
    }
    users = {
        r["protocol"]: r["users"] if r["protocol"] != "mixed" else r["all"]["users"] for r in results["runs"]
    }
    assert 0 < users["cold"] < users["mixed"] < users["standard"] == 120, "mixed: all but cold-valid targets"
    mixed = [r for r in results["runs"] if r["protocol"] == "mixed"]
    assert all(r["all"]["users"] == r["warm"]["users"] + r["cold"]["users"] for r in mixed)
    assert all(len(r["per_user_ndcg@10"]) == r["all"]["users"] for r in mixed)
    assert {r["variant"] for r in results["mixed"]} == set(variants + composites)
    assert all(0 <= r["ndcg@10"] <= r["recall@10"] <= 1 for r in results["runs"])
    assert results["said_report_align0"]["fresh"]["items"] == 12, "20% of 60 items added incrementally"
    assert results["said_report_align0"]["items_aligned"] == 48
    joint = results["said_joint_report_align0"]
    assert joint["items_aligned"] == 60 and "fresh" not in joint, "the yardstick aligns every item at once"
    assert "| cold | said-init |" in done.stdout
    assert "| composite-said (cold) |" in done.stdout


def test_imputed_residuals_come_from_the_nearest_trained_items():
    table = torch.zeros(7, 4)
    table[1:] = torch.tensor(
        [[1, 0, 0, 0], [0, 1, 0, 0], [0.9, 0.1, 0, 0], [0.1, 0.9, 0, 0], [1, 0.2, 0, 0], [0, 0, 1, 0]]
    )
    cfg = SASRecConfig(n_items=6, hidden=2, max_len=4, residual_impute_k=2)
    model = SASRec(cfg, table, residual_on=torch.tensor([1, 2, 3, 4]))
    with torch.no_grad():
        model.residual.weight[1:5] = torch.tensor([[1.0, 0], [0, 1.0], [3.0, 0], [0, 3.0]])
    model.impute_residuals()
    got = model.residual.weight.detach() * model.residual_seen
    assert torch.allclose(got[5], torch.tensor([2.0, 0])), "item 5 is nearest to items 1 and 3"
    assert torch.allclose(got[1:5], torch.tensor([[1.0, 0], [0, 1.0], [3.0, 0], [0, 3.0]])), (
        "trained ones kept"
    )
    assert got[0].abs().max() == 0, "padding stays zero"
    plain = SASRec(replace(cfg, residual_impute_k=0), table, residual_on=torch.tensor([1, 2, 3, 4]))
    plain.impute_residuals()
    assert plain.residual_seen[5:].abs().max() == 0, "off by default: cold items keep what the text gives"


def test_said_cache_key_changes_with_the_alignment_code(tmp_path, monkeypatch):
    from training import align, evaluate

    base = _path(tmp_path)
    assert len(align.code_version()) == 12 and align.code_version() == align.code_version()
    monkeypatch.setattr(evaluate, "code_version", lambda: "other-code")
    assert _path(tmp_path) != base, "a table aligned by other code is never reused"


def test_said_evaluate_passes_the_item_split_seed_to_the_plan(tmp_path, monkeypatch):
    """`said dataset evaluate --split-seed 1` draws the second held-out set, as
    benchmarks/quality.py does."""
    import training.evaluate
    from said.cli import main

    plans = []

    def fake_run(plan, settings):
        plans.append(plan)
        return {"split_seed": plan.split_seed, "summary": [], "runs": []}

    monkeypatch.setattr(training.evaluate, "run", fake_run)
    out = tmp_path / "r.json"
    assert main(["dataset", "evaluate", "--dataset", "d", "--split-seed", "1", "--out", str(out)]) == 0
    assert plans[0].split_seed == 1


def test_a_resumed_evaluation_names_the_settings_its_file_was_run_with_that_changed():
    """A results file keeps the scorer and composite settings its runs were chosen under, so
    a resume under another choice rule is refused instead of mixing the two."""
    before = Settings()
    earlier = {"models": model_settings(before)}
    assert changed_settings(earlier, before) == []
    now = before.model_copy(update={"composite": CompositeSettings(cold_tolerance=0.0)})
    assert changed_settings(earlier, now) == ["composite.cold_tolerance"]
    assert changed_settings({}, now) == [], "a file from before the settings were kept"


def test_a_results_file_stopped_mid_write_keeps_its_last_whole_version(tmp_path, monkeypatch):
    """The evaluation rewrites its results after every run and ``--resume`` reads them back:
    a write cut short (here, the rename that publishes it fails) leaves the previous file."""
    import json
    import os

    path = tmp_path / "results.json"
    write_results({"runs": [1]}, path)

    def cut(*_args):
        raise KeyboardInterrupt  # the deadline's signal, mid-write

    monkeypatch.setattr(os, "replace", cut)
    with pytest.raises(KeyboardInterrupt):
        write_results({"runs": [1, 2]}, path)
    assert json.loads(path.read_text()) == {"runs": [1]}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"], "no temp file left behind"
