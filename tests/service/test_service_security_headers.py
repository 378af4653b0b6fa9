"""Security headers and the declared auth scheme, on the app itself (no model is loaded: the
routes tested need none)."""

from __future__ import annotations

from fastapi.testclient import TestClient

from ovd.service.app import create_app
from ovd.service.settings import Settings


def test_the_page_gets_a_csp_and_every_response_nosniff(tmp_path):
    client = TestClient(create_app(Settings(model_dir=str(tmp_path))))
    page = client.get("/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert client.get("/static/app.js").headers["content-security-policy"] == csp
    for path in ("/", "/livez", "/openapi.json", "/v1/models"):
        r = client.get(path)
        assert r.headers["x-content-type-options"] == "nosniff", path
        assert r.headers["x-frame-options"] == "DENY", path
    assert "content-security-policy" not in client.get("/docs").headers  # Swagger UI loads a CDN


def test_openapi_declares_bearer_auth_only_when_keys_are_on(tmp_path):
    plain = TestClient(create_app(Settings(model_dir=str(tmp_path)))).get("/openapi.json").json()
    assert "securitySchemes" not in plain.get("components", {})
    keyed = TestClient(create_app(Settings(model_dir=str(tmp_path), api_keys="k1,k2"))).get("/openapi.json").json()
    assert keyed["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert keyed["paths"]["/v1/detect"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in keyed["paths"]["/livez"]["get"]
