"""Waiting, loudly, for what another service makes: the first aligner version, items.

In compose every service starts at once. One that needs what another makes first (the
bootstrap alignment's aligner version, the consumers' first items) waits for it and says
what it waits for, instead of exiting into a restart loop that says nothing useful.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 2.0  # a precondition is met once, at start-up: a catalogue read every 2 s is nothing
LOG_EVERY_S = 30.0  # the wait is logged at once, then this often


def wait_until(
    check: Callable[[], T | None],
    what: str,
    stop: threading.Event | None = None,
    poll_s: float = POLL_S,
    log_every_s: float = LOG_EVERY_S,
) -> T | None:
    """``check()``'s first result that is not None, polled every ``poll_s``; None if
    ``stop`` is set first. ``what`` says, in the log, what is awaited and who makes it."""
    stop = stop or threading.Event()
    started, logged = time.monotonic(), -float("inf")
    while not stop.is_set():
        found = check()
        if found is not None:
            if logged > -float("inf"):
                log.info("waited %.0f s for %s", time.monotonic() - started, what)
            return found
        if time.monotonic() - logged >= log_every_s:
            log.warning("waiting for %s (%.0f s so far)", what, time.monotonic() - started)
            logged = time.monotonic()
        stop.wait(poll_s)
    return None
