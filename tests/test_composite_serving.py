"""The served warm/cold composite, end to end over a real catalogue (SQLite and PostgreSQL),
the retrainer and the HTTP scorer: fresh items ranked by the student within a second of
their first estimate, graduation to their ID rows after a promotion, the promotion guard on
cold targets, impressions that never become positives, and the new-user fallback."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import delete

from core.catalogue import content_version, insert_interactions, load_embeddings, write_embeddings
from core.events import InteractionEvent
from core.settings import ApiSettings, IndexSettings, Settings
from core.tables import item_embeddings
from core.versions import active_version
from models.composite import Composite
from said.cli import main
from scorer.app import create_app
from scorer.scorers import CompositeScorer
from tests.support.catalogue import add_items, text_hashes
from updater import retrain

CPU = torch.device("cpu")
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def quick(data, **flat) -> Settings:
    """A short retrain of the tiny catalogue: teacher and student each stop after 3 flat
    validations."""
    return Settings(
        data_dir=data,
        scorer_patience=3,
        scorer_eval_every=1,
        retrain_epochs=6,
        composite_epochs=8,
        composite_patience=3,
        **flat,
    )


def clicks(engine, rows: list[tuple[str, int, datetime]], kind: str = "click") -> None:
    """(user, item index, time) interactions of ``kind``; item index i is item ``i{i-1}``."""
    evs = [
        InteractionEvent(f"{user}-{idx}-{kind}-{at.isoformat()}", user, f"i{idx - 1}", kind, at)
        for user, idx, at in rows
    ]
    with engine.begin() as conn:
        insert_interactions(conn, evs, {f"i{idx - 1}": idx for _, idx, _ in rows})


def new_items_like(engine, bundle, like: dict[int, int], content: str = "said") -> dict[int, np.ndarray]:
    """Embed new items ``{new index: old index}`` at an old item's row of ``content`` plus
    noise, as a first estimate of a new edition is: their rows, by index."""
    version = content_version(bundle.version, content)
    with engine.connect() as conn:
        ids, vectors = load_embeddings(conn, version)
    by_idx = dict(zip(ids.tolist(), vectors, strict=True))
    rng = np.random.default_rng(0)
    out = {
        new: (by_idx[old] + 0.05 * rng.standard_normal(by_idx[old].shape)).astype("float32")
        for new, old in like.items()
    }
    idx = sorted(out)
    hashes = text_hashes(engine, idx)  # as the worker writes them: the items' texts
    with engine.begin() as conn:
        write_embeddings(
            conn,
            version,
            "estimate" if content == "said" else content,
            idx,
            hashes,
            np.stack([out[i] for i in idx]),
            [None] * len(idx),
            datetime.now(UTC),
        )
    return out


def said_retrain(cli_env, capsys, engine, data, **env: str) -> dict:
    """``said retrain --json`` in this process (so a test's patches hold), with ``quick``'s
    short training: the candidate's record, as the CLI prints it."""
    cli_env(
        SAID_DATABASE_URL=engine.url.render_as_string(hide_password=False),
        SAID_DATA_DIR=str(data),
        SAID_SCORER_PATIENCE="3",
        SAID_SCORER_EVAL_EVERY="1",
        SAID_RETRAIN_EPOCHS="6",
        SAID_COMPOSITE_EPOCHS="8",
        SAID_COMPOSITE_PATIENCE="3",
        **env,
    )
    capsys.readouterr()
    assert main(["retrain", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_fresh_item_is_ranked_by_the_student_within_a_second_then_graduates(served, cli_env, capsys):
    engine, bundle, data, state = served
    first = said_retrain(cli_env, capsys, engine, data)
    assert first["promoted"] and first["version"].startswith("composite-")
    assert 0.0 <= first["val_cold_share_top10"] <= 1.0, "too few cold users to judge: exposure calibrated"
    state.cfg = IndexSettings(refresh_s=0.1)
    with TestClient(create_app(engine, state, ApiSettings())) as client:
        deadline = time.monotonic() + 5
        while state.version != first["version"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isinstance(state.served.scorer, CompositeScorer), "the replica serves the composite"
        add_items(engine, 24, 1)  # i24, index 25, of kind 0: a new edition of i0
        t0 = time.monotonic()
        vector = new_items_like(engine, bundle, {25: 1})[25]
        ranked_at = None
        while time.monotonic() - t0 < 5:
            r = client.post("/recommend", json={"history": ["i0", "i8"], "k": 3})
            if "i24" in [x["item_id"] for x in r.json()["items"]]:
                ranked_at = time.monotonic() - t0
                break
            time.sleep(0.02)
    assert ranked_at is not None and ranked_at < 1.0, f"in the kind's top 3 after {ranked_at} s"
    model = state.served.scorer.model
    student = model.content_vectors(torch.from_numpy(vector)[None])[0].detach().numpy()
    indexed = state.served.index.vector(25)
    assert np.allclose(indexed, student, atol=1e-5), "a fresh item is the student's vector, fully boosted"

    # it gets clicks (earlier in users' histories); the next retrain holds it out to judge
    # the candidate (its cold-validation item), and serves it trained on once promoted
    clicks(engine, [(f"u{u}", 25, T0 - timedelta(days=1)) for u in range(0, 30, 8)])
    # a soft gate and a boost, so the cold terms' rule shows (old: 1 - g of them; now: none)
    third = said_retrain(
        cli_env, capsys, engine, data, SAID_COMPOSITE_GATE_KAPPAS="3", SAID_COMPOSITE_BOOSTS="1"
    )
    assert third["promoted"] and third["cold_items"] == 1, third
    state.refresh()
    assert state.version == third["version"]
    model = state.served.scorer.model
    assert model.counts[25] == 4, "trained on its clicks"
    graduated = state.served.index.vector(25)
    ids = torch.tensor([25])
    expected = model.vectors_of(ids, torch.from_numpy(vector)[None])[0].detach().numpy()
    assert np.allclose(graduated, expected, atol=1e-5)
    g = model.gate(ids)[0, 0].item()
    assert 0 < g < 1 and not np.allclose(graduated, student, atol=1e-3), "its ID row now carries it"
    row = model.teacher.item_vectors(ids)[0].detach().numpy()
    now_student = model.content_vectors(torch.from_numpy(vector)[None])[0].detach().numpy()
    h = len(row)  # scoring vectors: [gated (h) | boost (1) | z, at 2^-20 once it has clicks (r) | read (h)]
    z_end = len(graduated) - h
    assert np.allclose(graduated[:h], g * row + (1 - g) * now_student[:h], atol=1e-4), "gated"
    # the cold terms are for items without clicks: a graduated one has neither boost nor similarity
    assert graduated[h] == 0.0 and now_student[h] == float(model.boost) == 1.0, "no boost once it has clicks"
    z = now_student[h + 1 : z_end]  # a fresh item's content axes, whole
    assert np.allclose(graduated[h + 1 : z_end], 0.0, atol=1e-5), "similarity: next to nothing"
    assert np.allclose(graduated[h + 1 : z_end] * 2.0**20, z, atol=1e-5), "its content kept, at 2^-20"
    assert state.served.index.searched == z_end, "the read block is stored, never searched"
    # a history reads it as its ID row now; fresh, it read as the row its content starts at
    assert np.allclose(graduated[z_end:] * 2.0**20, row, atol=1e-4), "read: its ID row"
    start = model._start_rows(model._student_input(torch.from_numpy(vector)[None]), model.start_scale)
    assert np.allclose(now_student[z_end:] * 2.0**20, start[0].detach().numpy(), atol=1e-4)


def test_a_composite_of_text_content_serves_every_item_by_its_text_row(served, cli_env, capsys, monkeypatch):
    """SAID_COMPOSITE_CONTENT=text: the student maps the pooled text features stored beside
    the aligner's vectors; replicas index each item by its text row, a fresh one the moment
    its row is written, and an item with a SAID vector only is not served by it."""
    engine, bundle, data, state = served
    first = said_retrain(cli_env, capsys, engine, data, SAID_COMPOSITE_CONTENT="text")
    assert first["promoted"] and first["content"] == "text", first
    state.refresh()
    assert state.version == first["version"] and state.served.scorer.content == "text"
    model = state.served.scorer.model
    with engine.connect() as conn:
        ids, feats = load_embeddings(conn, content_version(bundle.version, "text"))
    counts = retrain.training_data(engine, bundle.version, quick(data)).counts  # the items it trained on
    warm = counts[torch.from_numpy(ids)] > 0
    assert torch.allclose(model.feat_mean, torch.from_numpy(feats)[warm].mean(0), atol=1e-5), "fitted on text"
    expected = model.vectors_of(torch.from_numpy(ids), torch.from_numpy(feats)).detach().numpy()
    indexed = np.stack([state.served.index.vector(i) for i in ids.tolist()])
    np.testing.assert_allclose(indexed, expected, atol=1e-5)

    add_items(engine, 24, 2)  # i24 and i25, indexes 25 and 26
    text_row = new_items_like(engine, bundle, {25: 1}, content="text")[25]
    new_items_like(engine, bundle, {26: 6})  # a SAID estimate (like i5), and no text row yet
    state.refresh()
    fresh = model.vectors_of(torch.tensor([25]), torch.from_numpy(text_row)[None])[0].detach().numpy()
    np.testing.assert_allclose(state.served.index.vector(25), fresh, atol=1e-5)
    assert 26 not in state.served.hashes, "served by its text row only"
    new_items_like(engine, bundle, {26: 2}, content="text")  # its text row: like i1's
    state.refresh()
    assert 26 in state.served.hashes

    # an operator switches back: due at once, and the active one is compared on its own rows
    assert retrain.is_due(engine, quick(data, composite_content="said"))
    read: list[torch.Tensor] = []
    use_content = Composite.use_content
    monkeypatch.setattr(Composite, "use_content", lambda m, t: read.append(t) or use_content(m, t))
    second = said_retrain(cli_env, capsys, engine, data, SAID_COMPOSITE_CONTENT="said")
    assert second["content"] == "said" and second["warm"]["active_ndcg@10"] is not None, second
    with engine.connect() as conn:
        ids, feats = load_embeddings(conn, content_version(bundle.version, "text"))
    assert any(t.shape[0] > ids.max() and torch.equal(t[ids], torch.from_numpy(feats)) for t in read), (
        "the active composite read its text rows"
    )


def test_a_text_retrain_waits_until_every_aligned_item_has_its_text_row(served):
    """Trained on the items that have one, it would serve only those: it fails with why
    (the retrainer tries again every poll) until the worker has stored the rest."""
    engine, bundle, data, _state = served
    text_rows = item_embeddings.c.model_version == content_version(bundle.version, "text")
    with engine.begin() as conn:
        conn.execute(delete(item_embeddings).where(text_rows, item_embeddings.c.item_idx == 3))
    with pytest.raises(RuntimeError, match="item 3 first"):
        retrain.training_data(engine, bundle.version, quick(data, composite_content="text"))
    assert retrain.training_data(engine, bundle.version, quick(data)).content == "said", "SAID does not wait"


def test_the_guard_refuses_a_candidate_worse_on_cold_targets_only(served, monkeypatch, cli_env, capsys):
    engine, bundle, data, _state = served
    # warm items are their ID rows in both versions; groups of 5 users decide
    env = {"SAID_COMPOSITE_GATE_KAPPAS": "0", "SAID_RETRAIN_MIN_GROUP_USERS": "5"}
    first = said_retrain(cli_env, capsys, engine, data, **env)
    assert first["promoted"]
    # new editions i24..i31 (index 25..32, kinds 0..7) that each old user clicks last: the
    # next retrain's cold targets; 30 more users with old items only: its warm targets
    add_items(engine, 24, 8)
    new_items_like(engine, bundle, {25 + k: 1 + k for k in range(8)})
    clicks(engine, [(f"u{u}", 25 + u % 8, T0 + timedelta(hours=1)) for u in range(30)])
    # (third, first, second) of a kind: the last step is one both versions trained on
    old_only = [
        (f"w{u}", u % 8 + 1 + 8 * k, T0 + timedelta(minutes=step))
        for u in range(30)
        for step, k in enumerate((2, 0, 1))
    ]
    clicks(engine, old_only)
    real = retrain.train_student

    def ruined_student(composite, *args, **kwargs):
        """A student that learned nothing: every cold item scores 0 for every user, in the
        middle of the ranking, below the warm targets, so only cold targets sink."""
        composite, info = real(composite, *args, **kwargs)
        composite.student.register_forward_hook(lambda _m, _x, out: torch.zeros_like(out))
        composite.boost.fill_(0.0)
        composite.similarity.fill_(0.0)  # nor does the content similarity lift them
        return composite, info | {"boost": 0.0, "similarity": 0.0}

    def same_teacher(model, *_args, **_kwargs):
        """The teacher as warm-started: the active one's weights and rows, so warm targets
        rank as they did and only the student differs."""
        return model, {"best_val_ndcg@10": 0.0, "epochs": 0}

    monkeypatch.setattr(retrain, "train_student", ruined_student)
    monkeypatch.setattr(retrain, "train_scorer", same_teacher)
    second = said_retrain(cli_env, capsys, engine, data, **env)
    assert second["cold"]["users"] > 5 and second["warm"]["users"] > 5, second
    assert second["cold"]["worse"] and not second["warm"]["worse"], (second["warm"], second["cold"])
    assert second["cold"]["ndcg@10"] < second["cold"]["active_ndcg@10"], "both scores are kept"
    assert not second["promoted"] and active_version(engine, "scorer")[0] == first["version"]


def test_impressions_never_become_positives_nor_history(served):
    engine, bundle, data, state = served
    before = retrain.training_data(engine, bundle.version, quick(data))
    # a flood of impressions of item 5, by known users and by one who never clicked
    clicks(engine, [(f"u{u}", 5, T0 + timedelta(hours=2)) for u in range(30)], kind="impression")
    clicks(engine, [("viewer", i, T0 + timedelta(minutes=i)) for i in range(1, 25)], kind="impression")
    after = retrain.training_data(engine, bundle.version, quick(data))
    assert after.train == before.train and torch.equal(after.counts, before.counts)
    assert after.promotion == before.promotion, "no impression is a validation target either"
    with TestClient(create_app(engine, state, ApiSettings())) as client:
        body = client.post("/recommend", json={"user_id": "viewer", "k": 5}).json()
        assert body["fallback"], "impressions alone are no usable history"
        body = client.post("/recommend", json={"user_id": "u1", "k": 24, "exclude_seen": True}).json()
        ranked = {x["item_id"] for x in body["items"]}
        assert not body["fallback"] and not ranked & {"i1", "i9", "i17"}, "its clicked items are seen"
        assert "i4" in ranked, "an item it was only shown is not in its history"


def test_a_new_user_gets_a_flagged_fallback_of_popular_and_new_items(served):
    engine, bundle, _data, state = served
    add_items(engine, 24, 1)  # i24, index 25: the newest item, no clicks yet
    new_items_like(engine, bundle, {25: 3})
    clicks(engine, [(f"u{u}", 7, T0 + timedelta(hours=3)) for u in range(10)])  # i6: most popular
    state.refresh()
    state._popular_at = -float("inf")  # re-read the popular items now, not in a minute
    state.refresh()
    with TestClient(create_app(engine, state, ApiSettings())) as client:
        r = client.post("/recommend", json={"user_id": "someone-new", "k": 4})
        assert r.status_code == 200, r.text
        body = r.json()
        ranked = [x["item_id"] for x in body["items"]]
        assert body["fallback"] and len(ranked) == 4
        assert ranked[:2] == ["i6", "i24"], "the most popular item, then the newest one"
        r = client.post("/recommend", json={"history": ["no-such-item"], "k": 3}).json()
        assert r["fallback"] and r["unknown_items"] == ["no-such-item"] and len(r["items"]) == 3
        r = client.post("/recommend", json={"user_id": "u1", "k": 3}).json()
        assert not r["fallback"]


def test_a_retrain_starts_its_teacher_rows_from_content_as_the_evaluation_does(served, monkeypatch):
    """The served composite's ID teacher starts its item rows at the served content table's
    principal axes (``SAID_COMPOSITE_TEACHER_INIT=content``), as `said evaluate` starts a
    composite's teacher from that composite's table (``said-init`` for the SAID vectors the
    retrain serves); 'random' starts them as the plain ID scorer does."""
    from models.sasrec import SASRec, SASRecConfig, init_id_rows
    from training.mixed import trained_items

    engine, bundle, data, _state = served
    started: dict[str, torch.Tensor] = {}

    def untrained(model, *_args, **_kwargs):
        """The teacher as it starts: its rows are what this test reads."""
        started["rows"] = model.id_emb.weight.detach().clone()
        return model, {"best_val_ndcg@10": 0.0, "epochs": 0}

    monkeypatch.setattr(retrain, "train_scorer", untrained)
    for init in ("content", "random"):
        settings = quick(data, composite_teacher_init=init)
        training = retrain.training_data(engine, bundle.version, settings)
        retrain.train_composite(training, settings, CPU, False, None)
        expected = SASRec(SASRecConfig(n_items=training.table.shape[0] - 1))
        init_id_rows(expected, training.table, trained_items(training.train))
        same = torch.allclose(started["rows"], expected.id_emb.weight, atol=1e-5)
        assert same == (init == "content"), init
    # a warm start: the trained items the active teacher knew keep its rows; newer items, and
    # those without training interactions, start from their content
    n = training.table.shape[0] - 1
    active = SASRec(SASRecConfig(n_items=n - 2))
    settings = quick(data)  # the default: content
    retrain.train_composite(training, settings, CPU, False, SimpleNamespace(teacher=active))
    trained = trained_items(training.train)
    init_id_rows(expected, training.table, trained)
    kept = trained[trained <= n - 2]
    rest = torch.tensor([i for i in range(1, n + 1) if i not in set(kept.tolist())])
    assert len(kept) and len(rest) > 2, "both kinds are in the catalogue"
    assert torch.equal(started["rows"][kept], active.id_emb.weight[kept]), "trained old rows kept"
    assert torch.allclose(started["rows"][rest], expected.id_emb.weight[rest], atol=1e-5), "the rest: content"


def test_content_start_keeps_random_rows_without_content_and_needs_two_items():
    """An item without an embedding yet (a zero row of the table) keeps its random row:
    a projection of nothing would put every such item at one shared, far-out place. With
    fewer than 2 items to fit the axes on, no row moves."""
    from dataclasses import replace

    from models.sasrec import SASRec, SASRecConfig

    torch.manual_seed(0)
    table = torch.randn(7, 16)
    table[0] = 0.0
    table[5] = 0.0  # item 5: no embedding yet
    data = retrain.TrainingData(table, "said", set(), [[1, 2, 3], [2, 4, 6]], ([], []), ([], []))
    teacher = SASRec(SASRecConfig(n_items=6, hidden=8))
    before = teacher.id_emb.weight.detach().clone()
    retrain.content_start(teacher, data)
    rows = teacher.id_emb.weight.detach()
    assert torch.equal(rows[5], before[5]), "no content: the random start stays"
    assert not torch.allclose(rows[1:5], before[1:5]), "content rows moved"
    assert rows[0].abs().max() == 0, "padding stays zero"
    lone = SASRec(SASRecConfig(n_items=6, hidden=8))
    start = lone.id_emb.weight.detach().clone()
    retrain.content_start(lone, replace(data, histories=[[1], [1]]))
    assert torch.equal(lone.id_emb.weight.detach(), start)


def test_a_snapshot_that_searched_the_read_block_is_relaid_when_loaded(served, cli_env, capsys):
    """An index snapshot written while the composite's read block sat in the FAISS tiers
    loads in the scorer's layout (that block beside them, the same vectors); a snapshot of
    another width is skipped for the next older one."""
    from scorer.index import ItemIndex

    engine, bundle, data, state = served
    first = said_retrain(cli_env, capsys, engine, data)
    state.refresh()
    assert state.version == first["version"]
    scorer, index = state.served.scorer, state.served.index
    assert scorer.silent == scorer.model.teacher.cfg.hidden and index.searched == index.dim - scorer.silent
    ids, vectors = index.items()
    old = ItemIndex(index.dim, index.cfg)  # every column searched, as before
    old.build(ids, vectors)
    old.save(state.index_dir, state.served.snapshot_name())
    time.sleep(0.01)
    wrong = ItemIndex(index.dim - 1, index.cfg)
    wrong.build(ids, vectors[:, :-1])
    wrong.save(state.index_dir, state.served.snapshot_name() + "0")  # newer, of another width
    loaded = state._load(scorer).index
    assert loaded.dim == index.dim and loaded.searched == index.dim - scorer.silent
    again_ids, again = loaded.items()
    order = np.argsort(again_ids)
    assert np.array_equal(again_ids[order], np.sort(ids))
    np.testing.assert_allclose(again[order], vectors[np.argsort(ids)], atol=1e-6)
