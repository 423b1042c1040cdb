"""Event schemas of the topics and their validation.

Validation is hand-written rather than pydantic because it runs on every message of a
30k-events/s stream, and because each rejection needs a short stable reason code for the
DLQ header (``said-error``) that operators can grep and count.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

from core.tables import INTERACTION_TYPES

TOPIC_ITEMS = "said.items"
TOPIC_INTERACTIONS = "said.interactions"
TOPIC_DLQ = "said.dlq"
# Whether an owner lets an item be recommended (``items.serving_state``; not its alignment
# ``status``). The order breaks ties between changes of one item at equal times: the more
# restrictive wins, so every delivery order of the same events ends in the same state.
SERVING_STATES = ("active", "paused", "withdrawn")


class Invalid(ValueError):
    """A message that can never be processed; ``reason`` goes into the DLQ header."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ItemEvent:
    item_id: str
    title: str
    description: str | None
    advertiser_id: str | None
    event_time: datetime
    serving: str | None = None  # the event's ``status``; None: leaves the serving state as it is

    @property
    def text(self) -> str:
        """The text the LLM must reproduce: title, then description when present."""
        return item_text(self.title, self.description)

    @property
    def text_hash(self) -> str:
        return text_hash(self.text)

    @property
    def version(self) -> tuple[datetime, str]:
        """Which of two events of one item wins: the later ``event_time``, and between equal
        times the greater content hash. A rule on content alone, so every delivery order
        of the same events (replays, duplicates, shuffles) ends with the same row."""
        return self.event_time, content_hash(self.title, self.description, self.advertiser_id)


@dataclass(frozen=True, slots=True)
class ServingEvent:
    """An owner's change of whether an item may be recommended: the ``status`` of an item
    event, or a tombstone (the item id as key, no value: withdrawn at its timestamp)."""

    item_id: str
    state: str  # one of SERVING_STATES
    event_time: datetime

    @property
    def version(self) -> tuple[datetime, int]:
        """Which of two changes of one item wins: the later, then the more restrictive. A
        late older event never undoes a newer withdrawal."""
        return self.event_time, SERVING_STATES.index(self.state)


@dataclass(frozen=True, slots=True)
class InteractionEvent:
    event_id: str
    user_id: str
    item_id: str
    type: str
    event_time: datetime


def item_text(title: str, description: str | None) -> str:
    """The text an item is aligned on: its title, then its description on a new line."""
    return title if not description else f"{title}\n{description}"


def text_hash(text: str) -> str:
    """Stable fingerprint of an item's text; a change means the item must be re-aligned."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def content_hash(title: str, description: str | None, advertiser_id: str | None) -> str:
    """Fingerprint of everything an item event stores (the tie-break of equal times)."""
    return hashlib.sha256(json.dumps([title, description, advertiser_id]).encode()).hexdigest()


def _decode(raw: bytes | None, max_bytes: int) -> dict:
    if raw is None:
        raise Invalid("empty_value")
    if len(raw) > max_bytes:
        raise Invalid("too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("invalid_utf8") from None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):  # bad syntax, too deep, or an int over 4300 digits
        raise Invalid("malformed_json") from None
    if not isinstance(obj, dict):
        raise Invalid("not_an_object")
    return obj


def _str(obj: dict, key: str, *, optional: bool = False, max_len: int = 256) -> str | None:
    value = obj.get(key)  # absent or null alike
    if value is None:
        if optional:
            return None
        raise Invalid(f"missing_field:{key}")
    if not isinstance(value, str):
        raise Invalid(f"wrong_type:{key}")
    if not optional and not value.strip():
        raise Invalid(f"empty_field:{key}")
    if len(value) > max_len:
        raise Invalid(f"too_long:{key}")
    if "\x00" in value:  # PostgreSQL text cannot hold NUL; reject instead of crashing later
        raise Invalid(f"nul_char:{key}")
    if value.isascii():  # the common case, and ASCII holds no surrogate: skip the encode
        return value
    try:  # JSON escapes can smuggle in lone surrogates, which no database can store
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"invalid_unicode:{key}") from None
    return value


def _time(obj: dict, latest: datetime) -> datetime:
    """``event_time`` in UTC; later than ``latest`` (now plus the allowed clock skew) is
    refused: an item stamped in year 9999 would otherwise win every later update."""
    raw = _str(obj, "event_time", max_len=64)
    try:
        ts = datetime.fromisoformat(raw)
    except ValueError:
        raise Invalid("bad_time:event_time") from None
    if ts.tzinfo is None:
        raise Invalid("bad_time:event_time")  # RFC 3339 requires an offset
    try:
        ts = ts.astimezone(UTC)  # year 1 at +14:00 has no UTC instant: reject, not crash
    except OverflowError:
        raise Invalid("bad_time:event_time") from None
    if ts > latest:
        raise Invalid("future_time")
    return ts


def parse_item(
    raw: bytes | None, *, max_bytes: int, max_text_chars: int, latest: datetime
) -> ItemEvent | ServingEvent:
    """Validate a ``said.items`` value or raise :class:`Invalid`; ``latest`` is the
    latest acceptable ``event_time`` (now plus the allowed skew). An event with a
    ``status`` and no text only changes the item's serving state (``ServingEvent``)."""
    obj = _decode(raw, max_bytes)
    serving = _str(obj, "status", optional=True, max_len=32)
    if serving is not None and serving not in SERVING_STATES:
        raise Invalid("unknown_enum:status")
    if serving is not None and obj.get("title") is None and obj.get("description") is None:
        return ServingEvent(_str(obj, "item_id"), serving, _time(obj, latest))
    title = _str(obj, "title", max_len=max_text_chars)
    description = _str(obj, "description", optional=True, max_len=max_text_chars)
    if len(title) + len(description or "") > max_text_chars:
        raise Invalid("text_too_long")
    return ItemEvent(
        item_id=_str(obj, "item_id"),
        title=title,
        description=description or None,
        advertiser_id=_str(obj, "advertiser_id", optional=True),
        event_time=_time(obj, latest),
        serving=serving,
    )


def parse_tombstone(key: bytes | None, timestamp_ms: int | None, latest: datetime) -> ServingEvent:
    """A ``said.items`` message with no value: the keyed item is withdrawn, as of the
    message's timestamp (``None``: the broker gave none, so it cannot be ordered)."""
    if not key:
        raise Invalid("empty_value")  # no value and no key: nothing to withdraw
    try:
        item_id = _str({"key": key.decode("utf-8")}, "key")
    except UnicodeDecodeError:
        raise Invalid("invalid_utf8:key") from None
    if timestamp_ms is None:
        raise Invalid("missing_timestamp")
    try:
        at = datetime.fromtimestamp(timestamp_ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        raise Invalid("bad_time:timestamp") from None
    if at > latest:
        raise Invalid("future_time")
    return ServingEvent(item_id, "withdrawn", at)


def parse_interaction(raw: bytes | None, *, max_bytes: int, latest: datetime) -> InteractionEvent:
    """Validate a ``said.interactions`` value or raise :class:`Invalid` (``latest``: as
    for :func:`parse_item`)."""
    obj = _decode(raw, max_bytes)
    kind = _str(obj, "type", max_len=32)
    if kind not in INTERACTION_TYPES:
        raise Invalid("unknown_enum:type")
    return InteractionEvent(
        event_id=_str(obj, "event_id"),
        user_id=_str(obj, "user_id"),
        item_id=_str(obj, "item_id"),
        type=kind,
        event_time=_time(obj, latest),
    )
