"""Rows of the fault-injection table, printed at the end of the pytest run (conftest)."""

from __future__ import annotations

ROWS: list[dict] = []


def record(fault: str, injected: int, lost: int, duplicated: int, recovery_s: float) -> None:
    ROWS.append(
        {
            "fault": fault,
            "injected": injected,
            "lost": lost,
            "duplicated": duplicated,
            "recovery_s": recovery_s,
        }
    )


def table() -> str:
    lines = ["| fault | times injected | lost | duplicated | recovery s (max) |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['fault']} | {r['injected']} | {r['lost']} | {r['duplicated']} | {r['recovery_s']:.2f} |"
        for r in ROWS
    ]
    return "\n".join(lines)
