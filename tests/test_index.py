"""FAISS item index: upsert semantics, exact search, atomic checksummed snapshots."""

from __future__ import annotations

import numpy as np
import pytest

from core.settings import IndexSettings
from scorer.index import CorruptSnapshot, ItemIndex, latest_snapshot

HNSW_MIN_ITEMS = IndexSettings().hnsw_min_items  # the default: exact search at these sizes


def _vecs(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_upsert_adds_then_replaces_in_place():
    idx = ItemIndex(8, IndexSettings())
    v = _vecs(100)
    idx.upsert(np.arange(1, 101), v)
    assert len(idx) == 100
    scores, ids = idx.search(v[41], 1)
    assert ids[0, 0] == 42 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    idx.upsert(np.array([42]), -v[41:42])  # replace: same count, new vector
    assert len(idx) == 100
    _, ids = idx.search(v[41], 100)
    assert ids[0, -1] == 42, "the replaced vector now scores lowest"
    np.testing.assert_allclose(idx.vector(42), -v[41], atol=1e-6)


def test_exact_search_matches_brute_force():
    v = _vecs(500, seed=1)
    idx = ItemIndex(8, IndexSettings())
    idx.upsert(np.arange(1, 501), v)
    q = _vecs(5, seed=2)
    _, ids = idx.search(q, 10)
    brute = np.argsort(-(q @ v.T), axis=1)[:, :10] + 1
    np.testing.assert_array_equal(ids, brute)


def test_bad_shapes_and_duplicate_ids_are_rejected():
    idx = ItemIndex(8, IndexSettings())
    with pytest.raises(ValueError, match="vectors must be"):
        idx.upsert(np.arange(3), _vecs(2))
    with pytest.raises(ValueError, match="duplicate"):
        idx.upsert(np.array([1, 1]), _vecs(2))


def test_snapshot_roundtrip_and_corruption_detected(tmp_path):
    idx = ItemIndex(8, IndexSettings())
    idx.upsert(np.arange(1, 51), _vecs(50))
    path = idx.save(tmp_path, "v1")
    assert latest_snapshot(tmp_path) == path
    loaded = ItemIndex.load(path, IndexSettings())
    assert len(loaded) == 50
    np.testing.assert_array_equal(loaded.search(_vecs(1), 5)[1], idx.search(_vecs(1), 5)[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot, match="checksum"):
        ItemIndex.load(path, IndexSettings())
    path.write_bytes(bytes(data[:20]))  # cut inside the header
    with pytest.raises(CorruptSnapshot, match="no checksum header"):
        ItemIndex.load(path, IndexSettings())
    path.unlink()
    with pytest.raises(CorruptSnapshot, match="missing"):
        ItemIndex.load(path, IndexSettings())


@pytest.mark.parametrize("hnsw_min_items", [10_000, 100], ids=["exact", "hnsw"])
def test_two_tiers_mask_replaced_vectors_and_survive_snapshots(tmp_path, hnsw_min_items):
    v = _vecs(400, seed=3)
    idx = ItemIndex(8, IndexSettings(hnsw_min_items=hnsw_min_items))
    idx.build(np.arange(1, 401), v)
    assert idx.approximate == (hnsw_min_items == 100)
    idx.upsert(np.array([7, 401]), np.stack([-v[6], v[6]]))  # replace 7, add 401 = old 7
    assert len(idx) == 401
    scores, ids = idx.search(v[6], 3)
    assert ids[0, 0] == 401 and 7 not in ids[0], "the old vector of item 7 is masked"
    assert 401 not in idx.search(v[6], 3, exclude={401})[1][0]
    np.testing.assert_allclose(idx.vector(7), -v[6], atol=1e-6)
    again = ItemIndex.load(idx.save(tmp_path, "t"), idx.cfg)
    assert len(again) == 401 and again.search(v[6], 1)[1][0, 0] == 401
    again = again.compacted()
    assert again.delta.ntotal == 0 and len(again) == 401
    assert again.search(v[6], 1)[1][0, 0] == 401 and again.search(-v[6], 1)[1][0, 0] == 7


@pytest.mark.parametrize("hnsw_min_items", [10_000, 100], ids=["exact", "hnsw"])
def test_removed_items_leave_every_tier_and_stay_out_after_a_snapshot(tmp_path, hnsw_min_items):
    """An item whose text changed is removed: never found, no vector, not counted, also
    after a snapshot round trip and a compaction; an upsert brings it back."""
    v = _vecs(400, seed=5)
    idx = ItemIndex(8, IndexSettings(hnsw_min_items=hnsw_min_items))
    idx.build(np.arange(1, 401), v)  # main tier (HNSW bands when approximate)
    idx.upsert(np.array([9]), -v[8:9])  # 9 in the delta tier, masking main
    idx.remove(np.array([7, 9, 12345]))  # from main, from delta, and one never indexed
    again = ItemIndex.load(idx.save(tmp_path, "r"), idx.cfg)
    for index in (idx, again, idx.compacted()):
        assert len(index) == 398 and not {7, 9} & set(index.ids().tolist())
        _, ids = index.search(np.stack([v[6], v[8], -v[8]]), 10)
        assert not {7, 9} & set(ids.ravel().tolist())
        with pytest.raises(RuntimeError):
            index.vector(7)
    idx.upsert(np.array([7]), v[6:7])
    assert len(idx) == 399 and idx.search(v[6], 1)[1][0, 0] == 7


def test_hnsw_recall_against_exact_with_uneven_norms():
    """Scorer vectors' norms vary widely; the augmented-L2 HNSW tier must still find the top
    inner products (an inner-product HNSW graph loses recall on such data)."""
    rng = np.random.default_rng(4)
    v = _vecs(3000, dim=16, seed=4) * rng.lognormal(0, 1.0, (3000, 1)).astype(np.float32)
    q = _vecs(50, dim=16, seed=5) * 3
    approx, exact = ItemIndex(16, IndexSettings(hnsw_min_items=1)), ItemIndex(16, IndexSettings())
    approx.build(np.arange(1, 3001), v)
    exact.build(np.arange(1, 3001), v)
    sa, a = approx.search(q, 10)
    se, e = exact.search(q, 10)
    recall = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, e, strict=True)])
    assert approx.approximate and recall > 0.95
    np.testing.assert_allclose(sa[:, 0], se[:, 0], rtol=1e-3), "scores are true inner products"
    np.testing.assert_allclose(approx.vector(7), v[6], atol=1e-5)


def _near_ties():
    """4,000 Gaussian 32-d vectors, whose top 10 are near-ties, and a function giving an
    index of them its recall@10 against exact search on 100 queries."""
    v, q = _vecs(4000, dim=32, seed=8), _vecs(100, dim=32, seed=9)
    exact = ItemIndex(32, IndexSettings())
    exact.build(np.arange(1, 4001), v)
    _, e = exact.search(q, 10)

    def recall(index: ItemIndex) -> float:
        _, a = index.search(q, 10)
        return float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(a, e, strict=True)]))

    return v, recall


def test_ef_search_trades_recall_and_travels_with_snapshots_and_compaction(tmp_path):
    """``SAID_HNSW_EF_SEARCH`` is each HNSW search's candidate list: a short one misses
    neighbours a long one finds, on data whose top 10 are near-ties (Gaussian, 32-d); a
    loaded or compacted index searches with the value it was given."""
    v, recall = _near_ties()
    short = ItemIndex(32, IndexSettings(hnsw_min_items=1, hnsw_ef_search=10))
    long = ItemIndex(32, IndexSettings(hnsw_min_items=1, hnsw_ef_search=400))
    for index in (short, long):
        index.build(np.arange(1, 4001), v)
    assert recall(short) < 0.9
    assert recall(long) > 0.99
    loaded = ItemIndex.load(short.save(tmp_path, "ef"), long.cfg)
    assert loaded.cfg.hnsw_ef_search == 400 and recall(loaded) > 0.99
    assert long.compacted().cfg.hnsw_ef_search == 400


def test_ef_construction_builds_a_graph_that_finds_more_at_the_same_ef_search():
    """``SAID_HNSW_EF_CONSTRUCTION`` reaches the build: on near-tie data (Gaussian, 32-d) a
    graph built with a long candidate list finds more of the exact top 10 at one efSearch,
    and a compaction builds with the same setting."""
    v, recall = _near_ties()
    rough = ItemIndex(32, IndexSettings(hnsw_min_items=1, hnsw_ef_search=16, hnsw_ef_construction=4))
    fine = ItemIndex(32, IndexSettings(hnsw_min_items=1, hnsw_ef_search=16, hnsw_ef_construction=200))
    for index in (rough, fine):
        index.build(np.arange(1, 4001), v)
    assert recall(fine) > recall(rough) + 0.1
    assert recall(rough.compacted()) < recall(fine) - 0.1


def test_band_pruning_returns_what_searching_every_band_returns(tmp_path, monkeypatch):
    """A band is skipped only when none of its items can enter a top k (Cauchy-Schwarz):
    the pruned search equals the full one, across norms spanning 2^17, replaced, new and
    removed items, excluded ids, batches and k larger than a band; and it does prune."""
    import scorer.index as ix

    rng = np.random.default_rng(7)
    n, dim = 4000, 4  # few dimensions: the bound is nearly tight, so pruning is tested hard
    v = _vecs(n, dim, seed=7) * np.exp2(rng.uniform(-15, 2, (n, 1))).astype(np.float32)
    idx = ItemIndex(dim, IndexSettings(hnsw_min_items=1))
    idx.build(np.arange(1, n + 1), v)
    assert len(idx.mains) >= 12
    idx.upsert(np.array([3, n + 1]), np.stack([v[2] * 8, v[10]]))  # one replaced, one new
    idx.remove(np.array([5, 6]))
    queries = np.concatenate([_vecs(64, dim, seed=8) * 5, _vecs(4, dim, seed=9) * 1e-3])
    searched = []
    real = ItemIndex._search_tier

    def counted(self, tier, *args):
        searched.append(tier)
        return real(self, tier, *args)

    monkeypatch.setattr(ItemIndex, "_search_tier", counted)
    for index in (idx, ItemIndex.load(idx.save(tmp_path, "p"), IndexSettings(hnsw_min_items=1))):
        for k in (1, 10, 300):  # 300: more than some bands hold (-inf padding)
            for rows in (queries, *queries[:8]):
                for exclude in (None, {3, 7, n + 1}):
                    scores, ids = index.search(rows, k, exclude)
                    with monkeypatch.context() as m:
                        m.setattr(ix, "_beaten", lambda *a: False)
                        all_scores, all_ids = index.search(rows, k, exclude)
                    np.testing.assert_array_equal(ids, all_ids)
                    np.testing.assert_allclose(scores, all_scores, rtol=1e-5)
        searched.clear()
        index.search(queries[0], 1)
        assert len(searched) < len(index.mains) + 1, "a large query's top 1 needs few bands"


@pytest.mark.parametrize("hnsw_min_items", [10_000, 100], ids=["exact", "hnsw"])
def test_silent_columns_are_kept_beside_the_search_and_survive_every_change(tmp_path, hnsw_min_items):
    """The composite's history-read block: stored and read back whole, searched by no tier,
    through upserts, removals, a snapshot round trip and a compaction; rankings are those of
    the searched columns alone."""
    v = _vecs(400, dim=8, seed=7)
    silent = np.random.default_rng(8).standard_normal((400, 4)).astype(np.float32)
    whole = np.hstack([v, silent])  # (400, 12): the last 4 no query meets
    idx = ItemIndex(12, IndexSettings(hnsw_min_items=hnsw_min_items), silent=4)
    idx.build(np.arange(1, 401), whole)
    assert all(t.d in (8, 9) for t in (idx.delta, *idx.mains)), "no tier holds the silent columns"
    plain = ItemIndex(8, IndexSettings(hnsw_min_items=hnsw_min_items))
    plain.build(np.arange(1, 401), v)
    queries = np.hstack([v[:5], np.zeros((5, 4), dtype=np.float32)])
    assert np.array_equal(idx.search(queries, 10)[1], plain.search(v[:5], 10)[1])
    idx.upsert(np.array([7, 401]), np.stack([-whole[6], whole[6] * 2]))
    idx.remove(np.array([9]))
    for index in (idx, ItemIndex.load(idx.save(tmp_path, "s"), idx.cfg), idx.compacted()):
        assert index.dim == 12 and index.searched == 8 and len(index) == 400
        np.testing.assert_allclose(index.vector(7), -whole[6], atol=1e-6)
        np.testing.assert_allclose(index.vector(401), whole[6] * 2, atol=1e-6)
        np.testing.assert_allclose(index.vector(100), whole[99], atol=1e-6)
        ids, vectors = index.items()
        np.testing.assert_allclose(vectors[ids == 100][0], whole[99], atol=1e-6)
        assert index.lookup(9) is None
        q = np.hstack([-v[6:7], np.zeros((1, 4), dtype=np.float32)])
        assert index.search(q, 1)[1][0, 0] == 7 and index.search(q, 1, exclude={7})[1][0, 0] != 7
    with pytest.raises(ValueError):
        ItemIndex(8, IndexSettings(), silent=8)
    with pytest.raises(ValueError):
        idx.upsert(np.array([-2]), whole[:1])  # would write another item's silent row


def test_an_index_written_searching_every_column_is_relaid_with_its_silent_ones_beside(tmp_path):
    """A snapshot from before its scorer kept the read block beside the tiers: loaded, it
    is rebuilt in the scorer's layout, with the same vectors, rankings and removals."""
    v = np.hstack([_vecs(300, seed=9), np.full((300, 4), 1e-6, dtype=np.float32)])
    old = ItemIndex(12, IndexSettings(hnsw_min_items=100))
    old.build(np.arange(1, 301), v)
    old.remove(np.array([5]))
    loaded = ItemIndex.load(old.save(tmp_path, "o"), old.cfg)
    assert loaded.searched == 12 and loaded.relaid(0) is loaded
    relaid = loaded.relaid(4)
    assert relaid.searched == 8 and relaid.approximate and len(relaid) == 299 and relaid.lookup(5) is None
    np.testing.assert_allclose(relaid.vector(42), v[41], atol=1e-6)
    q = np.hstack([v[:3, :8], np.zeros((3, 4), dtype=np.float32)])
    assert np.array_equal(relaid.search(q, 5)[1], old.search(q, 5)[1])


@pytest.mark.parametrize("hnsw_min_items", [10_000, 100], ids=["exact", "hnsw"])
def test_a_compaction_built_while_the_index_changes_catches_up_with_every_change(hnsw_min_items):
    """The refresher keeps applying fresh items while a compaction builds on another thread:
    the built index, caught up, holds what the live one holds then (added, replaced, removed,
    removed then added back, silent columns included), and nothing of what it was copied from."""
    whole = np.hstack([_vecs(300, seed=3), _vecs(300, dim=4, seed=4)])  # (300, 12), 4 silent
    idx = ItemIndex(12, IndexSettings(hnsw_min_items=hnsw_min_items), silent=4)
    idx.build(np.arange(1, 301), whole)
    new = np.hstack([_vecs(40, seed=5), _vecs(40, dim=4, seed=6)])
    idx.upsert(np.array([310, 13]), new[:2])  # in the delta tier when the copy is taken
    build = idx.start_compaction()
    idx.upsert(np.array([301, 5, 9]), new[2:5])  # a new item, two replaced ones
    idx.remove(np.array([7, 9, 302]))  # 9 replaced then removed; 302 never indexed
    idx.remove(np.array([11]))
    idx.upsert(np.array([11]), new[5:6])  # removed, then back with another vector
    idx.upsert(np.arange(320, 352), new[6:38])  # the delta grows: the copy must not be a view
    fresh = idx.caught_up(build())
    ids, vectors = fresh.items()
    live_ids, live_vectors = idx.items()
    order, live_order = np.argsort(ids), np.argsort(live_ids)
    np.testing.assert_array_equal(ids[order], live_ids[live_order])
    np.testing.assert_allclose(vectors[order], live_vectors[live_order], atol=1e-6)
    assert 301 in ids and 310 in ids and 7 not in ids and 9 not in ids and len(fresh) == 332
    np.testing.assert_allclose(fresh.vector(11), new[5], atol=1e-6)
    np.testing.assert_allclose(fresh.vector(13), new[1], atol=1e-6)
    with pytest.raises(RuntimeError):
        idx.caught_up(fresh)  # recording stopped at the catch-up
