"""The compose bootstrap (`said align --if-none`) and the waits of the services beside it."""

from __future__ import annotations

import logging
import threading

from sqlalchemy import func, select

from core.tables import model_versions
from core.wait import wait_until
from said.cli import main


def _versions(engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(model_versions)).scalar_one()


def test_the_bootstrap_aligns_nothing_once_an_aligner_is_active(aligned, cli_env, caplog, tiny_hf_folder):
    engine, bundle, _lm, settings, data = aligned
    cli_env(  # a wrong second alignment would be quick, and counted
        SAID_DATABASE_URL=engine.url.render_as_string(hide_password=False),
        SAID_DATA_DIR=str(data),
        SAID_LLM=str(tiny_hf_folder),
        SAID_ALIGN_EPOCHS="1",
        SAID_ALIGN_BOOTSTRAP_MIN_ITEMS="1",
    )
    before = _versions(engine)
    with caplog.at_level(logging.INFO):
        assert main(["align", "--if-none"]) == 0
    assert _versions(engine) == before  # a later boot: no second alignment
    assert f"aligner {bundle.version} is active: no bootstrap alignment" in caplog.text


def test_a_wait_says_what_it_waits_for_and_ends_on_stop_or_success(caplog):
    found: list[int] = []
    stop = threading.Event()
    threading.Timer(0.05, stop.set).start()
    with caplog.at_level(logging.WARNING):
        assert wait_until(lambda: None, "the thing X makes", stop, poll_s=0.01) is None
    assert "waiting for the thing X makes" in caplog.text
    threading.Timer(0.05, lambda: found.append(7)).start()
    assert wait_until(lambda: found[0] if found else None, "seven", poll_s=0.01) == 7
