"""``said serve``: the HTTP scorer.

POST /recommend ranks every indexed item for a history (given, or the user's last positive
interactions: ``SAID_POSITIVES``) with the active scorer, the warm/cold composite (cosine
similarity of SAID vectors until a scorer is promoted); a user with no usable history gets
popular and new items in turn, flagged ``fallback``. Fresh items are in the index as soon
as the worker has estimated them, and an item whose text changed leaves the results until
its new text has a vector. GET /items/{item_id} (with the text hash of the vector served), /healthz, /readyz,
/metrics; the OpenAPI schema is at /openapi.json.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import make_asgi_app
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, model_validator
from sqlalchemy import text
from sqlalchemy.engine import Engine

from core import metrics
from core.catalogue import item_status, user_history
from core.settings import ApiSettings
from scorer.state import ServingState

log = logging.getLogger(__name__)
MAX_HISTORY = 200
MAX_BODY_BYTES = 64 * 1024  # a maximal valid request is ~10 KB


def unicode_text(value: str) -> str:
    """Refuses lone surrogates and NUL. JSON's ``\\udXXX`` escapes can carry surrogates,
    and Python's parser lets them through, but they are not text: UTF-8 has no bytes for
    them, so the catalogue cannot look them up and a response that echoes one cannot be
    serialised. PostgreSQL text cannot hold NUL (``\\u0000``): no id contains one."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    if "\x00" in value:
        raise ValueError("not valid text (a NUL character)")
    return value


Text = Annotated[str, AfterValidator(unicode_text)]
UserId = Annotated[str, StringConstraints(max_length=256), AfterValidator(unicode_text)]


class RecommendRequest(BaseModel):
    user_id: UserId | None = None
    history: list[Text] | None = Field(None, max_length=MAX_HISTORY)
    k: int = Field(10, ge=1, le=100)
    exclude_seen: bool = True

    @model_validator(mode="after")
    def one_source(self) -> RecommendRequest:
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id or history")
        return self


class Recommended(BaseModel):
    item_id: str
    score: float


class RecommendResponse(BaseModel):
    items: list[Recommended]
    model_version: str
    index_items: int
    unknown_items: list[str]
    fallback: bool = Field(
        False,
        description="No usable history (a new user, or none of its items served yet): popular "
        "items and the newest ones in turn, not a personal ranking.",
    )


class ObserveMiddleware:
    """Counts every response by route template (bounded labels) and status, 5xx included.

    A plain ASGI middleware, so that it also sees responses of unhandled exceptions.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def send_and_record(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            endpoint = getattr(scope.get("route"), "path", "other")
            metrics.SCORER_REQUESTS.labels(endpoint, str(status[0])).inc()
            metrics.SCORER_SECONDS.labels(endpoint).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """Rejects request bodies over ``MAX_BODY_BYTES`` with 413, by header or while streaming,
    before any of it is parsed: a client cannot make the server buffer a huge body."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            await _too_large(send)
            return
        seen, answered = [0], [False]

        async def counted():
            message = await receive()
            seen[0] += len(message.get("body", b""))
            if seen[0] > MAX_BODY_BYTES and not answered[0]:
                answered[0] = True
                await _too_large(send)
                return {"type": "http.disconnect"}  # the app stops reading; its reply is dropped
            return message

        async def send_unless_answered(message) -> None:
            if not answered[0]:
                await send(message)

        await self.app(scope, counted, send_unless_answered)


async def _too_large(send) -> None:
    body = json.dumps({"detail": f"request body over {MAX_BODY_BYTES} bytes"}).encode()
    await send(
        {"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 that says where and why, without echoing the input.

    FastAPI's default handler echoes each offending value, and what Python's JSON parser
    accepts is more than a response can carry back: ``NaN``, ``Infinity`` and ``1e400``
    (float infinity) are not JSON, a lone surrogate is not UTF-8. The echo then fails to
    serialise and the client gets a 500 for its own bad input. Messages and locations are
    made printable too: a location names a field, and an unknown field is any string."""
    detail = [
        {"type": err["type"], "loc": [_printable(part) for part in err["loc"]], "msg": _printable(err["msg"])}
        for err in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


def _printable(part: object) -> str | int:
    """``part`` as JSON-safe text: lone surrogates become their ``\\udXXX`` escape."""
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    return str(part).encode("utf-8", "backslashreplace").decode("utf-8")


def bearer_credentials(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None.

    RFC 7235: the scheme is case-insensitive and separated from the credentials by
    whitespace; a bare token with no scheme, or another scheme, is not a bearer token."""
    scheme, _, credentials = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def bearer_guard(token: str | None):
    """A dependency that admits only ``Authorization: Bearer <token>`` when a token is set.

    Without a token the API is open: ``said serve`` allows that only on a loopback address
    (or with an explicit ``--insecure``)."""
    if token is not None and not token.strip():
        raise ValueError("an empty API token would let anyone in; leave it unset or set a real one")

    def check(authorization: str | None = Header(None)) -> None:
        if token is None:
            return
        given = bearer_credentials(authorization)
        if given is None or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(engine: Engine, state: ServingState, cfg: ApiSettings) -> FastAPI:
    """The API; with ``cfg.token``, every data endpoint (/recommend, /items) requires it;
    health and metrics stay open (they show no catalogue data). ``state`` is refreshed every
    ``state.cfg.refresh_s`` seconds while the app runs."""
    stop = threading.Event()
    token = cfg.token.get_secret_value() if cfg.token else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        refresher = threading.Thread(
            target=state.run_refresher, args=(state.cfg.refresh_s, stop), daemon=True
        )
        refresher.start()
        yield
        stop.set()

    app = FastAPI(title="SAID scorer", version="1", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.mount("/metrics", make_asgi_app())

    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(ObserveMiddleware)  # outermost: it also counts the 413s
    guarded = [Depends(bearer_guard(token))]

    @app.post("/recommend", response_model=RecommendResponse, dependencies=guarded)
    def recommend(req: RecommendRequest) -> RecommendResponse:
        unknown: list[str] = []
        if req.user_id is not None:
            with engine.connect() as conn:  # a new user has none: the fallback ranking
                history = user_history(conn, req.user_id, cfg.history_len, state.positives)
        else:
            history = []
            for item_id in req.history:
                idx = state.idx_of.get(item_id)
                if idx is None:
                    unknown.append(item_id)
                else:
                    history.append(idx)
        exclude = set(history) if req.exclude_seen else set()
        ranked, version, size, fallback = state.recommend(history, req.k, exclude)
        return RecommendResponse(
            items=[Recommended(item_id=state.item_id[i], score=s) for i, s in ranked],
            model_version=version,
            index_items=size,
            unknown_items=unknown,
            fallback=fallback,
        )

    @app.get("/items/{item_id}", dependencies=guarded)  # it shows titles of unlaunched items
    def item(item_id: str) -> dict:
        try:
            unicode_text(item_id)
        except ValueError as exc:  # such an id was never stored: nothing to show
            raise HTTPException(404, f"unknown item: {exc}") from None
        with engine.connect() as conn:
            found = item_status(conn, item_id, state.aligner_version)
        if found is None:
            raise HTTPException(404, f"unknown item {item_id!r}")
        # what this replica serves: the text its vector is of; servable only if that is the
        # item's current text (an old text's vector is out of serving within a refresh)
        served = state.served_text_hash(found["idx"])
        return found | {"served_text_hash": served, "servable": served == found["text_hash"]}

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:
            raise HTTPException(503, f"database unavailable: {type(exc).__name__}") from exc
        size = len(state.served.index)
        if size == 0:
            raise HTTPException(503, "index is empty")
        return {
            "status": "ready",
            "index_items": size,
            "model_version": state.version,
            "aligner_version": state.aligner_version,
            "refreshed_at": state.refreshed_at,
            "problems": state.problems,  # active versions not served, and why (also a metric)
        }

    return app
