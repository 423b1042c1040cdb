"""PNG plots of a demo run: alignment loss curve, fresh vs reference loss, freshness."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def alignment_curve(history: list[dict], path: Path) -> Path:
    """Loss and teacher-forced token accuracy of the items trained in each pass."""
    fig, ax = plt.subplots(figsize=(5, 3.2))
    passes = [h["pass"] for h in history]
    ax.plot(passes, [h["loss"] for h in history], marker="o", label="cross-entropy")
    ax.set(xlabel="pass", ylabel="mean cross-entropy", title="SAID alignment")
    acc = ax.twinx()
    acc.plot(passes, [h["token_accuracy"] for h in history], marker="s", color="tab:green")
    acc.set(ylabel="token accuracy", ylim=(0, 1))
    return _save(fig, path)


def fresh_vs_reference(reference: list[float], fresh: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    bins = 30
    ax.hist(reference, bins=bins, alpha=0.6, density=True, label=f"reference (n={len(reference)})")
    if fresh:
        ax.hist(fresh, bins=bins, alpha=0.6, density=True, label=f"fresh (n={len(fresh)})")
    ax.set(xlabel="per-item alignment loss", ylabel="density", title="Fresh vs reference items")
    ax.legend()
    return _save(fig, path)


def freshness(seconds: list[float], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(seconds, bins=max(5, len(seconds)), color="tab:green")
    ax.set(
        xlabel="seconds from item event to servable (its vector in the index)",
        ylabel="items",
        title="Freshness",
    )
    return _save(fig, path)
