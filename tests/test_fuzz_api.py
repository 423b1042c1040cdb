"""The scorer's OpenAPI schema drives schemathesis: no 5xx for any generated request, every
invalid body gets a 4xx with a reason, responses match the schema, and a maximal request
stays fast. Everything is sent with the API token, so the requests reach the handlers, and
hostile bodies that no schema generates (lone surrogates, NaN and infinities, which
Python's JSON parser accepts) are sent as raw bytes."""

from __future__ import annotations

import json
import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scorer.app import MAX_HISTORY, create_app
from scorer.state import ServingState
from tests.support.catalogue import add_users

TOKEN = "fuzz-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def app(aligned):
    engine, bundle, _lm, cfg, _data = aligned
    add_users(engine)
    state = ServingState.for_bundle(engine, bundle, cfg)
    return create_app(engine, state, cfg.override(api_token=TOKEN).api)


@pytest.fixture
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None)
def test_generated_requests_never_get_a_5xx(case):
    response = case.call(headers=AUTH)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json().get("detail"), "a rejection says why"
    case.validate_response(
        response,
        checks=[schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance],
    )


# JSON text fragments: json.dumps escapes a lone surrogate as \udXXX, which the parser reads
# back as one; the number tokens are what Python's parser turns into nan and +-inf.
SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
STRINGS = st.one_of(
    st.text(max_size=8),
    st.lists(st.one_of(SURROGATES, st.characters()), min_size=1, max_size=4).map("".join),
).map(json.dumps)
NUMBERS = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "1.5"]),
    st.integers(-(10**30), 10**30).map(str),
)
SCALARS = st.one_of(STRINGS, NUMBERS, st.sampled_from(["true", "null"]))
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]"))
FIELDS = st.sampled_from(["user_id", "history", "k", "exclude_seen"]).map(json.dumps) | STRINGS
BODIES = st.dictionaries(FIELDS, VALUES, max_size=5).map(
    lambda d: "{" + ",".join(f"{k}: {v}" for k, v in d.items()) + "}"
)
# issue 23.4: each gave a 500 (the echo of the input could not be serialised)
KNOWN_500S = [
    '{"history": ["\\ud800"]}',  # echoed back in unknown_items
    '{"history": ["i1", "x\\udfff"], "k": 3}',
    '{"history": ["i1"], "k": NaN}',  # a 422 that echoes its input
    '{"history": ["i1"], "k": 1e400}',
    '{"history": ["i1"], "exclude_seen": -Infinity}',
    '{"user_id": "\\udc80"}',
    '{"user_id": "\\ud800", "history": ["i1"]}',
    '{"user_id": "u\\u0000"}',  # PostgreSQL text cannot hold NUL: DataError on the lookup
    '{"history": ["i\\u0000"]}',
]


def _post(client: TestClient, body: str):
    return client.post(
        "/recommend", content=body.encode(), headers=AUTH | {"content-type": "application/json"}
    )


def _assert_rejected_with_a_reason_or_served(response) -> None:
    assert response.status_code < 500, response.text
    answer = json.loads(response.content)  # strict: valid UTF-8, no NaN
    if response.status_code >= 400:
        assert answer.get("detail"), "a rejection says why"


def test_known_hostile_bodies_get_a_4xx_with_a_reason(app):
    with TestClient(app, raise_server_exceptions=False) as client:
        answers = {body: _post(client, body) for body in KNOWN_500S}
    assert {b: r.status_code for b, r in answers.items() if not 400 <= r.status_code < 500} == {}
    for response in answers.values():
        _assert_rejected_with_a_reason_or_served(response)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/items/i%00", headers=AUTH)
    assert r.status_code == 404 and r.json()["detail"], "an id with NUL is unknown, not a 500"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=BODIES)
def test_hostile_bodies_never_get_a_5xx(app, body):
    with TestClient(app, raise_server_exceptions=False) as client:
        _assert_rejected_with_a_reason_or_served(_post(client, body))


def test_maximal_request_is_answered_fast(app):
    body = {"history": [f"i{n % 24}" for n in range(MAX_HISTORY)], "k": 100, "exclude_seen": False}
    with TestClient(app, headers=AUTH) as c:
        took = []
        for _ in range(20):
            t0 = time.perf_counter()
            r = c.post("/recommend", json=body)
            took.append(time.perf_counter() - t0)
            assert r.status_code == 200
        over = c.post(
            "/recommend",
            content=b'{"history": [' + b'"x",' * 100_000 + b'"x"]}',
            headers={"content-type": "application/json"},
        )
    assert over.status_code == 413 and over.json()["detail"], "bodies are size-limited"
    assert sorted(took)[len(took) // 2] < 0.25, f"median {sorted(took)[10]:.3f}s for a maximal request"
