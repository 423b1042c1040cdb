"""The scorer's OpenAPI schema drives schemathesis: no 5xx for any generated request, every
invalid body gets a 4xx with a reason, responses match the schema, and a maximal request
stays fast."""

from __future__ import annotations

import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import settings

from scorer.app import MAX_HISTORY, create_app
from scorer.state import ServingState
from tests.support.catalogue import add_users


@pytest.fixture
def app(aligned):
    engine, bundle, _lm, settings, _data = aligned
    add_users(engine)
    return create_app(engine, ServingState.for_bundle(engine, bundle, settings), settings.api)


@pytest.fixture
def api_schema(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=60, deadline=None)
def test_generated_requests_never_get_a_5xx(case):
    response = case.call()
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json().get("detail"), "a rejection says why"
    case.validate_response(
        response,
        checks=[schemathesis.checks.not_a_server_error, schemathesis.checks.response_schema_conformance],
    )


def test_maximal_request_is_answered_fast(app):
    body = {"history": [f"i{n % 24}" for n in range(MAX_HISTORY)], "k": 100, "exclude_seen": False}
    with TestClient(app) as c:
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
