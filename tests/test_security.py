"""Security: secrets have no defaults and never reach logs, broker/database TLS settings pass
through, SQL is never built from strings, and request bodies are size-limited."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr

from core.settings import SECTIONS, ApiSettings, KafkaSettings, Settings
from scorer.app import MAX_BODY_BYTES, create_app

ROOT = Path(__file__).resolve().parents[1]


def test_secrets_have_no_default_and_print_redacted():
    sections = [getattr(Settings(), name) for name in SECTIONS]
    secret_fields = [
        (type(sec), n)
        for sec in sections
        for n, f in type(sec).model_fields.items()
        if "SecretStr" in str(f.annotation)
    ]
    assert {
        (KafkaSettings, "sasl_password"),
        (ApiSettings, "token"),
        (KafkaSettings, "ssl_key_password"),
    } <= set(secret_fields)
    assert all(cls.model_fields[n].default is None for cls, n in secret_fields)
    s = Settings(
        database_url="postgresql+psycopg://u:hunter2@h/db?sslmode=verify-full",
        kafka_sasl_password="s3cret",
        api_token="t0ken",
        kafka_ssl_key_password="k3y",
    )
    shown = str(s.redacted())
    assert not {"hunter2", "s3cret", "t0ken", "k3y"} & set(re.findall(r"\w+", shown))
    assert "sslmode=verify-full" in shown, "database TLS options pass through in the URL"
    assert isinstance(s.api.token, SecretStr) and "t0ken" not in repr(s)


def test_kafka_sasl_and_tls_settings_pass_through():
    s = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-512",
        kafka_sasl_username="said",
        kafka_sasl_password="pw",
        kafka_ssl_ca_location="/ca.pem",
        kafka_ssl_certificate_location="/c.pem",
        kafka_ssl_key_location="/k.pem",
        kafka_ssl_key_password="kp",
    )
    assert s.kafka.client_config() == {
        "bootstrap.servers": "127.0.0.1:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "said",
        "sasl.password": "pw",
        "ssl.ca.location": "/ca.pem",
        "ssl.certificate.location": "/c.pem",
        "ssl.key.location": "/k.pem",
        "ssl.key.password": "kp",
    }


def test_a_debug_log_of_a_command_shows_no_secret(tmp_path):
    env = os.environ | {
        "SAID_DATABASE_URL": f"sqlite:///{tmp_path}/s.db",
        "SAID_LOG_LEVEL": "DEBUG",
        "SAID_KAFKA_SASL_PASSWORD": "topsecret1",
        "SAID_API_TOKEN": "topsecret2",
    }
    out = subprocess.run(
        [sys.executable, "-m", "said.cli", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    logs = out.stdout + out.stderr
    assert "settings:" in logs and "'***'" in logs, "the settings are logged, masked"
    assert "topsecret1" not in logs and "topsecret2" not in logs


def test_no_sql_is_built_from_strings():
    built = re.compile(r"""(execute|exec_driver_sql|text)\(\s*(f["']|["'][^"']*["']\s*(%|\.format|\+))""")
    offenders = []
    for folder in ("said", "core", "consumers", "updater", "scorer", "training", "models", "migrations"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if built.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    # the one exception: CREATE DATABASE of a generated name in the throwaway test cluster
    assert offenders == [o for o in offenders if o.startswith("tests/support/pgcluster.py")], offenders


def test_request_bodies_are_size_limited(served):
    engine, _, _, state = served
    with TestClient(create_app(engine, state, ApiSettings())) as c:
        big = b'{"history": [' + b'"x",' * (MAX_BODY_BYTES // 4) + b'"x"]}'
        r = c.post("/recommend", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over" in r.json()["detail"]

        def chunks():  # no content-length: the limit is enforced while streaming
            yield b'{"history": ['
            for _ in range(MAX_BODY_BYTES // 400 + 2):
                yield b'"x",' * 100
            yield b'"x"]}'

        r = c.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/recommend", json={"history": ["i0"]}).status_code == 200
        assert 'said_scorer_requests_total{endpoint="other",status="413"}' in c.get("/metrics/").text


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


def test_a_model_file_cannot_run_code_when_loaded(tmp_path, monkeypatch):
    """Anyone who can write a path into model_versions must not get code execution."""
    import pickle

    from core.files import CorruptFile
    from models.bundle import AlignerBundle
    from models.sasrec import load_sasrec

    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "model.pt"
    torch.save({"config": _Exploit()}, bad, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    for load in (lambda: AlignerBundle.load(bad, torch.device("cpu")), lambda: load_sasrec(bad)):
        with pytest.raises(CorruptFile, match="UnpicklingError"):  # refused, never run
            load()
    assert not (tmp_path / "PWNED").exists()
