"""The DLQ copy of a message always fits the producer's limit and never fails to build."""

from __future__ import annotations

from consumers.dead_letter import ATTEMPTS, StoredMessage, attempts, dlq_copy, message_record


def _message(key=b"k", value=b"v", headers=()) -> StoredMessage:
    """A message as the catalogue stores it, rebuilt: the same accessors as Kafka's."""
    return StoredMessage(message_record(_Raw(key, value, list(headers))))


class _Raw:
    """The accessors of ``confluent_kafka.Message`` that dead-lettering reads."""

    def __init__(self, key, value, headers):
        self._k, self._v, self._h = key, value, headers

    def topic(self):
        return "said.items"

    def partition(self):
        return 0

    def offset(self):
        return 7

    def key(self):
        return self._k

    def value(self):
        return self._v

    def headers(self):
        return self._h

    def timestamp(self):
        return (1, 1_700_000_000_000)


def _size(copy: dict) -> int:
    return (
        len(copy["key"] or b"")
        + len(copy["value"] or b"")
        + sum(len(k) + len(v or b"") for k, v in copy["headers"])
    )


def test_unreadable_attempts_headers_count_as_none():
    for raw in ("²", "9" * 5000, "-1", "x", None):
        assert attempts([(ATTEMPTS, None if raw is None else raw.encode())]) == 0
    assert attempts([(ATTEMPTS, b"3")]) == 3


def test_the_copy_fits_the_limit_whatever_the_key_and_headers():
    limit = 10_000
    cases = [
        _message(value=b"x" * 50_000),
        _message(key=b"k" * 9_000, value=b"x" * 50_000),
        _message(value=b"x" * 50_000, headers=[("big", b"h" * 20_000), ("null", None)]),
    ]
    for msg in cases:
        copy = dlq_copy(msg, "too_large", limit)
        headers = dict(copy["headers"])
        assert _size(copy) <= limit and headers["said-error"] == b"too_large"
        assert headers["said-truncated-from"] == b"50000" and copy["timestamp"] == 1_700_000_000_000
    small = dlq_copy(_message(headers=[("trace", b"t"), ("null", None)]), "malformed_json", limit)
    assert (
        small["value"] == b"v" and ("trace", b"t") in small["headers"] and ("null", None) in small["headers"]
    )
