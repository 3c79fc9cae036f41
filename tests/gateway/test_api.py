"""/api: the OpenAPI document covers every route; the policy explained over real HTTP with real tokens
(the whole role x status x version matrix against the written rules); client profile administration."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests
import yaml

from gateway.connections import Connections
from policies.status import DiagnosisStatus
from tests.factories import make_ct
from tests.gateway.policy_support import POLICIES, Gateway, derive_all, gateway_fixture  # noqa: F401

RAW = yaml.safe_load((POLICIES / "access.yaml").read_text())
VERSION_IDS = ["original", "lossless", "q50", "q25"]
NAMES = {s.label: s for s in DiagnosisStatus}


def written_allows(role: str, version: str, status: DiagnosisStatus) -> bool:
    body = RAW["roles"][role]
    granted = VERSION_IDS if body["versions"] == "all" else body["versions"]
    if version not in granted:
        return False
    return body.get("matrix") == "ignore" or status in {NAMES[n] for n in RAW["matrix"][version]}


def test_openapi_describes_every_api_route(gateway: Gateway) -> None:
    from gateway import wado

    app = gateway.client.application
    if "wado_api" not in app.blueprints:
        app.register_blueprint(wado.api_blueprint, url_prefix="/api")
    response = gateway.client.get("/api/openapi.json")  # public: no token
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/"):
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule.removeprefix("/api"))
        path = (
            path.replace("{study_uid}", "{study}")
            .replace("{series_uid}", "{series}")
            .replace("{sop_uid}", "{sop}")
        )
        assert path in paths, f"{rule.rule} is not in /api/openapi.json"
        for method in rule.methods - {"HEAD", "OPTIONS"}:  # type: ignore[operator]
            assert method.lower() in paths[path], f"{method} {rule.rule} is not in /api/openapi.json"
            operation = paths[path][method.lower()]
            assert operation["summary"] and operation["responses"]


# --- the policy explained -----------------------------------------------------------------------------------


@pytest.fixture
def live(make_settings: Any, live_server: Any) -> tuple[str, Gateway]:
    """The app on a real HTTP server, in AUTH_MODE=local."""
    from gateway.app import create_app

    settings = make_settings(AUTH_MODE="local")
    conn = Connections(settings)
    url = live_server(settings, conn)
    return url, Gateway(create_app(settings, conn).test_client(), settings, conn)


def test_the_whole_matrix_over_http_with_real_tokens(live: tuple[str, Gateway]) -> None:
    url, gw = live
    session = requests.Session()
    checked = 0
    for role in RAW["roles"]:
        # a role that may not retrieve cannot call explain itself: an admin asks on its behalf
        caller, extra = (role, {}) if role != "uploader" else ("admin", {"role": role})
        headers = gw.auth(caller)
        for status in DiagnosisStatus:
            allowed = [v for v in VERSION_IDS if written_allows(role, v, status)]
            for version in [None, *VERSION_IDS]:
                params = {"status": status.label, "location": "hospital", **extra}
                if version:
                    params["version"] = version
                response = session.get(f"{url}/api/policy/explain", params=params, headers=headers)
                assert response.status_code == 200, response.text
                decision = response.json()["decision"]
                if version is None:
                    expected = 200 if allowed else 403
                    assert decision["http_status"] == expected and (
                        decision["served"] in allowed or not allowed
                    )
                else:
                    expected = 200 if version in allowed else 403
                    assert decision["http_status"] == expected, (role, status, version, decision)
                    assert decision["served"] == (version if expected == 200 else None)
                if role == "referring":
                    assert decision["served"] not in ("original", "lossless")
                if role == "uploader":
                    assert decision["served"] is None
                checked += 1
    assert checked == len(RAW["roles"]) * 5 * 5


def test_explain_a_stored_study_for_a_referring_physician(gateway: Gateway) -> None:
    ds = make_ct(rows=128, columns=128)
    gateway.stow(ds)
    derive_all(gateway.conn)
    study = str(ds.StudyInstanceUID)
    headers = gateway.auth("referring", "dr-ref")
    body = gateway.client.get(f"/api/policy/explain?study={study}", headers=headers).get_json()
    assert body["decision"]["outcome"] == "denied" and "not read yet" in body["decision"]["reason"]
    assert body["trace"][-1].startswith("decision: denied") and len(body["verdicts"]) == 4
    gateway.client.put(
        f"/api/studies/{study}/diagnosis", json={"status": "read"}, headers=gateway.auth("radiologist")
    )
    slow = gateway.client.get(
        f"/api/policy/explain?study={study}&downlink=0.001&viewport_width=1000&dpr=2", headers=headers
    ).get_json()
    assert slow["decision"]["served"] == "q25" and slow["client"]["downlink_mbps"] == 0.001
    assert slow["decision"]["resolution"] == {
        "display": "2000", "source": "client", "level": 0, "columns": 128, "rows": 128,
    }  # fmt: skip
    assert slow["client"]["location"] == "hospital"  # the test client calls from 127.0.0.1
    fast = gateway.client.get(f"/api/policy/explain?study={study}&location=home", headers=headers).get_json()
    assert fast["decision"]["served"] == "q50" and fast["client"]["location_source"] == "query"


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("status=read&role=surgeon", "role"),
        ("status=read&version=q99", "version"),
        ("status=eventually", "status"),
        ("", "study"),
        ("status=read&location=moon", "location"),
        ("study=1.2.03", "StudyInstanceUID"),
        ("status=read&accept=text/html", None),
    ],
)
def test_explain_refuses_bad_parameters(gateway: Gateway, query: str, parameter: str | None) -> None:
    response = gateway.client.get(f"/api/policy/explain?{query}", headers=gateway.auth("radiologist"))
    assert response.status_code in (400, 406)
    if parameter:
        assert response.get_json().get("parameter") == parameter


def test_an_uploader_may_not_ask_for_explanations_or_statuses(gateway: Gateway) -> None:
    headers = gateway.auth("uploader")
    assert gateway.client.get("/api/policy/explain?status=read", headers=headers).status_code == 403
    assert gateway.client.get("/api/studies/1.2.3/diagnosis", headers=headers).status_code == 403
    assert gateway.client.get("/api/policy/explain?status=read").status_code == 401


# --- client profiles ----------------------------------------------------------------------------------------


def test_admins_register_profiles_users_read_their_own(gateway: Gateway) -> None:
    admin = gateway.auth("admin")
    body = {"display": "2560x1440", "location": "er", "downlink_mbps": 20, "note": "reading room 3"}
    response = gateway.client.put("/api/profiles/user:dr-a", json=body, headers=admin)
    assert response.status_code == 200 and response.get_json()["profile"]["display"] == "2560x1440"
    assert (
        gateway.client.put("/api/profiles/group:night", json={"save_data": True}, headers=admin).status_code
        == 200
    )
    assert set(gateway.client.get("/api/profiles", headers=admin).get_json()["profiles"]) == {
        "user:dr-a", "group:night",
    }  # fmt: skip
    own = gateway.client.get("/api/profiles/dr-a", headers=gateway.auth("radiologist", "dr-a"))
    assert own.status_code == 200 and own.get_json()["profile"]["location"] == "er"
    other = gateway.client.get("/api/profiles/user:dr-a", headers=gateway.auth("radiologist", "dr-b"))
    assert other.status_code == 403
    refused = gateway.client.put(
        "/api/profiles/user:dr-b", json={}, headers=gateway.auth("radiologist", "dr-b")
    )
    assert refused.status_code == 403
    bad = gateway.client.put("/api/profiles/user:dr-a", json={"location": "moon"}, headers=admin)
    assert bad.status_code == 400 and bad.get_json()["parameter"] == "location"
    # the profile reaches the policy: dr-a is at the ER location wherever it calls from
    explained = gateway.client.get(
        "/api/policy/explain?status=read&role=referring", headers=gateway.auth("radiologist", "dr-a")
    ).get_json()
    assert explained["client"]["profile"] == "user:dr-a" and explained["client"]["location"] == "er"
    assert gateway.client.delete("/api/profiles/user:dr-a", headers=admin).status_code == 204
    assert gateway.client.delete("/api/profiles/user:dr-a", headers=admin).status_code == 404
