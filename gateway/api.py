"""The HTTP API beyond DICOMweb (/api/...): versions, diagnosis status, reading notes, the policy's
explanation, client profiles, and the OpenAPI document describing them. Views parse, call the core,
render; who may call what is DESIGN.md's "HTTP API beyond DICOMweb"."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from gateway import clienthints, decide, diagnosis, logs, notes
from gateway.accept import Resource
from gateway.accept import parse as parse_accept
from gateway.auth import Identity
from gateway.errors import Forbidden, InvalidParameter, NotFound
from gateway.http import authorize, dicomweb_root, identity, services
from gateway.index.db import session_scope
from gateway.index.models import Instance, Study, Version
from gateway.openapi import document as openapi_document
from gateway.uids import check_uid
from policies.engine import Decision
from policies.permissions import Action
from policies.rules import VersionSpec
from policies.status import DiagnosisStatus

blueprint = Blueprint("api", __name__)


def _spec_fields(spec: VersionSpec | None) -> dict[str, Any]:
    if spec is None:
        return {}
    return {"quality": spec.quality, "purpose": spec.purpose.value, "kind": spec.kind.value}


def _number(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else round(value, 3)


@blueprint.get("/studies/<study_uid>/versions")
def study_versions(study_uid: str) -> ResponseReturnValue:
    """Per instance: the original and each derived version with its state and, when ready, its facts."""
    authorize(Action.RETRIEVE)
    check_uid(study_uid, "StudyInstanceUID")
    conn = services()
    rules = conn.rules.versions
    with session_scope(conn.sessions) as session:
        if session.get(Study, study_uid) is None:
            raise NotFound(f"no study {study_uid}")
        instances = (
            session.execute(
                select(Instance)
                .where(Instance.study_uid == study_uid)
                .order_by(Instance.series_uid, Instance.instance_number, Instance.sop_uid)
            )
            .scalars()
            .all()
        )
        rows = session.execute(select(Version).where(Version.study_uid == study_uid)).scalars().all()
    by_instance: dict[str, list[Version]] = {}
    for row in rows:
        by_instance.setdefault(row.sop_uid, []).append(row)
    order = {spec.id: index for index, spec in enumerate(rules.versions)}
    out = []
    for instance in instances:
        versions: list[dict[str, Any]] = [
            {
                "id": "original",
                "state": "ready",
                "transfer_syntax": instance.transfer_syntax_uid,
                "size": instance.size,
                "sha256": instance.sha256,
                **_spec_fields(rules.by_id("original")),
            }
        ]
        for row in sorted(by_instance.get(instance.sop_uid, []), key=lambda r: order.get(r.version_id, 99)):
            versions.append(
                {
                    "id": row.version_id,
                    "state": row.state,
                    "transfer_syntax": row.transfer_syntax_uid,
                    "size": row.size,
                    "sha256": row.sha256,
                    "target_ratio": row.target_ratio,
                    "ratio": _number(row.ratio),
                    "psnr": _number(row.psnr),
                    "reason": row.reason,
                    **_spec_fields(rules.by_id(row.version_id)),
                }
            )
        out.append({"series_uid": instance.series_uid, "sop_uid": instance.sop_uid, "versions": versions})
    return jsonify(study_uid=study_uid, instances=out)


# --- diagnosis status and notes -----------------------------------------------------------------------------


def _status_body(study_uid: str) -> dict[str, Any]:
    conn = services()
    status = diagnosis.current(conn, study_uid)
    return {
        "study_uid": study_uid,
        "status": int(status),
        "name": status.label,
        "history": diagnosis.history(conn, study_uid),
    }


@blueprint.get("/studies/<study_uid>/diagnosis")
def get_diagnosis(study_uid: str) -> ResponseReturnValue:
    authorize(Action.RETRIEVE)
    check_uid(study_uid, "StudyInstanceUID")
    return jsonify(_status_body(study_uid))


def _wanted_status() -> DiagnosisStatus:
    """From a JSON body {"status": 2 | "read"} (or {"name": ...}), else ?status=."""
    body = request.get_json(silent=True) if request.is_json else None
    raw: Any = None
    if isinstance(body, dict):
        raw = body.get("status", body.get("name"))
    elif isinstance(body, int | str):
        raw = body
    if raw is None:
        raw = request.args.get("status")
    if raw is None:
        raise InvalidParameter('give the status as {"status": 2} or {"status": "read"}', parameter="status")
    try:
        return DiagnosisStatus.parse(raw)
    except ValueError as exc:
        raise InvalidParameter(str(exc), parameter="status") from exc


@blueprint.put("/studies/<study_uid>/diagnosis")
def put_diagnosis(study_uid: str) -> ResponseReturnValue:
    """Any code, backwards too (DESIGN.md: to correct a mistake): radiologist, teleradiologist, admin."""
    who = authorize(Action.DIAGNOSE)
    check_uid(study_uid, "StudyInstanceUID")
    wanted = _wanted_status()
    change = diagnosis.set_status(services(), study_uid, wanted, who.subject, who.role, source="api")
    body = _status_body(study_uid)
    body["changed"] = change is not None
    return jsonify(body)


@blueprint.post("/studies/<study_uid>/notes")
def post_notes(study_uid: str) -> ResponseReturnValue:
    """Reading notes from {"text": "..."} or a text/plain body, stored in the study as a Basic Text SR."""
    who = authorize(Action.DIAGNOSE)
    check_uid(study_uid, "StudyInstanceUID")
    if request.is_json:
        body = request.get_json(silent=True)
        text = body.get("text") if isinstance(body, dict) else None
    elif (request.mimetype or "").startswith("text/"):
        text = request.get_data(as_text=True)
    else:
        text = None
    if not isinstance(text, str):
        raise InvalidParameter('send {"text": "..."} as JSON, or the notes as text/plain', parameter="text")
    stored = notes.store_notes(services(), study_uid, text, who.subject, who.role)
    ref = stored.ref
    url = f"{dicomweb_root()}/studies/{ref.study_uid}/series/{ref.series_uid}/instances/{ref.sop_uid}"
    status = diagnosis.current(services(), study_uid)
    body = {
        "study_uid": ref.study_uid,
        "series_uid": ref.series_uid,
        "sop_uid": ref.sop_uid,
        "sop_class_uid": stored.sop_class_uid,
        "retrieve_url": url,
        "status": int(status),
        "name": status.label,
    }
    return jsonify(body), 201, {"Location": url}


# --- the policy, explained ----------------------------------------------------------------------------------

_HINT_PARAMS = {
    "downlink": "Downlink",
    "rtt": "RTT",
    "ect": "ECT",
    "save_data": "Save-Data",
    "device_memory": "Sec-CH-Device-Memory",
    "viewport_width": "Sec-CH-Viewport-Width",
    "dpr": "Sec-CH-DPR",
}


def _explain_roles(who: Identity) -> frozenset[str]:
    access = services().rules.access
    raw = request.args.get("role")
    if not raw:
        return who.roles
    claimed = {part.strip() for part in raw.split(",") if part.strip()}
    roles = access.known_roles(claimed)
    if len(roles) != len(claimed):
        known = ", ".join(access.roles)
        raise InvalidParameter(
            f"role {raw[:60]!r} names a role this gateway does not know ({known})", parameter="role"
        )
    return roles


def _explain_profile(who: Identity) -> clienthints.ClientProfile:
    """The caller's own profile, with any hint, location, address or measured throughput the query
    names in place of what the request carried."""
    conn = services()
    headers = {header: request.args[name] for name, header in _HINT_PARAMS.items() if name in request.args}
    address = request.args.get("address") or request.remote_addr
    profile = clienthints.profile_for(conn, who, headers, address)
    changes: dict[str, Any] = {}
    if request.args.get("location"):
        location = request.args["location"]
        if location not in conn.rules.access.location_names:
            raise InvalidParameter(f"location {location[:40]!r} is unknown", parameter="location")
        changes.update(
            location=location, location_source="query", assumed_mbps=conn.rules.access.assumed(location)
        )
    if request.args.get("measured"):
        changes["measured_mbps"] = _positive("measured")
    if changes:
        profile = dataclasses.replace(profile, **changes)
    return profile


def _positive(name: str) -> float:
    raw = request.args.get(name, "")
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise InvalidParameter(f"{name} {raw[:20]!r} must be a positive number", parameter=name)
    return value


def decision_json(decision: Decision) -> dict[str, Any]:
    resolution = decision.resolution
    return {
        "outcome": decision.outcome.value,
        "http_status": decision.http_status,
        "version": decision.version,
        "served": decision.served,
        "reason": decision.reason,
        "delivered_transfer_syntax": decision.delivered,
        "estimated_seconds": decision.seconds,
        "bandwidth_mbps": decision.bandwidth_mbps,
        "budget_seconds": decision.budget_seconds,
        "restore": decision.restore,
        "resolution": None
        if resolution is None
        else {
            "display": str(resolution.display),
            "source": resolution.source,
            "level": resolution.level,
            "columns": resolution.columns,
            "rows": resolution.rows,
        },
    }


@blueprint.get("/policy/explain")
def explain() -> ResponseReturnValue:
    """The full decision trace for a hypothetical retrieve: ?study= (or ?status= with ?modality= and
    ?size= for a study that is not stored), ?role=, version/quality/purpose/resolution, ?accept=
    (an Accept header value), hints (downlink, rtt, ect, save_data, device_memory, viewport_width,
    dpr), ?location=, ?address=, ?measured= (Mbit/s)."""
    who = authorize(Action.RETRIEVE)
    conn = services()
    roles = _explain_roles(who)
    accepted: tuple[str, ...] = ()
    if request.args.get("accept"):
        accepted = decide.accepted_syntaxes(parse_accept(request.args["accept"], Resource.INSTANCES))
    facts = decide.request_facts(request.args, conn.rules.versions, accepted)
    profile = _explain_profile(who)
    status = None
    if request.args.get("status"):
        try:
            status = DiagnosisStatus.parse(request.args["status"])
        except ValueError as exc:
            raise InvalidParameter(str(exc), parameter="status") from exc
    study_uid = request.args.get("study")
    held = None
    if study_uid:
        check_uid(study_uid, "StudyInstanceUID")
    else:
        if status is None:
            raise InvalidParameter(
                "give ?study= or, for a study that is not stored, ?status=", parameter="study"
            )
        size = int(_positive("size")) if request.args.get("size") else 100_000_000
        held = decide.hypothetical(conn.rules.versions, request.args.get("modality"), size)
    decision = decide.explain(conn, roles, profile, study_uid or "", facts, status, held)
    logs.audit(
        "explain",
        who.subject,
        who.role,
        study=study_uid,
        roles=sorted(roles),
        version=decision.served,
        outcome=decision.outcome.value,
        why=decision.reason,
    )
    return jsonify(
        request={
            "roles": sorted(roles),
            "study": study_uid,
            "version": facts.version,
            "quality": facts.quality,
            "purpose": facts.purpose.value if facts.purpose else None,
            "resolution": str(facts.display) if facts.display else None,
            "accepted_transfer_syntaxes": list(facts.accepted),
        },
        client={
            "key": profile.key,
            "address": profile.address,
            "location": profile.location,
            "location_source": profile.location_source,
            "downlink_mbps": profile.downlink_mbps,
            "measured_mbps": profile.measured_mbps,
            "assumed_mbps": profile.assumed_mbps,
            "rtt_ms": profile.rtt_ms,
            "save_data": profile.save_data,
            "device_memory_gb": profile.device_memory_gb,
            "display": str(profile.display) if profile.display else None,
            "profile": profile.profile,
        },
        decision=decision_json(decision),
        verdicts=[v.__dict__ for v in decision.verdicts],
        trace=list(decision.trace),
    )


# --- client profiles ----------------------------------------------------------------------------------------


@blueprint.get("/profiles")
def list_profiles() -> ResponseReturnValue:
    authorize(Action.ADMIN)
    return jsonify(profiles=clienthints.all_profiles(services()))


@blueprint.get("/profiles/<path:name>")
def get_profile(name: str) -> ResponseReturnValue:
    """Admin, or a user reading its own profile."""
    who = identity()
    key = clienthints.profile_name(name)
    if not services().rules.access.may(who.roles, Action.ADMIN) and key != f"user:{who.subject}":
        raise Forbidden("only an admin may read another user's or a group's client profile")
    profile = clienthints.all_profiles(services()).get(key)
    if profile is None:
        raise NotFound(f"no client profile {key}")
    return jsonify(name=key, profile=profile)


@blueprint.put("/profiles/<path:name>")
def put_profile(name: str) -> ResponseReturnValue:
    who = authorize(Action.ADMIN)
    key = clienthints.profile_name(name)
    body = clienthints.check_profile(request.get_json(silent=True), services().rules.access)
    clienthints.put_profile(services(), key, body, who.subject)
    logs.audit("profile", who.subject, who.role, profile=key, why="registered")
    return jsonify(name=key, profile=body)


@blueprint.delete("/profiles/<path:name>")
def delete_profile(name: str) -> ResponseReturnValue:
    who = authorize(Action.ADMIN)
    key = clienthints.profile_name(name)
    if not clienthints.delete_profile(services(), key):
        raise NotFound(f"no client profile {key}")
    logs.audit("profile", who.subject, who.role, profile=key, why="deleted")
    return "", 204


@blueprint.get("/openapi.json")
def openapi() -> ResponseReturnValue:
    """Public, like any API description: it names routes and parameters, no data."""
    return jsonify(openapi_document(services().rules.versions, services().rules.access))
