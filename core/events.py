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


def parse_item(raw: bytes | None, *, max_bytes: int, max_text_chars: int, latest: datetime) -> ItemEvent:
    """Validate a ``said.items`` value or raise :class:`Invalid`; ``latest`` is the
    latest acceptable ``event_time`` (now plus the allowed skew)."""
    obj = _decode(raw, max_bytes)
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
    )


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
