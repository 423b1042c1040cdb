"""``said status``: what the system holds and whether it keeps up, in one read.

The catalogue (items by alignment status and serving state, interactions by type, the
alignment backlog and the parked interactions), each consumer group's lag, and the active
aligner and scorer versions. Each part is read on its own: a broker that does not answer
shows as such beside the catalogue's figures instead of hiding them.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from core.catalogue import overview
from core.events import TOPIC_INTERACTIONS, TOPIC_ITEMS
from core.kafka import group_lag
from core.parking import count_parked
from core.settings import Settings
from core.versions import list_versions

CONSUMERS = {"items": TOPIC_ITEMS, "interactions": TOPIC_INTERACTIONS}  # handler name -> topic


def status(engine: Engine, settings: Settings) -> dict:
    """The whole status as plain JSON-able values."""
    with engine.connect() as conn:
        out = overview(conn) | {"parked_interactions": count_parked(conn)}
    lag: dict[str, int | str] = {}
    for name, topic in CONSUMERS.items():
        try:
            lag[topic] = group_lag(
                settings.kafka.client_config(), f"{settings.consume.group_id}.{name}", topic
            )
        except Exception as exc:  # noqa: BLE001 - shown, not raised: the catalogue's part still stands
            lag[topic] = f"unavailable: {type(exc).__name__}: {exc}"
    versions = list_versions(engine)
    active = {v["kind"]: v for v in versions if v["status"] == "active"}
    return out | {
        "consumer_lag": lag,
        "active": {kind: _brief(active.get(kind)) for kind in ("aligner", "scorer")},
        "versions": {kind: sum(v["kind"] == kind for v in versions) for kind in ("aligner", "scorer")},
    }


def _brief(version: dict | None) -> dict | None:
    if version is None:
        return None
    keep = ("ndcg@10", "mean_loss", "mean_token_accuracy", "exact_match", "aligner_version")
    return {k: version[k] for k in ("version", "created_at")} | {
        k: v for k, v in version["metrics"].items() if k in keep
    }


def render(found: dict) -> str:
    """The status as a few human lines."""

    def counts(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"

    lines = [
        f"items: {found['items']} ({counts(found['items_by_status'])}; serving: "
        f"{counts(found['items_by_serving_state'])})",
        f"interactions: {counts(found['interactions_by_type'])}; parked {found['parked_interactions']}",
        f"alignment backlog: {found['alignment_jobs']} jobs, {found['alignment_jobs_failing']} failing",
        "consumer lag: " + ", ".join(f"{t} {lag}" for t, lag in found["consumer_lag"].items()),
    ]
    for kind, version in found["active"].items():
        lines.append(
            f"active {kind}: "
            + ("none" if version is None else ", ".join(f"{k} {v}" for k, v in version.items()))
            + f" ({found['versions'][kind]} versions)"
        )
    return "\n".join(lines)


def render_versions(versions: list[dict]) -> str:
    """One line a version: kind, status, name, creation time and its headline figure."""
    lines = []
    for v in versions:
        figures = {k: v["metrics"][k] for k in ("ndcg@10", "mean_token_accuracy") if k in v["metrics"]}
        shown = " ".join(f"{k} {x:.4f}" for k, x in figures.items() if isinstance(x, float))
        lines.append(f"{v['kind']:8} {v['status']:9} {v['version']}  {v['created_at']}  {shown}".rstrip())
    return "\n".join(lines) or "no versions yet: run `said aligner train` first"
