"""The evaluation's bookkeeping: cache keys, the hybrid variant, paired comparisons and
the choice of the default variant on validation, never on test."""

from __future__ import annotations

from dataclasses import replace

import torch

from models.sasrec import SASRec, SASRecConfig
from training.align import AlignConfig
from training.evaluate import align_meta, paired, pick_default, said_cache_path, summarise
from training.recommender import ScorerTrainConfig, train_scorer


def _path(tmp_path, cfg=None, k=4, item_dim=64, llm="a", held=frozenset({3})):
    cfg = cfg or AlignConfig()
    return said_cache_path(tmp_path, align_meta(cfg, k, item_dim, 0, "p", None, None), llm, set(held))


def test_said_cache_key_changes_with_everything_that_changes_the_table(tmp_path):
    base = _path(tmp_path)
    assert base == _path(tmp_path), "same config, same file"
    changed = [
        _path(tmp_path, cfg=replace(AlignConfig(), seed=1)),
        _path(tmp_path, cfg=replace(AlignConfig(), epochs=3)),
        _path(tmp_path, cfg=replace(AlignConfig(), batch_size=7)),
        _path(tmp_path, cfg=replace(AlignConfig(), lr_rows=0.123)),
        _path(tmp_path, cfg=replace(AlignConfig(), lr_proj=0.5)),
        _path(tmp_path, k=1),
        _path(tmp_path, item_dim=32),
        _path(tmp_path, llm="b"),
        _path(tmp_path, held={4}),
    ]
    assert len({base, *changed}) == len(changed) + 1
    assert _path(tmp_path, cfg=replace(AlignConfig(), checkpoint_every_s=1.0)) == base, "no effect, same key"


def test_hybrid_residual_starts_at_zero_and_never_moves_for_unseen_items():
    torch.manual_seed(0)
    table = torch.randn(13, 10)
    seen = torch.tensor([1, 2, 3, 4, 6, 7, 8])
    model = SASRec(SASRecConfig(n_items=12, hidden=8, max_len=6, dropout=0.0), table, residual_on=seen)
    plain = SASRec(SASRecConfig(n_items=12, hidden=8, max_len=6, dropout=0.0), table)
    plain.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(model.item_vectors(), plain.item_vectors()), "zero-initialised residual"
    seqs = [[1, 2, 3, 4], [2, 3, 4, 6], [7, 8, 3, 1]] * 4
    cfg = ScorerTrainConfig(epochs=4, batch_size=4, eval_every=1, patience=5)
    train_scorer(model, seqs, ([[1, 2]], [3]), cfg, torch.device("cpu"), progress=False)
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
