"""The ``said`` command line: one verb per job, all configured from the environment."""

from __future__ import annotations

import argparse
import faulthandler
import ipaddress
import logging
import signal
import sys
import time
from pathlib import Path
from typing import get_args

from core.settings import Variant, from_settings, get_settings
from core.versions import NoActiveVersion


def _cmd_broker(args: argparse.Namespace) -> int:
    from said.broker import EmbeddedBroker, ensure_topics

    with EmbeddedBroker(args.port) as broker:
        ensure_topics({"bootstrap.servers": broker.bootstrap})
        logging.info("broker on %s; Ctrl-C stops it", broker.bootstrap)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        try:
            while not stop and broker.proc and broker.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


def _cmd_db(args: argparse.Namespace) -> int:
    from said.migrate import upgrade

    upgrade(get_settings().database_url, args.revision)
    logging.info("catalogue at revision %s", args.revision)
    return 0


def _cmd_produce(args: argparse.Namespace) -> int:
    from core.dataset import load_dataset
    from said.broker import ensure_topics
    from said.produce import replay_dataset

    settings = get_settings()
    ds = load_dataset(args.dataset, args.limit)
    if ds.placeholder_titles:
        logging.warning("%d items had an empty title: placeholder titles used", ds.placeholder_titles)
    ensure_topics(settings.kafka_config())
    n_items, n_inter = replay_dataset(settings.kafka_config(), ds)
    logging.info("produced %d item and %d interaction events", n_items, n_inter)
    return 0


def _cmd_consume(args: argparse.Namespace) -> int:
    from consumers.interactions import InteractionsHandler
    from consumers.items import ItemsHandler
    from consumers.runner import ConsumeLoop
    from core.db import make_engine
    from core.metrics import serve_metrics

    settings = get_settings()
    serve_metrics(settings.metrics_port)
    handler_cls = {"items": ItemsHandler, "interactions": InteractionsHandler}[args.topic]
    loop = ConsumeLoop(handler_cls(settings), make_engine(settings.database_url), settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: loop.stop())
    stats = loop.run(idle_exit=args.idle_exit)
    logging.info(
        "consumed %d: stored %d, dead-lettered %d %s",
        stats.consumed,
        stats.stored,
        stats.dead_lettered,
        stats.reasons,
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import format_table, paired, run_from_settings, write_results

    settings = get_settings()
    results = run_from_settings(
        settings,
        args.dataset,
        args.variant,
        [int(s) for s in args.seeds.split(",")],
        [int(s) for s in args.align_seeds.split(",")],
        args.cold_fraction,
        settings.data_dir / "artifacts",
        align_overrides={"epochs": args.align_epochs, "batch_size": args.align_batch},
        scorer_overrides={"epochs": args.scorer_epochs},
    )
    out = args.out or settings.data_dir / "results" / f"evaluate-{'-'.join(args.variant)}.json"
    write_results(results, out)
    print(format_table(results["summary"], paired(results["runs"])))
    logging.info("results written to %s", out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from said.demo import DEFAULT_DATASET, format_summary, run_demo

    dataset = Path(args.dataset) if args.dataset else DEFAULT_DATASET
    if not (dataset / "items.tsv").exists():
        raise SystemExit(f"no data set at {dataset}: pass --dataset DIR")
    # Ctrl-C and SIGTERM both stop the demo cleanly, also when it was started from a shell
    # that ignores SIGINT (background jobs, CI runners): Python then installs no handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    settings = get_settings()
    summary = run_demo(
        settings, dataset, args.items, args.align_epochs, args.fresh, args.port, args.keep_serving
    )
    print(format_summary(summary))
    return 0


def _load_llm(settings, lora_rank: int):
    from models.llm import load_llm, pick_device

    device = pick_device(settings.device)
    llm, tok = load_llm(settings.llm, settings.data_dir / "llm", device, lora_rank)
    return llm, tok, device


def _cmd_align(args: argparse.Namespace) -> int:
    from core.db import make_engine
    from training.align import AlignConfig
    from training.fit_aligner import FidelityConfig, RefineConfig
    from updater.full_align import align_catalogue

    settings = get_settings()
    llm, tok, device = _load_llm(settings, settings.lora_rank)
    cfg = from_settings(AlignConfig, settings, epochs=args.epochs, batch_size=args.batch)
    align_catalogue(
        make_engine(settings.database_url),
        llm,
        tok,
        device,
        settings.data_dir,
        cfg,
        settings.soft_tokens,
        settings.item_dim,
        prompt=settings.prompt,
        refine=from_settings(RefineConfig, settings),
        fidelity_cfg=from_settings(FidelityConfig, settings),
    )
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    from core.db import make_engine
    from core.metrics import serve_metrics
    from core.versions import require_active
    from models.bundle import AlignerBundle
    from models.llm import load_adapter_state, pick_device
    from updater.worker import UpdateWorker, WorkerConfig

    settings = get_settings()
    engine = make_engine(settings.database_url)
    bundle = AlignerBundle.load(require_active(engine, "aligner")[1], pick_device(settings.device))
    llm, tok, device = _load_llm(settings, bundle.lora_rank)
    if bundle.adapters:
        load_adapter_state(llm, bundle.adapters)
    serve_metrics(settings.metrics_port)
    cfg = from_settings(
        WorkerConfig,
        settings,
        batch=args.batch,
        refine_epochs=args.refine_epochs,
        lease_ttl_s=args.lease_ttl,
    )
    worker = UpdateWorker(engine, bundle, llm, tok, device, cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    logging.info("updated %d items", worker.run(idle_exit=args.idle_exit))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from scorer.state import ServingState

    state = ServingState.from_settings(get_settings())
    out = state.rebuild()
    logging.info("rebuilt the index of %s with %d items: %s", state.version, len(state.served.index), out)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not is_loopback(args.host) and get_settings().api_token is None and not args.insecure:
        raise SystemExit(
            f"said serve: refusing to listen on {args.host} without SAID_API_TOKEN: anyone who can "
            "reach it could read the catalogue. Set a token, listen on 127.0.0.1, or pass --insecure."
        )
    # Each worker process builds its own state from the environment (stateless replicas).
    uvicorn.run(
        "scorer.app:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )
    return 0


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _cmd_retrain(args: argparse.Namespace) -> int:
    import threading

    from core.db import make_engine
    from core.metrics import serve_metrics
    from core.versions import activate, require_active
    from updater.retrain import RetrainConfig, retrain_once, run_retrainer

    settings = get_settings()
    engine = make_engine(settings.database_url)
    if args.activate:
        activate(engine, "scorer", args.activate)
        logging.info("scorer %s is active; replicas swap to it within their poll period", args.activate)
        return 0
    from models.llm import pick_device

    device = pick_device(settings.device)
    cfg = from_settings(RetrainConfig, settings, epochs=args.epochs)
    version, out = require_active(engine, "aligner")[0], settings.data_dir / "scorer"
    out.mkdir(parents=True, exist_ok=True)
    if not args.watch:
        retrain_once(engine, version, out, cfg, device)
        return 0
    serve_metrics(settings.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_retrainer(engine, version, out, cfg, device, stop, progress=True)
    return 0


def _cmd_dlq(args: argparse.Namespace) -> int:
    from consumers.dlq_replay import replay_dlq

    try:
        stats = replay_dlq(get_settings(), args.reason, args.max_attempts)
    except ValueError as exc:
        raise SystemExit(f"said dlq replay: {exc}") from None
    logging.info(
        "replayed %d dead-lettered messages; skipped %d of other reasons, left %d at the attempt limit, "
        "%d replayed before",
        stats.replayed,
        stats.skipped,
        stats.exhausted,
        stats.already,
    )
    return 0


def _cmd_topics(args: argparse.Namespace) -> int:
    from said.broker import ensure_topics

    ensure_topics(get_settings().kafka_config(), args.partitions, args.replication, args.min_insync)
    return 0


def build_parser() -> argparse.ArgumentParser:
    s = get_settings()  # every default comes from the settings (and so the environment)
    p = argparse.ArgumentParser(prog="said", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run the embedded Kafka-protocol broker on loopback")
    b.add_argument("--port", type=int, default=9092)
    b.set_defaults(fn=_cmd_broker)

    tp = sub.add_parser("topics", help="create the said topics if absent (idempotent)")
    tp.add_argument("action", choices=["create"])
    tp.add_argument("--partitions", type=int, default=s.kafka_topic_partitions)
    tp.add_argument("--replication", type=int, default=s.kafka_replication_factor)
    tp.add_argument("--min-insync", type=int, default=s.kafka_min_insync_replicas)
    tp.set_defaults(fn=_cmd_topics)

    d = sub.add_parser("db", help="catalogue schema")
    d.add_argument("action", choices=["upgrade"])
    d.add_argument("--revision", default="head")
    d.set_defaults(fn=_cmd_db)

    pr = sub.add_parser("produce", help="replay a data set as item + interaction events")
    pr.add_argument("--dataset", required=True)
    pr.add_argument("--limit", type=int, default=None, help="first N items only")
    pr.set_defaults(fn=_cmd_produce)

    c = sub.add_parser("consume", help="Kafka -> catalogue")
    c.add_argument("topic", choices=["items", "interactions"])
    c.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS")
    c.set_defaults(fn=_cmd_consume)

    e = sub.add_parser("evaluate", help="offline leave-one-out evaluation of scorer variants")
    e.add_argument("--dataset", required=True)
    e.add_argument(
        "--variant",
        nargs="+",
        choices=get_args(Variant),
        default=["id", s.evaluate_variant],
        help="scorer variants (default: the id baseline and SAID_EVALUATE_VARIANT, the best on "
        "validation in benchmarks/quality.py)",
    )
    e.add_argument("--seeds", default="0,1,2", help="comma-separated scorer seeds")
    e.add_argument("--align-seeds", default=str(s.align_seed), help="comma-separated alignment seeds")
    e.add_argument("--cold-fraction", type=float, default=0.1, help="0 skips cold-start")
    e.add_argument("--align-epochs", type=int, default=s.align_epochs)
    e.add_argument("--align-batch", type=int, default=s.align_batch)
    e.add_argument("--scorer-epochs", type=int, default=s.scorer_epochs)
    e.add_argument("--out", type=Path, default=None, help="results JSON path")
    e.set_defaults(fn=_cmd_evaluate)

    a = sub.add_parser("align", help="full SAID alignment of every catalogue item")
    a.add_argument("--epochs", type=int, default=s.align_epochs, help="most passes")
    a.add_argument("--batch", type=int, default=s.align_batch)
    a.set_defaults(fn=_cmd_align)

    u = sub.add_parser("update", help="the streaming worker: align fresh items")
    u.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS")
    u.add_argument("--batch", type=int, default=s.worker_batch)
    u.add_argument("--refine-epochs", type=int, default=s.refine_epochs, help="most passes")
    u.add_argument("--lease-ttl", type=float, default=s.worker_lease_ttl_s, metavar="SECONDS")
    u.set_defaults(fn=_cmd_update)

    ix = sub.add_parser("index", help="FAISS index maintenance")
    ix.add_argument("action", choices=["rebuild"])
    ix.set_defaults(fn=_cmd_index)

    dq = sub.add_parser("dlq", help="dead-letter queue operations")
    dq.add_argument("action", choices=["replay"])
    dq.add_argument("--reason", required=True, help="replay messages whose reason starts so")
    dq.add_argument(
        "--max-attempts",
        type=int,
        default=s.dlq_max_attempts,
        help="leave messages dead-lettered this many times where they are",
    )
    dq.set_defaults(fn=_cmd_dlq)

    rt = sub.add_parser("retrain", help="train the SASRec scorer; promote it if not worse")
    rt.add_argument(
        "--watch",
        action="store_true",
        help="keep running; retrain when SAID_RETRAIN_MIN_* new events arrived",
    )
    rt.add_argument("--epochs", type=int, default=s.retrain_epochs, help="upper bound per retrain")
    rt.add_argument("--activate", metavar="VERSION", help="roll back/forward to a scorer version")
    rt.set_defaults(fn=_cmd_retrain)

    sv = sub.add_parser("serve", help="the HTTP scorer")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (loopback by default)")
    sv.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without SAID_API_TOKEN (an open API: only behind your own auth)",
    )
    sv.add_argument("--port", type=int, default=s.api_port)
    sv.add_argument("--workers", type=int, default=1, help="processes; one per core")
    sv.set_defaults(fn=_cmd_serve)

    dm = sub.add_parser("demo", help="the pipeline end to end on the embedded defaults")
    dm.add_argument("--dataset", default=None, help="default: ../shared/data/amazon-beauty")
    dm.add_argument("--items", type=int, default=s.demo_items, help="size of the item slice")
    dm.add_argument("--align-epochs", type=int, default=s.demo_align_epochs, help="most alignment passes")
    dm.add_argument("--fresh", type=int, default=s.demo_fresh, help="brand-new items to publish")
    dm.add_argument("--port", type=int, default=s.api_port, help="scorer API port")
    dm.add_argument("--keep-serving", action="store_true", help="leave the API up at the end")
    dm.set_defaults(fn=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.debug("settings: %s", get_settings().redacted())  # secrets masked, never logged
    try:
        return args.fn(args)
    except NoActiveVersion as exc:
        logging.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
