"""The API's contract (issue 25): the bearer scheme declared, a typed model for every
response, every error status declared and returned in one shape (RFC 9457 problem
details), and /metrics without a redirect. Through HTTP, on the real catalogue."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from core.settings import ApiSettings
from scorer.app import MAX_BODY_BYTES, create_app

AUTH = {"Authorization": "Bearer s3cret"}
PROBLEM = {"type", "title", "status", "detail"}


def _problem(r, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert PROBLEM <= body.keys() and body["status"] == status and body["detail"], body
    return body


def test_openapi_declares_the_scheme_the_models_and_every_error(served):
    engine, _bundle, _data, state = served
    with TestClient(create_app(engine, state, ApiSettings(token="s3cret"))) as client:
        doc = client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["HTTPBearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "SAID_API_TOKEN, when the scorer has one.",
    }
    routes = {
        ("/recommend", "post"): {"200", "401", "413", "422", "503"},
        ("/items/{item_id}", "get"): {"200", "401", "404", "422", "503"},
        ("/users/{user_id}", "delete"): {"200", "401", "404", "422", "503"},
    }
    for (path, method), statuses in routes.items():
        op = doc["paths"][path][method]
        assert op["security"] == [{"HTTPBearer": []}], path
        assert set(op["responses"]) == statuses, (path, set(op["responses"]))
        for code in statuses - {"200"}:
            ref = op["responses"][code]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/Problem"), (path, code)
        assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]  # a typed model
    assert "authorization" not in str(doc["paths"]["/recommend"]["post"].get("parameters", []))
    assert "/metrics" not in doc["paths"]


def test_every_error_is_a_problem_and_metrics_do_not_redirect(served, db_url):
    engine, _bundle, _data, state = served
    with TestClient(create_app(engine, state, ApiSettings(token="s3cret"))) as client:
        r = client.post("/recommend", json={"history": ["i1"]})
        assert _problem(r, 401) and r.headers["www-authenticate"] == "Bearer"
        _problem(
            client.post("/recommend", json={"history": ["i1"]}, headers={"Authorization": "Bearer no"}), 401
        )
        _problem(client.get("/items/nope", headers=AUTH), 404)
        _problem(client.get("/no/such/route"), 404)
        bad = _problem(client.post("/recommend", json={"k": 0, "history": []}, headers=AUTH), 422)
        assert bad["errors"] and {"loc", "msg", "type"} <= bad["errors"][0].keys()
        big = "x" * (MAX_BODY_BYTES + 1)
        _problem(
            client.post("/recommend", content=big, headers=AUTH | {"content-type": "application/json"}), 413
        )

        item = client.get("/items/i3", headers=AUTH).json()
        assert item["serving_state"] == "active" and item["servable"] and item["status"] == "aligned"
        r = client.get("/metrics", follow_redirects=False)
        assert r.status_code == 200 and "said_index_items" in r.text
        assert client.get("/metrics/", follow_redirects=False).status_code == 200  # old scrape configs

        if db_url.startswith("sqlite"):  # a real outage: the catalogue's files are gone
            engine.dispose()
            path = Path(db_url.removeprefix("sqlite:///"))
            for gone in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                gone.unlink(missing_ok=True)
            r = client.post("/recommend", json={"user_id": "u1"}, headers=AUTH)
            assert _problem(r, 503)["detail"].startswith("database unavailable") and r.headers["retry-after"]
