"""docker-compose.yml checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from core.settings import env_names

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SAID_SERVICES = {
    "migrate",
    "topics",
    "bootstrap",
    "retrainer",
    "consumer-items",
    "consumer-interactions",
    "updater",
    "updater-gpu",
    "scorer",
}


def test_every_said_env_key_is_a_setting():
    known = set(env_names())
    for name, svc in COMPOSE["services"].items():
        keys = {k for k in svc.get("environment", {}) if k.startswith("SAID_")}
        assert keys <= known, f"{name}: unknown settings {keys - known}"
    assert SAID_SERVICES <= set(COMPOSE["services"])


def test_every_referenced_file_exists_and_images_are_pinned():
    for name, svc in COMPOSE["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./"):
                assert (ROOT / src).exists(), f"{name}: {src} missing"
        if "build" in svc:
            assert (ROOT / "Dockerfile").exists()
        else:
            assert re.search(r":[\w.]+$", svc["image"]) and not svc["image"].endswith(":latest")
    for cmd in (svc.get("command") for svc in COMPOSE["services"].values()):
        if cmd:
            from said.cli import build_parser

            build_parser().parse_args(cmd)  # every service's command is a valid CLI call


def test_prometheus_scrapes_every_service_on_its_port():
    prom = yaml.safe_load((ROOT / "ops/prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    services = COMPOSE["services"]
    for name in ("consumer-items", "consumer-interactions", "updater"):
        port = services[name]["environment"]["SAID_METRICS_PORT"]
        assert f"{name}:{port}" in targets
    assert "scorer:8000" in targets and "127.0.0.1:8000:8000" in services["scorer"]["ports"]
    assert "/etc/prometheus/alerts.yml" in prom["rule_files"]


def test_dockerfile_runs_as_non_root():
    assert re.search(r"^USER (?!root)\w+", (ROOT / "Dockerfile").read_text(), re.M)


def test_nothing_is_published_open_and_every_secret_is_required():
    services = COMPOSE["services"]
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    required = {
        ("scorer", "SAID_API_TOKEN"): "${SAID_API_TOKEN:?",
        ("grafana", "GF_SECURITY_ADMIN_PASSWORD"): "${GRAFANA_ADMIN_PASSWORD:?",
        ("postgres", "POSTGRES_PASSWORD"): "${POSTGRES_PASSWORD:?",
    }
    for (name, key), prefix in required.items():
        assert str(services[name]["environment"][key]).startswith(prefix), f"{name}: {key} not required"
    assert services["grafana"]["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_replicable_workers_get_distinct_lease_owners_stable_across_restarts():
    """Compose gives every replica the same environment; Docker gives each its own hostname."""
    from updater.worker import worker_owner

    for name in ("updater", "updater-gpu"):
        configured = COMPOSE["services"][name]["environment"].get("SAID_WORKER_ID")
        first = [worker_owner(configured, host, 1) for host in ("3f2a9c1b7d4e", "8e1d0a6c5b2f")]
        restarted = [worker_owner(configured, host, 9) for host in ("3f2a9c1b7d4e", "8e1d0a6c5b2f")]
        assert len(set(first)) == 2 and restarted == first, f"{name}: {first} then {restarted}"


def test_the_gpu_updater_builds_a_cuda_torch_and_every_secret_is_in_the_env_example():
    gpu = COMPOSE["services"]["updater-gpu"]
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX_URL"].rsplit("/", 1)[-1]
    assert gpu["image"] != COMPOSE["services"]["updater"]["image"]  # never the CPU image
    assert "ARG TORCH_INDEX_URL" in (ROOT / "Dockerfile").read_text()
    text = (ROOT / "docker-compose.yml").read_text()
    example = (ROOT / ".env.example").read_text()
    for secret in set(re.findall(r"\$\{(\w+):\?", text)):
        assert re.search(rf"^{secret}=", example, re.M), f"{secret} missing from .env.example"


def test_kafka_has_a_host_listener_and_stateful_services_keep_volumes():
    kafka = COMPOSE["services"]["kafka"]
    assert "localhost:9094" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert "127.0.0.1:9094:9094" in kafka["ports"]
    for name, path in (("prometheus", ":/prometheus"), ("grafana", ":/var/lib/grafana")):
        assert any(v.endswith(path) and not v.startswith("./") for v in COMPOSE["services"][name]["volumes"])
