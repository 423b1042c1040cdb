"""Nothing piles up on disk: snapshots are pruned per version, rejected candidates' files
beyond the newest few go, and a published alignment removes killed runs' checkpoints."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from core.settings import IndexSettings
from core.versions import versions_in
from scorer.index import ItemIndex, snapshots
from tests.support.catalogue import add_users
from tests.support.ruined import ruin_training
from updater import retrain
from updater.full_align import align_catalogue

CPU = torch.device("cpu")
KEEP = 3  # rejected candidates whose files stay (the newest)


def _save(index: ItemIndex, folder, name: str) -> Path:
    path = index.save(folder, name)
    time.sleep(0.01)  # distinct modification times: "newest" is by mtime
    return path


def test_snapshots_are_pruned_per_version_and_retired_versions_go(tmp_path):
    index = ItemIndex(4, IndexSettings())
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


def test_the_served_versions_snapshots_survive_newer_ones_of_other_versions(tmp_path):
    """Issue 23.10: replicas share the snapshot folder (compose's /data volume), and
    "newest" is by modification time, so other versions' files can look newer than the one
    just written (another host's clock ahead; one clock tick for all, the name deciding).
    A save must keep the newest ``keep`` snapshots of its own version, the one it serves."""
    index = ItemIndex(4, IndexSettings())
    index.build(np.arange(1, 4), np.eye(3, 4, dtype=np.float32))
    ahead = time.time() + 3600
    for age, version in enumerate("bcd"):  # other replicas' versions, d the newest
        path = index.save(tmp_path, f"composite-{version}-q1")
        os.utime(path, (ahead + age, ahead + age))
    for wm in range(1, 6):  # the replica serving a
        assert _save(index, tmp_path, f"composite-a-q{wm}").exists(), "its own save pruned it"
        assert len(snapshots(tmp_path, "composite-a-")) == min(wm, 3)
    names = {p.stem for p in snapshots(tmp_path)}
    assert names == {f"index-composite-{v}" for v in ("a-q5", "a-q4", "a-q3", "d-q1", "c-q1")}


def test_only_the_newest_rejected_candidates_keep_their_files(aligned, monkeypatch):
    engine, bundle, _lm, settings, _data = aligned
    add_users(engine)
    settings = settings.override(retrain_epochs=1, retrain_min_group_users=3)
    retrain.retrain_once(engine, bundle.version, settings, CPU, progress=False)

    ruin_training(monkeypatch)  # a candidate whose training went wrong: rejected
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
