"""``said scorer serve``: the HTTP scorer.

POST /recommend ranks every indexed item for a history (given, or the user's last positive
interactions: ``SAID_POSITIVES``) with the active scorer, the warm/cold composite (cosine
similarity of SAID vectors until a scorer is promoted); a user with no usable history gets
popular and new items in turn, flagged ``fallback``. Fresh items are in the index as soon
as the worker has estimated them, and an item whose text changed leaves the results until
its new text has a vector, as does a paused or withdrawn one. GET /items/{item_id} (with
the text hash of the vector served and the serving state), DELETE /users/{user_id} (forget
a user), /healthz, /readyz, /metrics; the OpenAPI schema is at /openapi.json.

The contract: the bearer scheme declared through FastAPI's security utilities, a typed
model for every response, and every error in one shape, RFC 9457 problem details
(``Problem``, ``application/problem+json``), each route declaring the statuses it returns.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AfterValidator, BaseModel, Field, StringConstraints, model_validator
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core import metrics
from core.catalogue import item_status, user_history
from core.db import read_only
from core.settings import ApiSettings
from core.users import forget
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


def stored_id(value: str, what: str) -> str:
    """An id from a path; one that is not text (a lone surrogate, NUL) was never stored,
    so there is nothing to show or delete: 404."""
    try:
        return unicode_text(value)
    except ValueError as exc:
        raise HTTPException(404, f"unknown {what}: {exc}") from None


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


class Problem(BaseModel):
    """Every error response (RFC 9457 problem details, ``application/problem+json``)."""

    type: str = Field("about:blank", description="No further semantics than the status.")
    title: str = Field(description="The status's phrase.")
    status: int
    detail: str = Field(description="What went wrong, for a person.")
    errors: list[dict] | None = Field(None, description="422 only: each invalid field, where and why.")


PROBLEM_TYPE = "application/problem+json"
ERRORS = {
    401: "missing or wrong bearer token (when SAID_API_TOKEN is set)",
    404: "unknown item or user",
    413: f"request body over {MAX_BODY_BYTES} bytes",
    422: "invalid request: where and why in `errors`",
    503: "database or index unavailable; retry",
}


def declared(*statuses: int) -> dict:
    """OpenAPI ``responses`` of these error statuses, each a ``Problem``."""
    problem_json = {PROBLEM_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    return {
        code: {"model": Problem, "description": ERRORS[code], "content": problem_json} for code in statuses
    }


def problem(
    status: int, detail: str, headers: dict | None = None, errors: list | None = None
) -> JSONResponse:
    """One error response, as problem details."""
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status, headers, media_type=PROBLEM_TYPE)


class ItemInfo(BaseModel):
    item_id: str
    idx: int = Field(description="Dense catalogue index.")
    title: str
    description: str | None
    status: str = Field(description="Alignment: pending, aligned or failed.")
    serving_state: str = Field(description="Its owner's: active, paused or withdrawn.")
    text_hash: str = Field(description="Hash of its current text.")
    embedding: str | None = Field(description="Kind of its vector of the current text (None: none yet).")
    served_text_hash: str | None = Field(description="Text hash of the vector this replica serves.")
    servable: bool = Field(description="This replica ranks it now, by a vector of its current text.")
    aligner_version: str = Field(description="The aligner whose vector of it is described here.")
    loss: float | None = Field(description="Alignment loss of that vector on its text (None: an estimate).")
    reconstruction: str | None = Field(
        description="What the frozen LLM decodes from the vector, stored by its writer (None: not "
        "decoded yet, as for a first estimate)."
    )
    token_accuracy: float | None = Field(description="Teacher-forced token accuracy of the vector.")
    exact: bool | None = Field(description="The reconstruction is its text, token for token.")


class SimilarItems(BaseModel):
    item_id: str
    model_version: str
    items: list[Recommended] = Field(description="Nearest servable items by the served model's score.")


class Forgotten(BaseModel):
    user_id: str
    interactions: int = Field(description="Interactions of the user deleted.")
    parked: int = Field(description="Parked interactions (their item not arrived yet) deleted.")


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
    response = problem(413, ERRORS[413])
    await send(
        {"type": "http.response.start", "status": 413, "headers": [(b"content-type", PROBLEM_TYPE.encode())]}
    )
    await send({"type": "http.response.body", "body": response.body})


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 that says where and why, without echoing the input.

    FastAPI's default handler echoes each offending value, and what Python's JSON parser
    accepts is more than a response can carry back: ``NaN``, ``Infinity`` and ``1e400``
    (float infinity) are not JSON, a lone surrogate is not UTF-8. The echo then fails to
    serialise and the client gets a 500 for its own bad input. Messages and locations are
    made printable too: a location names a field, and an unknown field is any string."""
    errors = [
        {"type": err["type"], "loc": [_printable(part) for part in err["loc"]], "msg": _printable(err["msg"])}
        for err in exc.errors()
    ]
    where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:3])
    return problem(422, f"invalid request: {where}", errors=errors)


async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every HTTPException (ours, and FastAPI's own 404 and 405) as problem details."""
    return problem(exc.status_code, str(exc.detail), exc.headers)


async def database_error(_request: Request, exc: DBAPIError) -> JSONResponse:
    """An outage of the catalogue (unreachable, gone, not a database) is the server's
    state, not a bug: 503 and a retry hint. Any other database error (a constraint, bad
    SQL) is a bug: a 500, logged with its trace, never a "retry"."""
    if isinstance(exc, OperationalError | InterfaceError) or type(exc) is DatabaseError:
        log.warning("database unavailable: %s", type(exc.orig).__name__)
        return problem(503, f"database unavailable: {type(exc.orig).__name__}", {"Retry-After": "1"})
    log.error("database error", exc_info=exc)
    return problem(500, f"internal error: {type(exc).__name__}")


def _printable(part: object) -> str | int:
    """``part`` as JSON-safe text: lone surrogates become their ``\\udXXX`` escape."""
    if isinstance(part, int) and not isinstance(part, bool):
        return part
    return str(part).encode("utf-8", "backslashreplace").decode("utf-8")


BEARER = HTTPBearer(auto_error=False, description="SAID_API_TOKEN, when the scorer has one.")


def bearer_guard(token: str | None):
    """A dependency that admits only ``Authorization: Bearer <token>`` when a token is set,
    declared to OpenAPI as the bearer scheme.

    Without a token the API is open: ``said scorer serve`` allows that only on a loopback address
    (or with an explicit ``--insecure``)."""
    if token is not None and not token.strip():
        raise ValueError("an empty API token would let anyone in; leave it unset or set a real one")

    async def check(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        # async: it never blocks, and a sync dependency costs every request a thread hop
        if token is None:
            return
        given = credentials.credentials.strip() if credentials is not None else None
        if not given or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(engine: Engine, state: ServingState, cfg: ApiSettings) -> FastAPI:
    """The API; with ``cfg.token``, every data endpoint (/recommend, /items) requires it;
    health and metrics stay open (they show no catalogue data). ``state`` is refreshed every
    ``state.cfg.refresh_s`` seconds while the app runs."""
    stop = threading.Event()
    token = cfg.token.get_secret_value() if cfg.token else None
    reads = read_only(engine)  # every route but DELETE /users only reads

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
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(DBAPIError, database_error)

    app.add_middleware(BodyLimitMiddleware)
    app.add_middleware(ObserveMiddleware)  # outermost: it also counts the 413s
    guarded = [Depends(bearer_guard(token))]

    def data_route(method: str, path: str, model: type[BaseModel], *errors: int):
        """A route behind the token, its model and its error statuses (401 and ``errors``) declared."""
        return app.api_route(
            path,
            methods=[method],
            response_model=model,
            dependencies=guarded,
            responses=declared(401, *errors),
        )

    def read_history(user_id: str) -> list[int]:
        with reads.connect() as conn:  # a new user has none: the fallback ranking
            return user_history(conn, user_id, cfg.history_len, state.positives)

    @data_route("POST", "/recommend", RecommendResponse, 413, 422, 503)
    async def recommend(req: RecommendRequest) -> Response:
        """Async, so a request never hops to a thread for its ranking (about a millisecond
        of CPU: model and index), which the 2 cores measured as the largest share after
        the index; only a ``user_id``'s catalogue read goes to the thread pool, so a slow
        database holds up its own request, never the event loop. The body is encoded
        here, in the ``RecommendResponse`` shape the route declares."""
        unknown: list[str] = []
        if req.user_id is not None:
            history = await run_in_threadpool(read_history, req.user_id)
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
        body = {
            "items": [{"item_id": state.item_id[i], "score": s} for i, s in ranked],
            "model_version": version,
            "index_items": size,
            "unknown_items": unknown,
            "fallback": fallback,
        }
        return Response(json.dumps(body, allow_nan=False), media_type="application/json")

    @data_route("GET", "/items/{item_id}", ItemInfo, 404, 422, 503)  # titles of unlaunched items
    def item(item_id: str) -> ItemInfo:
        stored_id(item_id, "item")
        with reads.connect() as conn:
            found = item_status(conn, item_id, state.aligner_version)
        if found is None:
            raise HTTPException(404, f"unknown item {item_id!r}")
        # what this replica serves: the text its vector is of; servable only if that is the
        # item's current text (an old text's vector is out of serving within a refresh)
        served = state.served_text_hash(found["idx"])
        return ItemInfo(**found | {"served_text_hash": served, "servable": served == found["text_hash"]})

    @data_route("GET", "/items/{item_id}/similar", SimilarItems, 404, 422, 503)
    def similar(item_id: str, k: int = Query(10, ge=1, le=100)) -> SimilarItems:
        """The items the served model ranks first after this one alone (a one-item history):
        its neighbours in what users are shown, itself left out."""
        stored_id(item_id, "item")
        idx = state.idx_of.get(item_id)
        if idx is None:
            raise HTTPException(404, f"unknown item {item_id!r}")
        ranked, version, _size, fallback = state.recommend([idx], k, {idx})
        if fallback:  # no vector of it in this replica (yet): nothing to be near to
            raise HTTPException(404, f"item {item_id!r} has no vector in this replica yet")
        items = [Recommended(item_id=state.item_id[i], score=s) for i, s in ranked]
        return SimilarItems(item_id=item_id, model_version=version, items=items)

    @data_route("DELETE", "/users/{user_id}", Forgotten, 404, 422, 503)
    def forget_user(user_id: str) -> Forgotten:
        """Forget a user: every interaction and parked interaction, at once (idempotent:
        a user with nothing left gets zeros). Their next request gets the fallback ranking."""
        stored_id(user_id, "user")
        with engine.begin() as conn:
            gone = forget(conn, user_id)
        log.info("forgot a user: %d interactions, %d parked", gone["interactions"], gone["parked"])
        return Forgotten(user_id=user_id, **gone)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", responses=declared(503))
    def readyz() -> dict:
        try:
            with reads.connect() as conn:
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

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        """The text exposition at /metrics itself: no redirect to /metrics/ (which a
        scraper would have to follow), and still served at /metrics/ for old configs."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics/", prometheus, include_in_schema=False)
    return app
