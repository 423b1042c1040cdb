"""SASRec encodes a history the same way in training, offline evaluation and serving, and
a cold-start split keeps its held-out items truly cold."""

from __future__ import annotations

import pytest
import torch

from core.settings import ScorerSettings
from models.sasrec import SASRec, SASRecConfig
from scorer.scorers import SASRecScorer
from training.evaluate import leave_one_out
from training.recommender import left_pad, train_scorer, validator

CPU = torch.device("cpu")


@pytest.mark.parametrize("frozen", [False, True], ids=["id", "frozen-table"])
def test_one_history_gives_one_user_vector_on_every_path(frozen):
    torch.manual_seed(0)
    table = torch.randn(41, 24) if frozen else None
    model = SASRec(SASRecConfig(n_items=40, hidden=16, max_len=12, heads=2), table).eval()
    history = [3, 7, 9, 1, 22]
    with torch.no_grad():
        offline = model.user_vector(left_pad([history], 12))[0]  # evaluation: padded to max_len
        batch = left_pad([history, [5, 6, 7, 8, 9, 10, 11]], 12)[:, -7:]  # training: trimmed batch
        training = model.user_vector(batch)[0]
        vectors = model.item_vectors(torch.tensor(history)).numpy()
    serving = torch.from_numpy(SASRecScorer(model, "v").query(vectors))[0]  # serving: no padding
    assert torch.allclose(offline, training, atol=1e-5)
    assert torch.allclose(offline, serving, atol=1e-5)


def test_held_out_items_are_out_of_the_softmax_in_training():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=12, hidden=8, max_len=6, dropout=0.0))
    before = model.id_emb.weight.detach().clone()
    seqs = [[1, 2, 3, 4], [2, 3, 4, 6], [7, 8, 9, 10], [1, 3, 7, 8]] * 4
    cfg = ScorerSettings(epochs=3, batch_size=4, eval_every=1, patience=5)
    train_scorer(model, seqs, validator(([[1, 2]], [3]), CPU), cfg, CPU, progress=False, blocked=[5, 11])
    after = model.id_emb.weight.detach()
    assert torch.equal(after[[5, 11]], before[[5, 11]]), "never pushed down as negatives"
    assert not torch.equal(after[[1, 2, 3]], before[[1, 2, 3]])
    scores = model.predict(torch.tensor([[1, 2, 3]]), torch.tensor([5, 11]))
    assert torch.isinf(scores[0, [0, 5, 11]]).all() and torch.isfinite(scores[0, [1, 6, 12]]).all()


def test_leave_one_out_filters_held_out_items_from_validation_histories():
    split = leave_one_out([[1, 5, 2, 3, 4], [5, 1, 2, 5, 3], [1, 5, 2, 3, 5]], held_out={5})
    assert split.train == [[1, 2], [1, 2], [1, 2]]
    assert split.valid == ([[1, 2], [1, 2]], [3, 3]), "no held-out item in a validation history"
    assert split.test == ([[1, 5, 2, 3]], [5]), "cold protocol: only held-out targets, which exist by then"


@pytest.mark.parametrize("rows", [30, 700], ids=["fewer-rows-than-axes", "more-rows"])
def test_a_wide_table_enters_through_fixed_axes_that_survive_save_and_load(tmp_path, rows):
    from models.sasrec import load_sasrec, save_scorer

    torch.manual_seed(0)
    table = torch.randn(rows + 1, 800)
    model = SASRec(SASRecConfig(n_items=rows, hidden=8, max_input=64), table).eval()
    assert model.axes.shape == (800, 64) and model.adapter[0].in_features == 64
    with torch.no_grad():
        assert torch.allclose(model.item_vectors()[1:], model.adapt(table[1:]), atol=1e-5)
        loaded, _ = load_sasrec(save_scorer(tmp_path / "s.pt", model, {}))  # no table: serving
        assert torch.allclose(loaded.eval().adapt(table[3:9]), model.adapt(table[3:9]), atol=1e-5)
