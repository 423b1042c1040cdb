"""Validation reasons of single messages (unit level; the DLQ path is in test_consumers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from core.events import Invalid, parse_interaction, parse_item

LATEST = datetime(2100, 1, 1, tzinfo=UTC)

ITEM = {
    "item_id": "a1",
    "title": "Rose lip balm",
    "description": None,
    "advertiser_id": "adv",
    "event_time": "2026-01-01T00:00:00Z",
}
CLICK = {
    "event_id": "e1",
    "user_id": "u1",
    "item_id": "a1",
    "type": "click",
    "event_time": "2026-01-01T00:00:01+00:00",
}


def item_event(**change) -> bytes:
    return json.dumps({**ITEM, **change}).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"\xff\xfe\x00garbage", "invalid_utf8"),
        (b"[1, 2]", "not_an_object"),
        (None, "empty_value"),
        (item_event(title=5), "wrong_type:title"),
        (item_event(title="   "), "empty_field:title"),
        (item_event(title="x" * 600), "too_long:title"),
        (item_event(title="x" * 300, description="y" * 300), "text_too_long"),
        (json.dumps({k: v for k, v in ITEM.items() if k != "item_id"}).encode(), "missing_field:item_id"),
        (item_event(event_time="yesterday"), "bad_time:event_time"),
        (item_event(event_time="2026-01-01T00:00:00"), "bad_time:event_time"),
        (item_event(title="a\x00b"), "nul_char:title"),
        (item_event(event_time="9999-12-31T23:59:59Z"), "future_time"),
        (item_event(event_time="2100-01-01T00:00:01+00:00"), "future_time"),
        (b"[" * 100_000 + b"]" * 100_000, "too_large"),
    ],
)
def test_item_rejections(raw, reason):
    with pytest.raises(Invalid) as err:
        parse_item(raw, max_bytes=64_000, latest=LATEST, max_text_chars=500)
    assert err.value.reason == reason


def test_deep_json_is_rejected_not_crashing():
    raw = b"[" * 20_000 + b"]" * 20_000
    with pytest.raises(Invalid) as err:
        parse_item(raw, max_bytes=64_000, latest=LATEST, max_text_chars=500)
    assert err.value.reason in {"malformed_json", "not_an_object"}


def test_valid_item_text_and_hash():
    ev = parse_item(item_event(description="Tinted"), max_bytes=64_000, latest=LATEST, max_text_chars=500)
    assert ev.text == "Rose lip balm\nTinted"
    assert (
        ev.text_hash
        != parse_item(item_event(), max_bytes=64_000, latest=LATEST, max_text_chars=500).text_hash
    )
    assert ev.event_time.tzinfo is not None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": "like"}, "unknown_enum:type"),
        ({"type": None}, "missing_field:type"),
        ({"user_id": 7}, "wrong_type:user_id"),
        ({"event_time": "9999-01-01T00:00:00Z"}, "future_time"),
    ],
)
def test_interaction_rejections(change, reason):
    with pytest.raises(Invalid) as err:
        parse_interaction(json.dumps({**CLICK, **change}).encode(), max_bytes=64_000, latest=LATEST)
    assert err.value.reason == reason


def test_valid_interaction():
    ev = parse_interaction(json.dumps(CLICK).encode(), max_bytes=64_000, latest=LATEST)
    assert (ev.event_id, ev.type) == ("e1", "click")
