"""What a dead-lettered message looks like on ``said.dlq``, in one place.

The DLQ copy keeps everything needed to understand and replay the original: its key, its
headers, its timestamp and (up to a bound) its value. Our own ``said-*`` headers add the
reason, where it came from and how many times it has been dead-lettered. The value is cut
to ``max_value_bytes``: an oversized message must still fit the producer's limit, or the
DLQ write itself would fail and crash-loop the partition.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, Message

ERROR = "said-error"
SOURCE_TOPIC = "said-source-topic"
ATTEMPTS = "said-attempts"
TRUNCATED_FROM = "said-truncated-from"  # original value length, when the copy is a prefix
HEADERS_DROPPED = "said-headers-dropped"  # original headers too large to keep (their count)
OURS = (ERROR, SOURCE_TOPIC, "said-partition", "said-offset", TRUNCATED_FROM, HEADERS_DROPPED)


def header(headers: list[tuple[str, bytes | None]] | None, name: str) -> str | None:
    """The last value of ``name`` as text; None if absent or null (a null value is legal)."""
    found = None
    for key, value in headers or []:
        if key == name:
            found = None if value is None else value.decode("utf-8", "replace")
    return found


def attempts(headers: list[tuple[str, bytes | None]] | None) -> int:
    """How many times the message was dead-lettered before (0 if never, or unreadable)."""
    raw = header(headers, ATTEMPTS)
    ok = raw is not None and raw.isascii() and raw.isdigit() and len(raw) < 10  # not "²", not 5k digits
    return int(raw) if ok else 0


def dlq_copy(msg: Message, reason: str, max_value_bytes: int) -> dict:
    """``Producer.produce`` keyword arguments of ``msg``'s DLQ copy."""
    original = [(k, v) for k, v in (msg.headers() or []) if k not in OURS and k != ATTEMPTS]
    key, value = msg.key(), msg.value()
    ours = [
        (ERROR, reason.encode()),
        (SOURCE_TOPIC, msg.topic().encode()),
        ("said-partition", str(msg.partition()).encode()),
        ("said-offset", str(msg.offset()).encode()),
        (ATTEMPTS, str(attempts(msg.headers()) + 1).encode()),
    ]
    # the whole record must fit: key and headers count too, and cannot crowd out the reason
    if _size(key, original) > max_value_bytes // 2:
        ours.append((HEADERS_DROPPED, str(len(original)).encode()))
        original, key = [], None if key is None else key[:1024]
    room = max(0, max_value_bytes - _size(key, original + ours))
    if value is not None and len(value) > room:
        ours.append((TRUNCATED_FROM, str(len(value)).encode()))
        value = value[:room]
    return {"key": key, "value": value, "headers": original + ours} | _timestamp(msg)


def _size(key: bytes | None, headers: list[tuple[str, bytes | None]]) -> int:
    return len(key or b"") + sum(len(k) + len(v or b"") + 16 for k, v in headers)


def replay_copy(msg: Message) -> dict:
    """``Producer.produce`` keyword arguments that put a DLQ message back on its source
    topic: the original key, value, headers and timestamp, and the attempts so far."""
    headers = [(k, v) for k, v in (msg.headers() or []) if k not in OURS]
    return {"key": msg.key(), "value": msg.value(), "headers": headers} | _timestamp(msg)


def _timestamp(msg: Message) -> dict:
    ts_type, ts = msg.timestamp()
    return {} if ts_type == TIMESTAMP_NOT_AVAILABLE else {"timestamp": ts}


def message_record(msg: Message) -> dict:
    """A JSON-safe copy of ``msg`` (bytes as base64), to keep it in the catalogue."""
    ts_type, ts = msg.timestamp()
    return {
        "topic": msg.topic(),
        "partition": msg.partition(),
        "offset": msg.offset(),
        "timestamp": ts if ts_type != TIMESTAMP_NOT_AVAILABLE else None,
        "key": _b64(msg.key()),
        "value": _b64(msg.value()),
        "headers": [[k, _b64(v)] for k, v in (msg.headers() or [])],
    }


@dataclass(frozen=True)
class StoredMessage:
    """A message rebuilt from :func:`message_record`, with the accessors of
    ``confluent_kafka.Message`` that dead-lettering uses."""

    record: dict

    def topic(self) -> str:
        return self.record["topic"]

    def partition(self) -> int:
        return self.record["partition"]

    def offset(self) -> int:
        return self.record["offset"]

    def key(self) -> bytes | None:
        return _unb64(self.record["key"])

    def value(self) -> bytes | None:
        return _unb64(self.record["value"])

    def headers(self) -> list[tuple[str, bytes | None]]:
        return [(k, _unb64(v)) for k, v in self.record["headers"]]

    def timestamp(self) -> tuple[int, int]:
        ts = self.record["timestamp"]
        return (TIMESTAMP_NOT_AVAILABLE, 0) if ts is None else (TIMESTAMP_CREATE_TIME, ts)


def _b64(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)
