"""The data-set format: ``items.tsv`` (item_id, title[, description]) + ``sequences.txt``.

Pure parsing, no torch. Items with an empty title get a visible placeholder title, so that
every item of the file exists in the catalogue (row counts match the file) and the count of
placeholders is reported rather than hidden.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Dataset:
    item_ids: list[str]  # external ids, in file order
    titles: list[str]
    descriptions: list[str | None]
    sequences: list[tuple[str, list[str]]]  # (user_id, [item_id, ...] oldest first)
    placeholder_titles: int = 0

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for _, s in self.sequences)


def load_dataset(folder: str | Path, limit_items: int | None = None) -> Dataset:
    """Read a data-set folder; ``limit_items`` keeps the first N items and their events."""
    folder = Path(folder)
    ids, titles, descs, placeholders = [], [], [], 0
    with open(folder / "items.tsv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"item_id", "title"} <= set(reader.fieldnames):
            raise ValueError(f"{folder}/items.tsv needs a header with item_id and title")
        for row in reader:
            title = (row["title"] or "").strip()
            if not title:
                title = f"Untitled item {row.get('asin') or row['item_id']}"
                placeholders += 1
            ids.append(row["item_id"])
            titles.append(title)
            descs.append((row.get("description") or "").strip() or None)
            if limit_items and len(ids) >= limit_items:
                break
    known = set(ids)
    sequences = []
    with open(folder / "sequences.txt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise ValueError(f"sequences.txt line {line_no}: a user with no items")
            seq = [i for i in parts[1:] if i in known]
            if seq:
                sequences.append((parts[0], seq))
    return Dataset(ids, titles, descs, sequences, placeholders)
