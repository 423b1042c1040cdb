"""The mixed protocol splits as users meet the catalogue, and the warm/cold composite puts
cold items in the ID teacher's space from their content alone."""

from __future__ import annotations

import pytest
import torch

from core.files import load_torch, save_torch
from core.settings import CompositeSettings
from models.blend import Blend, log_probs
from models.composite import Composite, load_composite, save_composite
from models.ranking import recall_ndcg
from models.sasrec import SASRec, SASRecConfig, init_id_rows
from scorer.scorers import load_scorer
from training.composite import (
    Judges,
    WindowStop,
    choose,
    judges_for,
    pick_gate_and_boost,
    teacher_states,
    train_student,
)
from training.evaluate import by_target_validation
from training.mixed import (
    by_target,
    compare,
    format_compare,
    halves,
    interaction_counts,
    interval,
    mixed_split,
    popularity_buckets,
    trained_items,
)
from training.recommender import left_pad

CPU = torch.device("cpu")


def test_mixed_split_holds_items_out_of_training_only():
    seqs = [[1, 2, 3, 4], [2, 5, 1, 6], [1, 2, 6, 5], [3, 6, 5, 2]]
    split = mixed_split(seqs, 6, cold_valid={5}, cold_test={6})
    assert split.train == [[1, 2], [2], [1, 2], [3]], "no held-out item is trained on"
    vh, vt = split.valid
    assert vt == [3, 1, 5], "validation: warm or cold-validation targets, never cold-test"
    assert vh[1] == [2, 5], "a history keeps its held-out items: they exist by then"
    assert vh[2] == [3], "but validation never sees a cold-test item, not even in a history"
    th, tt = split.test
    assert tt == [4, 6, 2], "test: warm or cold-test targets; a cold-validation target is left out"
    assert th[1] == [2, 5, 1]
    assert split.held == {5, 6}


def test_halves_split_the_held_out_items_in_two_without_overlap():
    cold_valid, cold_test = halves(set(range(1, 101)))
    assert len(cold_valid) == len(cold_test) == 50 and not cold_valid & cold_test
    assert halves(set(range(1, 101))) == (cold_valid, cold_test), "seeded"


def _teacher(rows: torch.Tensor) -> SASRec:
    torch.manual_seed(0)
    teacher = SASRec(SASRecConfig(n_items=rows.shape[0] - 1, hidden=rows.shape[1], max_len=8, dropout=0.0))
    with torch.no_grad():
        teacher.id_emb.weight.copy_(rows)
    return teacher.eval()


def test_the_gate_gives_warm_items_their_id_rows_and_cold_items_the_student():
    torch.manual_seed(0)
    rows = torch.randn(11, 8)
    rows[0] = 0
    counts = torch.tensor([0, 5, 5, 1, 1, 2, 2, 3, 3, 0, 0.0])  # items 9 and 10 are cold
    model = Composite(_teacher(rows), torch.randn(11, 12), counts, dropout=0.1).eval()
    with torch.no_grad():
        vectors = model.gated_vectors()
        student = model.student_vectors()
    assert torch.equal(vectors[1:9], rows[1:9]), "hard switch: a warm item is its ID row"
    assert torch.equal(vectors[9:], student[9:]), "a cold item is the student's vector"
    assert vectors[0].abs().max() == 0, "padding"
    model.kappa.fill_(1.0)
    with torch.no_grad():
        blended = model.gated_vectors()
    g = 1 / (1 + 1.0)  # item 3 has one interaction: g = n / (n + kappa)
    assert torch.allclose(blended[3], g * rows[3] + (1 - g) * student[3])
    assert torch.equal(blended[9], student[9]), "no interaction: no ID part at any kappa"


def test_a_cold_item_in_a_history_reads_as_its_student_vector():
    torch.manual_seed(0)
    rows = torch.randn(11, 8)
    counts = torch.tensor([0] + [2.0] * 8 + [0, 0])
    model = Composite(_teacher(rows), torch.randn(11, 12), counts, dropout=0.1).eval()
    history = torch.tensor([[0, 0, 3, 9]])  # item 9 is cold
    with torch.no_grad():
        before = model.predict(history)
        shift = torch.randn(8)  # not uniform: LayerNorm would cancel a uniform shift
        model.student[-1].bias.add_(shift)  # moves every student vector
        after = model.predict(history)
        warm_only = model.predict(torch.tensor([[0, 0, 3, 4]]))
        model.student[-1].bias.sub_(shift)
        warm_before = model.predict(torch.tensor([[0, 0, 3, 4]]))
    assert not torch.allclose(before[0, 1:9], after[0, 1:9]), "the cold item's vector shapes the query"
    assert torch.allclose(warm_only[0, 1:9], warm_before[0, 1:9]), "a warm history does not read the student"
    assert torch.isinf(before[0, 0]), "padding never ranks"


def test_a_content_started_composite_reads_history_items_as_its_teacher_started_or_trained_them():
    """The teacher's encoder never saw a student vector: a history item reads as its trained
    ID row, or (no interactions) as the row ``init_id_rows`` started it at, which a blocked
    item keeps through training; the student only scores, and the read block scores nothing."""
    torch.manual_seed(0)
    content = torch.randn(11, 12)
    train = [[1, 2, 3, 4], [5, 6, 7, 8], [2, 4, 6, 8]]  # items 9 and 10 are cold
    teacher = _teacher(torch.zeros(11, 8))
    init_id_rows(teacher, content, trained_items(train))
    started = teacher.id_emb.weight.detach().clone()
    with torch.no_grad():
        teacher.id_emb.weight[1:9] += torch.randn(8, 8)  # training moves the warm rows only
    counts = interaction_counts(train, 10)
    model = Composite(teacher, content, counts, 0.0, similarity_dims=4, content_started=True).eval()
    model.kappa.fill_(3.0)  # warm rows are gated in scores, never in reads
    with torch.no_grad():
        table = model.item_vectors()
        reads = model._reads(table)
        assert torch.allclose(reads[9:], started[9:], atol=1e-5), "a cold item reads as its start"
        assert torch.allclose(reads[1:9], teacher.id_emb.weight[1:9], atol=1e-5), "a warm one as its row"
        history = torch.tensor([[0, 0, 3, 9]])
        before, scores = model.user_vector(history), model.predict(history)
        model.student[-1].bias.add_(torch.randn(8))  # moves every student vector
        query = model.user_vector(history)
    assert torch.allclose(before, query), "the student does not shape the query"
    assert not torch.allclose(scores[0, 9:], model.predict(history)[0, 9:]), "it scores the cold items"
    assert query[0, -8:].abs().max() == 0, "the read block scores nothing"
    assert table[1:, -8:].abs().max() < 1e-4, "and is small in the index"


def test_the_student_learns_the_teachers_space_and_carries_it_to_cold_items():
    """Content that determines the ID rows (a fixed linear map of them): trained on the
    warm items only, the student places the held-out items near their true rows."""
    torch.manual_seed(0)
    n, h = 80, 8
    true_rows = torch.randn(n + 1, h)
    true_rows[0] = 0
    content = true_rows @ torch.randn(h, 16)  # (N+1, 16): the content encodes the rows
    cold = torch.arange(71, n + 1)
    counts = torch.ones(n + 1)
    counts[0] = 0
    counts[cold] = 0
    taught = true_rows.clone()
    taught[cold] = torch.randn(len(cold), h)  # the teacher never learned the cold rows
    model = Composite(_teacher(taught), content, counts, dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 71, (6,), generator=gen).tolist() for _ in range(60)]

    def cold_cosine() -> float:
        with torch.no_grad():
            got = model.gated_vectors()[cold]
        return torch.nn.functional.cosine_similarity(got, true_rows[cold]).mean().item()

    before = cold_cosine()
    cfg = CompositeSettings(epochs=150, patience=150, lr=1e-2, batch_size=128, gate_kappas=(0.0,))
    warm = torch.arange(1, 71)

    def validate(m: Composite) -> float:  # higher is better: the warm rows' fit
        with torch.no_grad():
            return -(m.student_vectors()[warm] - taught[warm]).pow(2).mean().item()

    model, info = train_student(model, seqs, Judges(validate, None, 1, 0), cfg, CPU, progress=False)
    assert before < 0.5 < 0.9 < cold_cosine(), (
        f"cold items near their true rows ({before:.2f} -> {cold_cosine():.2f})"
    )
    assert info["kappa"] == 0.0 and info["student_epochs"] == 150


def test_the_boost_lifts_exactly_the_items_without_interactions_whatever_the_gate():
    """A soft gate mixes the student into thin warm items, but the boost is for cold items
    alone: spread over thin warm items (``1 - g``, the rule before ``hard_cold``, which older
    files keep), it moved them whenever it lifted cold ones."""
    torch.manual_seed(0)
    rows = torch.randn(11, 8)
    counts = torch.tensor([0, 5, 5, 1, 1, 2, 2, 3, 3, 0, 0.0])  # items 9 and 10 are cold
    model = Composite(_teacher(rows), torch.randn(11, 12), counts, dropout=0.1).eval()
    history = torch.tensor([[0, 3, 4, 9]])
    with torch.no_grad():
        model.kappa.fill_(1.0)  # g = n / (n + 1): items with one click are half the student's
        before = model.predict(history)
        model.boost.fill_(2.0)
        after = model.predict(history)
        one = model.query(model.item_vectors(history[:, 1:]))  # serving: vectors in, query out
        served = one @ model.item_vectors().T  # (1, N+1)
        fresh = model.content_vectors(torch.randn(1, 12))
        model.hard_cold.fill_(0.0)  # a file from before: the boost by 1 - g
        spread = model.predict(history)
    assert model.cfg.hidden == 9 and fresh.shape == (1, 9) and fresh[0, -1] == 2.0, "fully boosted"
    assert torch.allclose(after[0, 9:] - before[0, 9:], torch.tensor([2.0, 2.0]), atol=1e-5)
    assert torch.allclose(after[0, 1:9], before[0, 1:9], atol=1e-5), "warm items, thin ones too, untouched"
    assert torch.allclose(served[0, 1:], after[0, 1:], atol=1e-4), "one inner product"
    g = counts / (counts + 1)
    assert torch.allclose(spread[0, 1:] - before[0, 1:], 2.0 * (1 - g[1:]), atol=1e-5), "older files: 1 - g"


def test_the_similarity_term_lifts_cold_items_like_the_last_item_in_one_inner_product():
    """An item without interactions gains gamma * <m_u, z_i>: most where its content is the
    user's last item's; warm items are untouched (hard switch), and the served path (the
    history's scoring vectors in, one query out) scores exactly as evaluation does."""
    torch.manual_seed(0)
    rows = torch.randn(11, 8)
    counts = torch.tensor([0, 5, 5, 1, 1, 2, 2, 3, 3, 0, 0.0])  # items 9 and 10 are cold
    content = torch.randn(11, 12)
    content[10] = content[4] * 3  # item 10 reads like item 4 (same direction, more of it)
    model = Composite(_teacher(rows), content, counts, dropout=0.0, similarity_dims=6, recency=0.05).eval()
    assert model.cfg.hidden == 8 + 1 + 6 and model.item_vectors().shape == (11, 15)
    history = torch.tensor([[0, 9, 3, 4]])  # a cold item, then warm ones, item 4 last
    with torch.no_grad():
        before = model.predict(history)[0]
        model.similarity.fill_(4.0)
        model.boost.fill_(-1.0)
        after = model.predict(history)[0]
        served = model.query(model.item_vectors(history[:, 1:])) @ model.item_vectors().T  # (1, N+1)
        z = torch.nn.functional.normalize(model._student_input(content)[:, :6], dim=1)
    assert torch.allclose(after[1:9], before[1:9], atol=1e-5), "warm items untouched"
    m = (0.05**2 * z[9] + 0.05 * z[3] + z[4]) / (1 + 0.05 + 0.05**2)  # the history's content, cold item too
    for cold in (9, 10):
        assert torch.allclose(after[cold] - before[cold], 4.0 * m @ z[cold] - 1.0, atol=1e-4)
    assert after[10] - before[10] > after[9] - before[9], "the look-alike of the last item gains most"
    assert torch.allclose(served[0, 1:], after[1:], atol=1e-4), "one inner product, as served"
    model.kappa.fill_(1.0)  # a soft gate: items with one click are half cold
    with torch.no_grad():
        soft = model.predict(history)[0]
        served = model.query(model.item_vectors(history[:, 1:])) @ model.item_vectors().T
    assert torch.allclose(served[0, 1:], soft[1:], atol=1e-4), "soft gate: still one inner product"
    with torch.no_grad():
        model.similarity.fill_(0.0)
        plain = model.predict(history)[0]
    assert torch.allclose(soft[1:9], plain[1:9], atol=1e-5), "soft gate: thin warm items have no term"
    assert not torch.allclose(soft[9:], plain[9:], atol=1e-4), "cold ones do"


@pytest.mark.parametrize("started", [False, True])
def test_fixed_queries_encode_each_history_once_per_gate_or_read_block_and_score_as_without(started):
    """The choice grid (gate x boost x similarity) re-encoded every history at every point;
    inside ``fixed_queries`` only a new gate re-encodes (none, when the encoder reads the
    read block, which holds no gate), and the scores do not change."""
    torch.manual_seed(0)
    counts = torch.tensor([0, 5, 5, 1, 1, 2, 2, 3, 3, 0, 0.0])
    shape = {"similarity_dims": 4, "content_started": started}
    model = Composite(_teacher(torch.randn(11, 8)), torch.randn(11, 12), counts, 0.0, **shape).eval()
    batches = [torch.tensor([[0, 9, 3, 4], [1, 2, 3, 10]]), torch.tensor([[0, 0, 5, 6], [7, 8, 1, 9]])]
    grid = [(k, b, g) for k in (0.0, 3.0) for b in (-1.0, 1.0) for g in (0.0, 8.0)]
    expected = []
    with torch.no_grad():
        for k, b, g in grid:
            model.kappa.fill_(k), model.boost.fill_(b), model.similarity.fill_(g)
            expected.append([model.predict(seqs) for seqs in batches])
        calls = []
        real = model.teacher.encode
        model.teacher.encode = lambda *a: calls.append(1) or real(*a)
        with model.fixed_queries():
            for (k, b, g), want in zip(grid, expected, strict=True):
                model.kappa.fill_(k), model.boost.fill_(b), model.similarity.fill_(g)
                for seqs, scores in zip(batches, want, strict=True):  # same shape, other ids
                    assert torch.allclose(model.predict(seqs), scores, atol=1e-5)
        encodings = 2 if started else 4
        assert len(calls) == encodings, "one encoding per batch (and per gate, without a read block)"
        model.predict(batches[0])
    assert len(calls) == encodings + 1, "outside it, every call encodes"


@pytest.mark.parametrize("started", [False, True])
def test_a_served_history_longer_than_the_encoder_reads_scores_as_its_last_steps(started):
    torch.manual_seed(0)
    counts = torch.tensor([0] + [2.0] * 8 + [0.0, 0.0])
    shape = {"similarity_dims": 4, "content_started": started}
    model = Composite(_teacher(torch.randn(11, 8)), torch.randn(11, 12), counts, 0.0, **shape).eval()
    model.use_content(torch.randn(13, 12))  # items 11 and 12 are newer than the teacher: fresh
    model.similarity.fill_(8.0)
    model.kappa.fill_(3.0)  # warm items gated in scores
    model.recency.fill_(1.0)  # every step counts alike: only the window decides
    long = torch.randint(1, 13, (1, 20), generator=torch.Generator().manual_seed(4))  # max_len is 8
    assert {9, 11, 12} <= set(long[0, -8:].tolist()), "cold and fresh items in the window"
    with torch.no_grad():
        served = model.query(model.item_vectors(long))
        evaluated = model.user_vector(long[:, -8:])
    assert torch.allclose(served, evaluated, atol=1e-5)


def test_a_composite_file_from_before_the_similarity_term_still_loads(tmp_path):
    torch.manual_seed(0)
    model = Composite(_teacher(torch.randn(11, 8)), torch.randn(11, 12), torch.tensor([0] + [2.0] * 10), 0.1)
    path = save_composite(tmp_path / "c.pt", model.eval(), {"v": 1})
    saved = load_torch(path)
    del saved["similarity_dims"], saved["content_started"]  # what an older version wrote
    older = ("similarity", "recency", "start_scale")
    saved["state"] = {k: v for k, v in saved["state"].items() if k not in older}
    save_torch(saved, path)
    content = torch.randn(13, 12)  # today's catalogue: two items newer than the file, cold
    loaded, meta = load_composite(path, content)
    model.use_content(content)
    history = torch.tensor([[1, 2, 12]])
    with torch.no_grad():
        model.boost.fill_(0.5)  # the content now moves scores: cold items are the student's
        loaded.boost.fill_(0.5)
        assert loaded.cfg.hidden == 9 and torch.allclose(loaded.predict(history), model.predict(history))
    assert loaded.item_vectors().shape == (13, 9) and meta == {"v": 1}


def test_a_content_started_composite_file_serves_fresh_items_read_as_their_start(tmp_path):
    torch.manual_seed(0)
    table = torch.randn(12, 12)  # item 11 is newer than the file: fresh
    teacher = _teacher(torch.zeros(11, 8))
    init_id_rows(teacher, table[:11], torch.arange(1, 11))
    model = Composite(teacher, table[:11], torch.tensor([0] + [2.0] * 10), 0.0, 4, content_started=True)
    loaded, _ = load_composite(save_composite(tmp_path / "c.pt", model.eval(), {}), table)
    start = _teacher(torch.zeros(12, 8))
    init_id_rows(start, table, torch.arange(1, 11))  # the same fit, over a table that has item 11
    with torch.no_grad():
        read = loaded._reads(loaded.content_vectors(table[11:]))
        assert loaded.cfg.hidden == 8 + 1 + 4 + 8
    assert torch.allclose(read[0], start.id_emb.weight[11], atol=1e-5), "the row it would have started at"


def test_a_composite_file_from_before_hard_cold_keeps_its_cold_terms_spread_by_the_gate(tmp_path):
    """Its kappa and boost were chosen on validation under the old rule, so it must serve as
    it was judged: the boost by ``1 - g``."""
    torch.manual_seed(0)
    counts = torch.tensor([0, 5, 5, 1, 1, 2, 2, 3, 3, 0, 0.0])
    content = torch.randn(11, 12)
    model = Composite(_teacher(torch.randn(11, 8)), content, counts, 0.0).eval()
    model.kappa.fill_(1.0)
    model.boost.fill_(2.0)
    saved = load_torch(save_composite(tmp_path / "c.pt", model, {}))
    del saved["state"]["hard_cold"]  # what the version before it wrote
    save_torch(saved, tmp_path / "old.pt")
    old, _ = load_composite(tmp_path / "old.pt", content)
    new, _ = load_composite(tmp_path / "c.pt", content)
    history = torch.tensor([[1, 2, 9]])
    with torch.no_grad():
        assert torch.allclose(new.predict(history), model.predict(history)), "a new file: cold items alone"
        model.hard_cold.fill_(0.0)
        assert torch.allclose(old.predict(history), model.predict(history)), "an old file: 1 - g"


def test_warm_items_carry_their_content_small_in_the_one_block_and_two_block_files_serve_as_before(tmp_path):
    """A history reads every step's content from its scoring vector, so warm items carry
    theirs too, at 2^-20 in the block cold items score with: read back as a unit vector,
    worth at most gamma * 2^-20 of a score. A file written before the merge (two blocks,
    the warm one never met by a query, at 2^-10) still loads in its own layout and scores
    as before; the merged layout scores as it does."""
    torch.manual_seed(0)
    counts = torch.tensor([0] + [2.0] * 8 + [0.0, 0.0])  # items 9 and 10 are cold
    content = torch.randn(11, 12)
    model = Composite(_teacher(torch.randn(11, 8)), content, counts, 0.0, similarity_dims=4).eval()
    model.similarity.fill_(32.0)
    model.boost.fill_(-1.0)
    with torch.no_grad():
        table = model.item_vectors()  # (11, 8 + 1 + 4)
        z = model._z(model.content_in)  # (11, 4)
    assert table.shape == (11, 13)
    assert torch.allclose(table[1:9, -4:].norm(dim=1), torch.full((8,), 2.0**-20)), "warm items: z at 2^-20"
    assert torch.allclose(table[9:, -4:], z[9:]), "cold items: z whole"
    two = Composite(_teacher(torch.randn(11, 8)), content, counts, 0.0, similarity_dims=4, z_blocks=2)
    two.load_state_dict(model.state_dict())
    two.warm_z_scale.fill_(2.0**-10)
    saved = load_torch(save_composite(tmp_path / "c.pt", two.eval(), {}))
    del saved["z_blocks"]  # what the version before the merge wrote
    save_torch(saved, tmp_path / "old.pt")
    old, _ = load_composite(tmp_path / "old.pt", content)
    history = torch.tensor([[1, 9, 2]])
    with torch.no_grad():
        assert old.item_vectors().shape == (11, 17)
        assert torch.allclose(old.item_vectors()[1:9, -4:] * 2.0**10, z[1:9]), "its warm block"
        assert torch.allclose(old.predict(history), two.predict(history)), "an old file scores as before"
        merged = model.predict(history)
        assert torch.allclose(merged, two.predict(history), atol=1e-4), "the merge moves no score"
        served = model.query(model.item_vectors(history)) @ model.item_vectors().T
        assert torch.allclose(served[0, 1:], merged[0, 1:], atol=1e-4), "one inner product, as served"
    del saved["state"]["warm_z_scale"]  # and one from before the scale: the full warm block
    save_torch(saved, tmp_path / "older.pt")
    older, _ = load_composite(tmp_path / "older.pt", content)
    with torch.no_grad():
        assert torch.allclose(older.item_vectors()[1:9, -4:].norm(dim=1), torch.ones(8))
        assert torch.allclose(older.predict(history), two.predict(history), atol=1e-5)


def test_the_gate_is_picked_on_validation():
    torch.manual_seed(0)
    rows = torch.randn(11, 8)
    counts = torch.tensor([0] + [2.0] * 10)
    model = Composite(_teacher(rows), torch.randn(11, 12), counts, dropout=0.1)
    picks = {0.0: 0.1, 1.0: 0.3, 3.0: 0.2}

    def validate(m: Composite) -> float:
        return picks[float(m.kappa)]

    cfg = CompositeSettings(epochs=1, gate_kappas=tuple(picks))
    _, info = train_student(model, [[1, 2, 3]], Judges(validate, None, 1, 0), cfg, CPU, progress=False)
    assert info["kappa"] == 1.0 and float(model.kappa) == 1.0 and info["best_val_ndcg@10"] == 0.3


def test_interaction_counts_and_popularity_buckets():
    counts = interaction_counts([[1, 1, 2], [3, 1]], 4)
    assert counts.tolist() == [0, 3, 1, 1, 0]
    ranks = torch.tensor([0, 5, 20, 0])
    buckets = popularity_buckets(
        ranks, torch.tensor([1, 2, 3, 4]), torch.tensor([False, False, False, True]), counts
    )
    assert buckets["head"]["users"] == 1 and buckets["head"]["ndcg@10"] == 1.0
    assert buckets["cold"]["users"] == 1 and buckets["tail"]["users"] + buckets["torso"]["users"] == 2


def test_bootstrap_interval_holds_the_mean_and_narrows_with_users():
    gen = torch.Generator().manual_seed(0)
    small = torch.rand(50, generator=gen)
    large = torch.rand(5000, generator=gen)
    lo_s, hi_s = interval(small)
    lo_l, hi_l = interval(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_compare_pairs_each_variant_with_id_and_text_on_the_same_users():
    runs = [
        {"variant": "id", "per_user_ndcg@10": [1.0, 0.0, 0.5, 0.0]},
        {"variant": "text", "per_user_ndcg@10": [0.0, 1.0, 0.0, 0.5]},
        {"variant": "composite-text", "per_user_ndcg@10": [1.0, 1.0, 0.5, 0.5]},
    ]
    rows = compare(runs, torch.tensor([False, True, False, True]))
    row = {(r["variant"], r["group"]): r for r in rows}
    assert row[("composite-text", "all")]["ndcg@10"] == 0.75
    assert row[("composite-text", "warm")]["vs_id"]["diff"] == 0.0
    assert row[("composite-text", "cold")]["vs_text"]["diff"] == 0.0
    assert row[("composite-text", "cold")]["vs_id"]["ratio"] is None, "id scores 0 on the cold users"
    assert "vs_text-init" not in row[("composite-text", "all")], "no teacher in this run"
    assert "vs text-init" not in format_compare(rows)
    runs.append({"variant": "text-init", "per_user_ndcg@10": [1.0, 0.0, 0.0, 0.0]})
    rows = compare(runs, torch.tensor([False, True, False, True]))
    row = {(r["variant"], r["group"]): r for r in rows}
    assert row[("composite-text", "all")]["vs_text-init"]["ratio"] == 3.0, "the teacher, where trained"
    table = format_compare(rows).splitlines()
    assert table[0].count("ratio, diff") == 3 and table[2].count("|") == table[0].count("|")


def test_a_tie_takes_no_boost_not_the_most_negative():
    """With no cold user every boost scores the same; the choice must then leave fresh
    items unmoved (boost 0), not buried at the grid's most negative boost."""
    torch.manual_seed(0)
    rows = torch.randn(11, 8)
    model = Composite(_teacher(rows), torch.randn(11, 12), torch.tensor([0] + [2.0] * 10), dropout=0.1)
    cfg = CompositeSettings(epochs=1, gate_kappas=(0.0, 3.0), boosts=(-2.0, -1.0, 0.0, 1.0))
    _, info = train_student(model, [[1, 2, 3]], Judges(lambda m: 0.5, None, 1, 0), cfg, CPU, progress=False)
    assert (info["kappa"], info["boost"]) == (0.0, 0.0) and float(model.boost) == 0.0


def test_the_choice_spends_a_little_warm_for_cold_users_never_more():
    """Mixed validation (95% warm) chose the boost that buries cold items; the rule takes the
    best cold figure among choices within the warm tolerance of the best warm one."""
    figures = {
        (10.0, -2.0, 0.0): (0.0940, 0.002),  # best warm: every cold item buried
        (10.0, 0.0, 0.0): (0.0935, 0.030),  # 0.5% less warm, cold served: chosen at 1%
        (0.0, 1.0, 0.0): (0.0900, 0.060),  # best cold, 4% less warm: too costly
    }
    assert choose(figures, 0.01, 0.0) == (10.0, 0.0, 0.0)
    assert choose(figures, 0.0, 0.0) == (10.0, -2.0, 0.0), "no tolerance: the best warm figure"
    assert choose(figures, 0.05, 0.0) == (0.0, 1.0, 0.0)
    ties = {(0.0, -1.0, 0.0): (0.1, 0.0), (0.0, 0.0, 8.0): (0.1, 0.0), (0.0, 0.0, 0.0): (0.1, 0.0)}
    assert choose(ties, 0.01, 0.0) == (0.0, 0.0, 0.0), "ties: no boost, no similarity"


def test_the_choice_may_spend_the_composites_gain_over_the_teacher():
    """The allowance is measured from the ID teacher's warm figure (the target's), or from
    the best choice's where that is lower: never a bar no choice clears."""
    figures = {
        (10.0, 0.0, 0.0): (0.0940, 0.013),  # the composite's best warm, above the teacher's
        (10.0, -4.0, 16.0): (0.0890, 0.066),  # 5% below it, 1% below the teacher's 0.0899
        (0.0, -2.0, 32.0): (0.0800, 0.150),  # far below both
    }
    assert choose(figures, 0.02, 0.0) == (10.0, 0.0, 0.0), "no reference: 2% of the composite's best"
    assert choose(figures, 0.02, 0.0, reference=0.0899) == (10.0, -4.0, 16.0)
    assert choose(figures, 0.02, 0.0, reference=0.2) == (10.0, 0.0, 0.0), "a higher reference: the best"


def test_the_choice_gives_up_a_little_of_the_cold_best_for_all_users_never_more():
    """Of the choices warm users allow, the best mixed figure among those within the cold
    tolerance of the best cold one: not the cold best at any price, nor the mixed best
    that buries cold items."""
    figures = {
        (3.0, 1.0, 8.0): (0.0505, 0.0516),  # the cold best, warm at the teacher's level
        (3.0, 2.0, 4.0): (0.0534, 0.0434),  # 16% less cold, more warm: the mixed best within 25%
        (10.0, -3.0, 8.0): (0.0610, 0.0161),  # the mixed best: 69% less cold
    }
    mixed = Judges(lambda m: 0.0, None, 19, 1).mixed  # 5% cold-target users
    assert choose(figures, 0.02, 0.25, 0.0502, mixed) == (3.0, 2.0, 4.0)
    assert choose(figures, 0.02, 0.0, 0.0502, mixed) == (3.0, 1.0, 8.0), "no cold tolerance: the cold best"
    assert choose(figures, 0.02, 1.0, 0.0502, mixed) == (10.0, -3.0, 8.0), "all of it: the mixed best"
    assert choose(figures, 0.02, 0.25, 0.0502) == (3.0, 1.0, 8.0), "no cold judge: ties, nearest boost"
    unserved = {(10.0, -3.0, 0.0): (0.0501, 0.0), (10.0, 0.0, 0.0): (0.0500, 0.0)}  # tail3k, stop 37
    assert choose(unserved, 0.02, 0.25, 0.0502, mixed) == (10.0, 0.0, 0.0), "no cold user served: ties"


def test_the_student_stops_on_cold_users_and_reports_the_mixed_figure():
    torch.manual_seed(0)
    model = Composite(_teacher(torch.randn(11, 8)), torch.randn(11, 12), torch.tensor([0] + [2.0] * 10), 0.1)
    calls = {"warm": 0, "cold": 0}

    def judge(group: str, value: float, per_boost: float):
        def validate(m: Composite | SASRec) -> float:
            calls[group] += 1
            return value + per_boost * float(getattr(m, "boost", 0.0))  # the teacher has none

        return validate

    judged = Judges(judge("warm", 0.1, -0.01), judge("cold", 0.02, 0.01), 3, 1)
    cfg = CompositeSettings(epochs=3, patience=10, gate_kappas=(0.0,), boosts=(0.0, 1.0))
    _, info = train_student(model, [[1, 2, 3]], judged, cfg, CPU, False)
    assert calls == {"warm": 1 + 2, "cold": 3 + 1 + 2}, (
        "3 epochs stopped on cold users, then the kept student; the teacher's warm figure; "
        "each choice judged on both"
    )
    assert info["boost"] == 0.0, "boost 1 costs 10% of the warm figure"
    assert abs(info["best_val_ndcg@10"] - (3 * 0.1 + 0.02) / 4) < 1e-9


# beauty-2k split 2's composite-said student, cold-validation MRR by epoch (stop 47): a spike
# at epoch 1, then a slow climb with +-0.001 jitter
SPLIT2_CURVE = [0.0116, 0.0090, 0.0103, 0.0102, 0.0114, 0.0115, 0.0109, 0.0110, 0.0119, 0.0115]
SPLIT2_CURVE += [0.0118, 0.0110, 0.0119, 0.0121, 0.0129, 0.0122, 0.0132, 0.0126, 0.0132, 0.0126]


def _run(stop: WindowStop, curve: list[float]) -> int | None:
    """Feed ``curve`` with epoch e's weights all e; returns the epoch it stopped at (None:
    it never asked to)."""
    for epoch, figure in enumerate(curve, 1):
        if stop.update(figure, {"w": torch.full((2,), float(epoch))}):
            return epoch
    return None


def test_a_window_of_epochs_outlasts_an_early_spike_that_stops_the_single_best_epoch():
    single = WindowStop(window=1, patience=6)
    assert _run(single, SPLIT2_CURVE) == 7, "the plain rule stops on epoch 1's spike"
    assert single.kept() == [1, 1] and single.best_state["w"].tolist() == [1.0, 1.0]

    window = WindowStop(window=5, patience=6)
    assert _run(window, SPLIT2_CURVE) is None, "the window's mean keeps climbing"
    assert window.kept() == [15, 19]
    assert window.best_state["w"].tolist() == [17.0, 17.0], "the mean of epochs 15-19's weights"
    assert abs(window.best - sum(SPLIT2_CURVE[14:19]) / 5) < 1e-12


def test_no_window_is_judged_before_it_is_full():
    stop = WindowStop(window=3, patience=1)
    assert not stop.update(0.9, {"w": torch.zeros(1)}) and not stop.update(0.0, {"w": torch.zeros(1)})
    assert stop.best_state is None and stop.kept() == [0, 0]
    assert not stop.update(0.0, {"w": torch.ones(1)}), "the first full window is the best so far"
    assert stop.update(0.0, {"w": torch.ones(1)}), "a worse mean after patience 1 stops"
    assert stop.kept() == [1, 3]


def _scripted_student(curve: list[float], **cfg) -> tuple[dict, list[dict], torch.nn.Module]:
    """train_student with a stopping judge that returns ``curve`` epoch by epoch (then 0) and
    records the student's weights each time it is asked; returns (info, weights, student)."""
    torch.manual_seed(0)
    model = Composite(_teacher(torch.randn(11, 8)), torch.randn(11, 12), torch.tensor([0] + [2.0] * 10), 0.1)
    seen: list[dict] = []

    def stop(m: Composite) -> float:
        seen.append({k: v.clone() for k, v in m.student.state_dict().items()})
        return curve[len(seen) - 1] if len(seen) <= len(curve) else 0.0

    judged = Judges(lambda m: 0.1, None, 1, 0, stop=stop)
    settings = CompositeSettings(gate_kappas=(0.0,), boosts=(0.0,), similarities=(0.0,), lr=1e-2, **cfg)
    _, info = train_student(model, [[1, 2, 3], [4, 5, 6, 7]], judged, settings, CPU, False)
    return info, seen, model.student


def test_the_student_keeps_the_mean_weights_of_its_best_window_of_epochs():
    curve = [0.9, 0.1, 0.1, 0.5, 0.6, 0.7, 0.1, 0.1, 0.9, 0.9]  # windows of 3: best 4-6, then 2 worse
    info, seen, student = _scripted_student(curve, epochs=10, window=3, patience=2)
    assert info["student_epochs"] == 8 and info["student_kept_epochs"] == [4, 6]
    for name, value in student.state_dict().items():
        mean = torch.stack([seen[e - 1][name] for e in (4, 5, 6)]).mean(0)
        assert torch.allclose(value, mean), f"{name}: not the mean of epochs 4-6"
        assert not torch.allclose(value, seen[5][name]), f"{name}: epoch 6's own weights"
    assert torch.equal(seen[8]["0.weight"], student.state_dict()["0.weight"]), "the kept one is judged"


def test_a_student_with_fewer_epochs_than_its_window_keeps_them_all():
    info, seen, student = _scripted_student([0.3, 0.2], epochs=2, window=5, patience=1)
    assert info["student_epochs"] == 2 and info["student_kept_epochs"] == [1, 2]
    mean = torch.stack([seen[e]["3.weight"] for e in (0, 1)]).mean(0)
    assert torch.allclose(student.state_dict()["3.weight"], mean)


def test_the_supervised_term_teaches_the_student_what_users_chose_next():
    """With distillation off, the student still learns from the next items of the training
    histories: under the teacher's query after item a, item a + 10 comes out on top."""
    torch.manual_seed(0)
    rows = torch.randn(21, 8)
    counts = torch.tensor([0] + [3.0] * 20)
    counts[5] = 0  # a cold item mid-catalogue: the warm columns skip it
    model = Composite(_teacher(rows), torch.randn(21, 16), counts, dropout=0.0)
    seqs = [[a, a + 10] for a in (1, 2, 3, 4, 6, 7, 8, 9, 10)] * 3
    states, nexts = teacher_states(model, seqs)
    warm = (counts > 0).nonzero().squeeze(1)  # (19,) item ids

    def hits() -> int:
        with torch.no_grad():
            scores = states @ model.student_vectors()[warm].T  # (M, 19)
        return int((warm[scores.argmax(1)] == nexts).sum())

    before = hits()
    cfg = CompositeSettings(epochs=200, patience=200, lr=1e-2, align_weight=0.0, rank_weight=0.0)
    calls = iter(range(10_000))  # each validation better than the last: the last window is kept
    train_student(model, seqs, Judges(lambda m: next(calls), None, 1, 0), cfg, CPU, progress=False)
    assert before <= 6 and hits() == len(seqs), f"{before} -> {hits()} of {len(seqs)} next items on top"


def test_with_no_cold_judge_the_choice_leaves_fresh_items_unmoved():
    """Warm users also rank the items nobody clicked yet, so on them a negative boost wins
    by a hair; with no cold judge that must not bury every fresh item served later."""
    figures = {
        (10.0, -2.0, 0.0): (0.0980, 0.0),
        (10.0, 0.0, 0.0): (0.0975, 0.0),
        (0.0, 0.0, 0.0): (0.0970, 0.0),
    }
    assert choose(figures, 0.02, 0.0) == (10.0, 0.0, 0.0)
    assert choose(figures | {(10.0, 0.0, 0.0): (0.09, 0.0)}, 0.02, 0.0) == (0.0, 0.0, 0.0)
    beyond = {(10.0, -2.0, 0.0): (0.098, 0.0), (10.0, 0.0, 0.0): (0.090, 0.0)}
    assert choose(beyond, 0.02, 0.0) == (10.0, -2.0, 0.0), "beyond it"


def test_with_no_cold_signal_the_choice_calibrates_fresh_items_exposure_within_the_warm_guard():
    """No cold user to judge by: of the choices warm users allow, the one whose share of
    items without interactions in warm users' top 10 is nearest their catalogue share (8%
    here), not the one that buries them nor the one that floods."""
    figures = {
        (0.0, -4.0, 0.0): (0.1000, 0.0),  # buried: the warm best, by a hair
        (0.0, -2.0, 0.0): (0.0990, 0.0),  # flooding
        (0.0, -4.0, 8.0): (0.0985, 0.0),  # near the catalogue's share, where users' content matches
        (0.0, 0.0, 0.0): (0.0900, 0.0),  # on the share, but 10% below the warm best
    }
    table = {(0.0, -4.0, 0.0): 0.0, (0.0, -2.0, 0.0): 0.30, (0.0, -4.0, 8.0): 0.07, (0.0, 0.0, 0.0): 0.08}
    asked: list[list] = []

    def exposure(choices: list) -> dict:
        asked.append(choices)
        return {c: table[c] for c in choices}

    assert choose(figures, 0.02, 0.5, exposure=exposure, share=0.08) == (0.0, -4.0, 8.0)
    assert sorted(asked[0]) == sorted(c for c in figures if c != (0.0, 0.0, 0.0)), "measured where it decides"
    assert choose(figures, 0.2, 0.5, exposure=exposure, share=0.08) == (0.0, 0.0, 0.0), "a wider guard"
    assert choose(figures, 0.02, 0.5) == (0.0, -2.0, 0.0), "no exposure measured: the boost nearest 0"
    mixed = Judges(lambda m: 0.0, None, 19, 1).mixed
    unlifted = {c: (w, 0.0) for c, (w, _) in figures.items()}  # a cold judge no choice lifts
    assert choose(unlifted, 0.02, 0.5, None, mixed, exposure, 0.08) == (0.0, -4.0, 8.0)
    lifted = figures | {(0.0, -2.0, 0.0): (0.0990, 0.05)}  # a cold signal: the mixed figure rules
    asked.clear()
    assert choose(lifted, 0.02, 0.5, None, mixed, exposure, 0.08) == (0.0, -2.0, 0.0)
    assert not asked, "a cold signal: no exposure measured"


def test_with_no_cold_users_the_pick_measures_each_choices_exposure_on_warm_users():
    """End to end on a small composite with no cold validation user: the pick reports the
    chosen choice's share of cold items in the warm users' top 10, measured as a user meets
    it, and no other choice's share is nearer the catalogue's."""
    torch.manual_seed(0)
    n = 30
    counts = torch.tensor([0] + [3.0] * 25 + [0.0] * 5)  # items 26-30 have no interactions
    model = Composite(_teacher(torch.randn(n + 1, 8)), torch.randn(n + 1, 12), counts, 0.0, similarity_dims=4)
    gen = torch.Generator().manual_seed(1)
    histories = [torch.randint(1, 26, (5,), generator=gen).tolist() for _ in range(40)]
    targets = torch.randint(1, 26, (40,), generator=gen).tolist()
    judged = judges_for((histories, targets), ([], []), CPU)
    cfg = CompositeSettings(gate_kappas=(0.0,), boosts=(-8.0, -4.0, -2.0, 0.0, 2.0), warm_tolerance=0.5)
    info = pick_gate_and_boost(model, model, model.boost, judged, cfg, (0.0, 4.0))

    def share_of(boost: float, similarity: float) -> float:
        model.boost.fill_(boost)
        model.similarity.fill_(similarity)
        with torch.no_grad():
            tops = model.eval().predict(left_pad(histories, 8)).topk(10, dim=1).indices
        return (tops > 25).float().mean().item()

    chosen = info["val_cold_share_top10"]
    assert abs(chosen - share_of(info["boost"], info["similarity"])) < 1e-6
    kept = [
        (b, g)
        for b in cfg.boosts
        for g in (0.0, 4.0)
        if info["val_by_choice"][f"kappa=0.0,boost={b},similarity={g}"]["warm"]
        >= 0.5 * max(v["warm"] for v in info["val_by_choice"].values())
    ]
    gaps = sorted(abs(share_of(b, g) - 5 / 30) for b, g in kept)
    assert abs(chosen - 5 / 30) == gaps[0] and gaps[0] < gaps[-1], "the nearest of several"
    assert all("exposure" in info["val_by_choice"][f"kappa=0.0,boost={b},similarity={g}"] for b, g in kept)
    unlifted = Judges(judged.warm, lambda m: 0.0, 40, 5, warm_tops=judged.warm_tops)  # none lifted
    again = pick_gate_and_boost(model, model, model.boost, unlifted, cfg, (0.0, 4.0))
    assert again["val_cold_share_top10"] == chosen, "a cold judge no choice lifts: calibrated alike"


def test_with_no_cold_judge_the_student_still_tries_the_similarity_term():
    """Without cold validation users the exposure decides, and the similarity term is what
    exposes a fresh item where it resembles the history: it must be among the choices."""
    torch.manual_seed(0)
    counts = torch.tensor([0] + [3.0] * 25 + [0.0] * 5)
    model = Composite(_teacher(torch.randn(31, 8)), torch.randn(31, 12), counts, 0.0, similarity_dims=4)
    gen = torch.Generator().manual_seed(1)
    histories = [torch.randint(1, 26, (5,), generator=gen).tolist() for _ in range(20)]
    judged = judges_for((histories, [h[-1] for h in histories]), ([], []), CPU)
    cfg = CompositeSettings(epochs=1, gate_kappas=(0.0,), boosts=(0.0,), similarities=(0.0, 4.0))
    _, info = train_student(model, histories, judged, cfg, CPU, progress=False)
    tried = {f"kappa=0.0,boost=0.0,similarity={g}" for g in (0.0, 4.0)}
    assert set(info["val_by_choice"]) == tried
    assert info["val_cold_share_top10"] is not None


def test_judges_stop_on_the_cold_users_mrr_and_ignore_too_few_of_them():
    torch.manual_seed(0)
    model = Composite(_teacher(torch.randn(11, 8)), torch.randn(11, 12), torch.tensor([0] + [2.0] * 10), 0.1)
    warm, cold = by_target(([[1, 2], [2, 3], [3, 4]], [3, 9, 5]), cold={9})
    assert warm == ([[1, 2], [3, 4]], [3, 5]) and cold == ([[2, 3]], [9])
    judged = judges_for(warm, cold, CPU)
    rank = int(
        (model.eval().predict(torch.tensor([[2, 3]]))[0] > model.predict(torch.tensor([[2, 3]]))[0, 9]).sum()
    )
    assert judged.cold is not None and abs(judged.stopping()(model) - 1 / (rank + 1)) < 1e-6, "MRR"
    few = judges_for(warm, cold, CPU, min_cold=2)
    text = SASRec(SASRecConfig(n_items=10, hidden=8, max_len=8, dropout=0.0), torch.randn(11, 12)).eval()
    both = by_target_validation(text, judged)  # a plain variant's figures, split as a composite's
    assert both == {"val_warm_ndcg@10": judged.warm(text), "val_cold_ndcg@10": judged.cold(text)}
    assert by_target_validation(text, few)["val_cold_ndcg@10"] == 0.0, "no cold judge: no cold figure"
    assert few.cold is None and few.stopping() is few.warm and few.n_cold == 0


def test_mrr_counts_every_rank():
    assert abs(recall_ndcg(torch.tensor([0, 1, 3]))["mrr"] - (1 + 1 / 2 + 1 / 4) / 3) < 1e-6


def test_the_blend_scores_warm_items_by_id_and_cold_ones_by_the_text_scorer():
    torch.manual_seed(0)
    rows = torch.randn(11, 8)
    counts = torch.tensor([0, 5, 5, 1, 1, 2, 2, 3, 3, 0, 0.0])  # items 9 and 10 are cold
    composite = Composite(_teacher(rows), torch.randn(11, 12), counts, dropout=0.0).eval()
    text = SASRec(SASRecConfig(n_items=10, hidden=8, max_len=8, dropout=0.0), torch.randn(11, 12)).eval()
    blend = Blend(composite, text).eval()
    seqs = torch.tensor([[0, 3, 4, 9]])
    with torch.no_grad():
        blend.boost.fill_(0.5)
        got = blend.predict(seqs)[0]
        by_id = log_probs(_id_scores(composite, seqs), counts > 0)[0]
        by_text = log_probs(text.predict(seqs))[0]
    assert got[0] == float("-inf"), "padding never ranks"
    assert torch.allclose(got[9:], by_text[9:] + 0.5, atol=1e-5), "cold: the text scorer, boosted"
    assert torch.allclose(got[1:9], by_id[1:9], atol=1e-5), "warm (hard switch): the ID side"
    composite.kappa.fill_(1.0)  # items with 1 click: half each
    with torch.no_grad():
        half = blend.predict(seqs)[0]
        by_id = log_probs(_id_scores(composite, seqs), counts > 0)[0]
        by_text = log_probs(text.predict(seqs))[0]
    assert torch.allclose(half[3], 0.5 * by_id[3] + 0.5 * (by_text[3] + 0.5), atol=1e-5)
    for kappa in (0.0, 1.0):  # a blocked item never ranks, warm or cold, and nothing is NaN
        composite.kappa.fill_(kappa)
        with torch.no_grad():
            blocked = blend.predict(seqs, torch.tensor([2, 9]))[0]
        assert blocked[[0, 2, 9]].eq(float("-inf")).all() and not blocked.isnan().any()


def _id_scores(composite: Composite, seqs: torch.Tensor) -> torch.Tensor:
    """(B, N+1) the ID side's raw scores: the composite's query against the teacher's rows."""
    return composite.user_vector(seqs)[:, : composite.teacher.cfg.hidden] @ composite.teacher.item_vectors().T


def test_each_scorer_is_put_on_log_probabilities_over_its_own_items():
    scores = torch.tensor([[float("-inf"), 1.0, 2.0, 30.0], [float("-inf"), 0.0, 0.0, 4.0]])
    trained = torch.tensor([False, True, True, False])  # the ID side's items: 1 and 2
    warm = log_probs(scores, trained)
    assert torch.allclose(warm[:, 1:3].exp().sum(1), torch.ones(2)), "a distribution over 1 and 2"
    assert warm[:, [0, 3]].eq(0).all(), "0 outside them (their gate weight is 0)"
    assert abs(float(warm[0, 2] - warm[0, 1]) - 1.0) < 1e-6, "the scorer's own order and gaps are kept"
    every = log_probs(scores)
    assert every[:, 0].eq(float("-inf")).all(), "masked stays masked"
    assert torch.allclose(every[:, 1:].exp().sum(1), torch.ones(2)), "over every finite item"


def test_a_composite_says_which_content_it_maps_and_one_of_unknown_content_is_refused(tmp_path):
    """A replica maps an item's rows of the content the student was trained on; a file
    without the key is from before the setting (SAID), and one of a content this code does
    not know is refused with its reason, not served on the wrong rows."""
    torch.manual_seed(0)
    model = Composite(_teacher(torch.randn(11, 8)), torch.randn(11, 12), torch.tensor([0] + [2.0] * 10), 0.1)
    for meta, content in (({}, "said"), ({"content": "text"}, "text")):
        path = save_composite(tmp_path / f"{content}.pt", model.eval(), meta)
        assert load_scorer(path, "v1")[0].content == content
    path = save_composite(tmp_path / "odd.pt", model.eval(), {"content": "images"})
    with pytest.raises(ValueError, match="unknown content 'images'"):
        load_scorer(path, "v1")
