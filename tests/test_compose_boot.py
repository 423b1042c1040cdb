"""docker-compose.yml booted as local processes (no Docker engine runs here).

Each said service of the file runs as its own process: its command and its environment as
the file gives them, against a local PostgreSQL and the embedded broker, in the order its
``depends_on`` conditions say. What a container has on its own is mapped, and only that:

- the service's host names (``postgres``, ``kafka``) and fixed ports (9100, 8000): each
  container has its own network, processes here share one, so each gets a free port;
- the ``said-data`` volume: one folder all of them share, as the volume is;
- the container's host name: ``$HOSTNAME``, which Docker sets (distinct per replica);
- ``${SECRET:?}`` interpolation from a test ``.env``.

Three values are made small so the boot takes a minute, not an hour (``FOR_SPEED``): the
LLM (a tiny real-tokenizer model), the bootstrap's item count and its alignment passes.

It checks that every long-running service reaches its own healthcheck, that the bootstrap
aligns once and exits 0, that two updater replicas get distinct, stable worker ids, and that
an item published at the end is recommended (the new-user ranking shows fresh items).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from core.events import TOPIC_INTERACTIONS, TOPIC_ITEMS
from said.broker import EmbeddedBroker, free_port
from tests.support.catalogue import NAMES
from tests.support.kafka_util import item_event, produce_json

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "compose-test-token"
ITEMS = 24  # the catalogue published before the end (the bootstrap waits for all of them)
UPDATER_REPLICAS = 2
BOOT_TIMEOUT_S = 420


def _services(compose: dict) -> dict[str, dict]:
    """The said services of the default profile (those built from this repository)."""
    return {n: s for n, s in compose["services"].items() if "build" in s and not s.get("profiles")}


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${NAME}`` / ``${NAME:?message}`` / ``${NAME:-default}`` substitution."""

    def one(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise AssertionError(f"compose needs {name}: {arg}")
        return arg if op == ":-" else ""

    return re.sub(r"\$\{(\w+)(:[?-])?([^}]*)\}", one, value)


def _order(services: dict[str, dict]) -> list[str]:
    """Services in an order that respects ``depends_on`` (on our services)."""
    done: list[str] = []
    while len(done) < len(services):
        for name, svc in services.items():
            deps = [d for d in svc.get("depends_on", {}) if d in services]
            if name not in done and all(d in done for d in deps):
                done.append(name)
    return done


class Stack:
    """The compose services as processes, each with its log file."""

    def __init__(self, tmp: Path, pg_url: str, broker: str, llm: Path) -> None:
        self.tmp, self.procs = tmp, {}
        self.ports: dict[str, dict[int, int]] = {}  # process -> {container port: local port}
        dotenv = {"POSTGRES_PASSWORD": "unused-here", "SAID_API_TOKEN": TOKEN, "GRAFANA_ADMIN_PASSWORD": "x"}
        self.dotenv = dotenv
        self.mapped = {
            "SAID_DATABASE_URL": pg_url,
            "SAID_KAFKA_BOOTSTRAP": broker,
            "SAID_DATA_DIR": str(tmp / "data"),
        }
        self.for_speed = {  # FOR_SPEED
            "SAID_LLM": str(llm),
            "SAID_ALIGN_BOOTSTRAP_MIN_ITEMS": str(ITEMS),
            "SAID_ALIGN_EPOCHS": "2",
        }

    def start(self, name: str, svc: dict, replica: int = 1) -> str:
        proc_name = f"{name}-{replica}"
        ports = {9100: free_port(), 8000: free_port()}
        env = {k: _interpolate(str(v), self.dotenv) for k, v in svc.get("environment", {}).items()}
        assert env.get("SAID_DATABASE_URL", "").startswith("postgresql"), f"{name}: not on PostgreSQL"
        env |= self.mapped
        if "SAID_METRICS_PORT" in env:
            env["SAID_METRICS_PORT"] = str(ports[int(env["SAID_METRICS_PORT"])])
        if name == "bootstrap":
            env |= self.for_speed
        else:
            env |= {k: v for k, v in self.for_speed.items() if k == "SAID_LLM"}
        command = [str(ports.get(int(a), a)) if a.isdigit() else a for a in svc["command"]]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAID_")}
        full_env |= env | {"HOSTNAME": proc_name, "PYTHONUNBUFFERED": "1"}
        log = open(self.tmp / f"{proc_name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[proc_name] = subprocess.Popen(
            [sys.executable, "-m", "said.cli", *command],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ports[proc_name] = ports
        return proc_name

    def restart(self, proc_name: str, svc: dict) -> None:
        """Stop a process and start it again as the same replica (its log starts over)."""
        proc = self.procs[proc_name]
        proc.terminate()
        assert proc.wait(60) == 0, f"{proc_name} did not stop cleanly:\n{self.log(proc_name)}"
        name, replica = proc_name.rsplit("-", 1)
        self.start(name, svc, int(replica))

    def log(self, proc_name: str) -> str:
        return (self.tmp / f"{proc_name}.log").read_text()

    def healthy(self, proc_name: str, svc: dict) -> bool:
        """The service's own compose healthcheck, its ports mapped."""
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD", test
        args = [
            re.sub(r":(9100|8000)/", lambda m: f":{self.ports[proc_name][int(m.group(1))]}/", a)
            for a in test[1:]
        ]
        return subprocess.run([sys.executable, *args[1:]], capture_output=True, timeout=10).returncode == 0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _worker_id(stack: Stack, proc_name: str) -> str:
    """The lease owner id a worker process logged at start (waits for the line)."""
    found: list[str] = []

    def logged() -> bool:
        found[:] = re.findall(r"worker (\S+): aligner", stack.log(proc_name))
        return bool(found)

    _until(logged, f"{proc_name}'s worker id", stack)
    return found[-1]


def _until(condition, what: str, stack: Stack, timeout: float = BOOT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1.0)
    logs = "\n".join(f"--- {p}\n{stack.log(p)[-1500:]}" for p in stack.procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _publish_catalogue(bootstrap: str) -> None:
    produce_json(
        bootstrap, TOPIC_ITEMS, [item_event(i, f"{NAMES[i % 8]} no. {i}") for i in range(ITEMS)], "item_id"
    )
    clicks = [
        {
            "event_id": f"c{u}-{s}",
            "user_id": f"u{u}",
            "item_id": f"i{i}",
            "type": "click",
            "event_time": f"2026-01-01T00:00:{s:02d}Z",
        }
        for u in range(30)
        for s, i in enumerate(range(u % 8, ITEMS, 8))
    ]
    produce_json(bootstrap, TOPIC_INTERACTIONS, clicks, "event_id")


@pytest.mark.slow
@pytest.mark.postgres
def test_the_compose_topology_boots_in_order_and_recommends_a_new_item(pg, tiny_hf_folder, tmp_path):
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = _services(compose)
    broker = EmbeddedBroker(free_port()).start()  # no topics: the `topics` service makes them
    stack = Stack(tmp_path, pg.create_database(), broker.bootstrap, tiny_hf_folder)
    try:
        one_shot: dict[str, str] = {}
        for name in _order(services):
            svc = services[name]
            for dep, cond in svc.get("depends_on", {}).items():
                if dep in one_shot and cond["condition"] == "service_completed_successfully":
                    proc = stack.procs[one_shot[dep]]
                    assert proc.wait(120) == 0, f"{dep} failed:\n{stack.log(one_shot[dep])}"
            replicas = UPDATER_REPLICAS if name == "updater" else 1
            for r in range(1, replicas + 1):
                started = stack.start(name, svc, r)
                if svc.get("restart") in {"no", "on-failure"}:
                    one_shot[name] = started
        waiting = [p for p in stack.procs if p.startswith(("updater", "scorer", "retrainer"))]
        for p in waiting:  # up before the first aligner exists: each says what it waits for
            _until(lambda p=p: "waiting for an active aligner version" in stack.log(p), f"{p} waiting", stack)
        boot = one_shot.get("bootstrap")  # whatever makes the first aligner version
        if boot:
            said = f"waiting for {ITEMS} items"
            _until(lambda: said in stack.log(boot), "the bootstrap waiting for items", stack)
        _publish_catalogue(broker.bootstrap)
        if boot:
            _until(lambda: stack.procs[boot].poll() is not None, "the bootstrap alignment", stack)
            assert stack.procs[boot].returncode == 0, stack.log(boot)
        for proc_name in stack.procs:
            name = proc_name.rsplit("-", 1)[0]
            if "healthcheck" in services[name]:
                _until(
                    lambda p=proc_name, n=name: stack.healthy(p, services[n]), f"{proc_name} healthy", stack
                )
                assert stack.procs[proc_name].poll() is None, f"{proc_name} exited:\n{stack.log(proc_name)}"

        owners = {f"updater-{r}": _worker_id(stack, f"updater-{r}") for r in (1, 2)}
        assert owners == {"updater-1": "updater-updater-1", "updater-2": "updater-updater-2"}, owners
        stack.restart("updater-1", services["updater"])  # a container restart keeps its host name
        assert _worker_id(stack, "updater-1") == "updater-updater-1", "a restart changed the worker id"

        produce_json(
            broker.bootstrap, TOPIC_ITEMS, [item_event(900, "rose lip balm, new this minute")], "item_id"
        )
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{stack.ports['scorer-1'][8000]}",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )

        def recommended() -> bool:  # a new user's ranking shows fresh items (the fallback)
            out = api.post("/recommend", json={"user_id": "someone-new", "k": 10})
            return out.status_code == 200 and "i900" in [x["item_id"] for x in out.json()["items"]]

        _until(recommended, "the new item in a recommendation", stack, timeout=120)
        assert json.loads(api.get("/items/i900").text)["item_id"] == "i900"
    finally:
        stack.stop()
        broker.stop()
