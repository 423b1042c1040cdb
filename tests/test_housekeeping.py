"""Nothing piles up on disk: snapshots are pruned per version, rejected candidates' files
beyond the newest few go, and a published alignment removes killed runs' checkpoints."""

from __future__ import annotations

import time

import numpy as np
import torch

from core.settings import IndexSettings
from core.versions import versions_in
from scorer.index import ItemIndex, snapshots
from tests.support.catalogue import add_users
from updater import retrain
from updater.full_align import align_catalogue

CPU = torch.device("cpu")
KEEP = 3  # rejected candidates whose files stay (the newest)


def _save(index: ItemIndex, folder, name: str) -> None:
    index.save(folder, name)
    time.sleep(0.01)  # distinct modification times: "newest" is by mtime


def test_snapshots_are_pruned_per_version_and_retired_versions_go(tmp_path):
    index = ItemIndex(4, IndexSettings().hnsw_min_items)
    index.build(np.arange(1, 4), np.eye(3, 4, dtype=np.float32))
    _save(index, tmp_path, "sasrec-b-q1")  # another replica's version, mid-swap
    for wm in range(1, 6):
        _save(index, tmp_path, f"sasrec-a-q{wm}")
    names = {p.stem for p in snapshots(tmp_path)}
    assert names == {"index-sasrec-a-q5", "index-sasrec-a-q4", "index-sasrec-a-q3", "index-sasrec-b-q1"}
    for version in ("c", "d"):
        _save(index, tmp_path, f"sasrec-{version}-q1")
    owners = {p.stem.rsplit("-", 1)[0] for p in snapshots(tmp_path)}
    assert owners == {"index-sasrec-a", "index-sasrec-c", "index-sasrec-d"}, "the 3 newest versions"


def test_only_the_newest_rejected_candidates_keep_their_files(aligned, monkeypatch):
    engine, bundle, _lm, settings, _data = aligned
    add_users(engine)
    settings = settings.override(retrain_epochs=1, retrain_min_group_users=3)
    retrain.retrain_once(engine, bundle.version, settings, CPU, progress=False)

    def ruined(model, *_a, **_k):  # a candidate whose training went wrong: rejected
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 5)
        return model, {"epochs": 1, "best_val_ndcg@10": 0.0}

    monkeypatch.setattr(retrain, "train_scorer", ruined)
    for _ in range(KEEP + 2):
        assert not retrain.retrain_once(engine, bundle.version, settings, CPU, progress=False)["promoted"]
    rejected = versions_in(engine, "scorer", "rejected")
    assert len(rejected) == KEEP + 2, "every rejection stays on record"
    assert [p.exists() for _, p in rejected] == [True] * KEEP + [False] * 2


def test_a_published_alignment_removes_killed_runs_checkpoints(aligned):
    engine, _bundle, lm, settings, data = aligned
    folder = data / "align"
    folder.mkdir(exist_ok=True)
    killed = folder / "checkpoint-0123456789ab-k1.pt"  # a run killed over an older catalogue
    killed.write_bytes(b"half an alignment")
    align_catalogue(engine, lm, settings.override(align_epochs=1), progress=False)
    assert not list(folder.glob("checkpoint-*.pt"))
