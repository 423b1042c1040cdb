"""How the services are put together: the one place that builds them from ``Settings``.

The CLI (``said/cli.py``) and the demo (``said/demo.py``) only call these factories, so
adding a topic or a service touches this file alone. Every factory takes the settings
whole and hands each service its own section.
"""

from __future__ import annotations

import logging
import threading

import torch
from fastapi import FastAPI
from sqlalchemy.engine import Engine

from consumers.interactions import InteractionsHandler
from consumers.items import ItemsHandler
from consumers.runner import ConsumeLoop, Handler
from core.catalogue import count_rows
from core.db import make_engine
from core.files import CorruptFile
from core.metrics import ROLLBACKS, SERVING_PROBLEMS
from core.settings import Settings
from core.tables import items
from core.versions import active_version, require_active, roll_back_corrupt, versions_in
from core.wait import wait_until
from models.aligner import FrozenLM
from models.bundle import AlignerBundle
from models.llm import load_adapter_state, load_llm, pick_device
from scorer.app import create_app
from scorer.state import ServingState, freeze_heap
from updater.full_align import align_catalogue
from updater.retrain import retrain_once, run_retrainer
from updater.worker import UpdateWorker

log = logging.getLogger(__name__)

# topic name (as `said consumer run` spells it) -> the handler that validates and stores it
TOPIC_HANDLERS: dict[str, type[Handler]] = {"items": ItemsHandler, "interactions": InteractionsHandler}


def engine_for(settings: Settings) -> Engine:
    """The catalogue's engine (``SAID_DATABASE_URL``)."""
    return make_engine(settings.database_url)


def consume_loop(settings: Settings, topic: str, engine: Engine | None = None) -> ConsumeLoop:
    """The at-least-once loop of one topic (a key of ``TOPIC_HANDLERS``)."""
    handler = TOPIC_HANDLERS[topic](settings)
    return ConsumeLoop(handler, engine or engine_for(settings), settings)


def frozen_lm(
    settings: Settings, lora_rank: int, prompt: str, device: torch.device | None = None
) -> FrozenLM:
    """The LLM of ``settings.llm`` on the settings' device (its cache under ``data_dir``),
    with LoRA adapters of ``lora_rank`` (0: none), read through ``prompt``."""
    device = device or pick_device(settings.device)
    model, tok = load_llm(settings.llm, settings.data_dir / "llm", device, lora_rank, settings.attention)
    return FrozenLM.around(model, tok, device, prompt)


def align(settings: Settings, engine: Engine | None = None, lm: FrozenLM | None = None) -> AlignerBundle:
    """`said aligner train`: every catalogue item, as a new active aligner version."""
    lm = lm or frozen_lm(settings, settings.align.lora_rank, settings.align.prompt)
    return align_catalogue(engine or engine_for(settings), lm, settings)


def bootstrap_align(settings: Settings, engine: Engine | None = None) -> AlignerBundle | None:
    """`said aligner train --if-none`: the first aligner version, once the catalogue holds
    ``settings.align.bootstrap_min_items`` items (waiting for the items consumer, and
    saying so); nothing if an aligner is already active. Compose runs it once at boot, so
    a new stack comes up without an operator's `said aligner train` and a restart aligns nothing."""
    engine = engine or engine_for(settings)
    need = settings.align.bootstrap_min_items

    def ready() -> str | None:  # the active aligner's version; "" once enough items arrived
        active = active_version(engine, "aligner")
        if active is not None:
            return active[0]
        with engine.connect() as conn:
            return "" if count_rows(conn, items) >= need else None

    version = wait_until(ready, f"{need} items in the catalogue (the items consumer stores them)")
    if version:  # active already, or made by someone else while this waited
        log.info("aligner %s is active: no bootstrap alignment", version)
        return None
    return align(settings, engine)


def readable_aligner(engine: Engine, device: torch.device) -> AlignerBundle:
    """The active aligner bundle; if its file cannot be read, the newest one served before,
    loudly (log, ``said_serving_problems``), so a process starts and serves instead of
    exiting in a restart loop. Raises only when no aligner file can be read at all.

    An active file that fails its checksum is broken for everyone: it is marked corrupt and
    the version loaded instead becomes active again (``roll_back_corrupt``), so writes are
    no longer fenced and fresh items keep flowing. An unreadable one (a missing mount, a
    permission) may be this host's problem alone: it is only reported."""
    active = require_active(engine, "aligner")
    corrupt = False
    for version, path in [active, *versions_in(engine, "aligner", "retired")]:
        try:
            bundle = AlignerBundle.load(path, device)
        except (CorruptFile, OSError, ValueError) as exc:
            log.error("aligner %s cannot be loaded (%s); trying the one served before it", version, exc)
            corrupt = corrupt or (version == active[0] and isinstance(exc, CorruptFile))
            continue
        if corrupt and roll_back_corrupt(engine, "aligner", active[0], version):
            log.error(
                "aligner %s failed its checksum: marked corrupt, %s is active again", active[0], version
            )
            ROLLBACKS.labels("aligner").inc()
        now = active_version(engine, "aligner")
        SERVING_PROBLEMS.labels("aligner").set(int(now is None or now[0] != version))
        return bundle
    raise CorruptFile(f"no aligner file can be read (active: {active[0]}): run `said aligner train`")


def update_worker(
    settings: Settings, engine: Engine | None = None, lm: FrozenLM | None = None
) -> UpdateWorker:
    """`said worker run`: the streaming worker on the active aligner version. ``lm`` may be
    given (the demo shares the one it aligned with); else it is loaded with the bundle's
    LoRA rank and adapters."""
    engine = engine or engine_for(settings)
    device = lm.device if lm else pick_device(settings.device)
    bundle = readable_aligner(engine, device)
    if lm is None:
        lm = frozen_lm(settings, bundle.lora_rank, bundle.prompt, device)
        if bundle.adapters:
            load_adapter_state(lm.model, bundle.adapters)
    return UpdateWorker(engine, bundle, lm, settings)


def serving_state(settings: Settings, engine: Engine | None = None) -> ServingState:
    """What `said scorer serve` serves: the active aligner's catalogue and index folder."""
    engine = engine or engine_for(settings)
    return ServingState.for_bundle(engine, readable_aligner(engine, torch.device("cpu")), settings)


def api_app(settings: Settings, state: ServingState) -> FastAPI:
    """The HTTP API over ``state``, as ``settings.api`` says (token, history length)."""
    return create_app(state.engine, state, settings.api)


def serving_app() -> FastAPI:
    """The app of ``said scorer serve`` (a uvicorn factory: every worker process builds its own)."""
    from core.settings import get_settings

    # One small query at a time: intra-op threads only contend with concurrent requests
    # (measured: SASRec query 1.2 ms with 2 threads, 0.53 ms with 1).
    torch.set_num_threads(1)
    settings = get_settings()
    app = api_app(settings, serving_state(settings))
    freeze_heap()
    return app


def retrain(settings: Settings, engine: Engine | None = None, aligner_version: str | None = None) -> dict:
    """`said scorer train`: one candidate on ``aligner_version`` (default the active one),
    promoted if not worse; returns its record."""
    engine = engine or engine_for(settings)
    version = aligner_version or require_active(engine, "aligner")[0]
    return retrain_once(engine, version, settings, pick_device(settings.device))


def watch_retrain(
    settings: Settings, stop: threading.Event, engine: Engine | None = None, progress: bool = False
) -> None:
    """`said scorer train --watch`: retrain whenever enough has arrived, until ``stop``."""
    run_retrainer(engine or engine_for(settings), settings, pick_device(settings.device), stop, progress)
