"""/api/studies/{study}/storage and /prefetch: where each object of a study lives, and making a study
and the patient's priors hot again ahead of a reading (registered under /api by create_app)."""

from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask.typing import ResponseReturnValue

from gateway import tiers
from gateway.errors import InvalidParameter
from gateway.http import authorize, services
from gateway.uids import check_uid
from policies.permissions import Action

blueprint = Blueprint("storage_api", __name__)

MAX_PRIORS = 50


@blueprint.get("/studies/<study_uid>/storage")
def study_storage(study_uid: str) -> ResponseReturnValue:
    """Every original and version of the study with each copy: tier, bucket, key, storage class, size,
    SHA-256, since when, and the state of an archive restore."""
    authorize(Action.RETRIEVE)
    return jsonify(tiers.study_storage(services(), check_uid(study_uid, "StudyInstanceUID")))


def _priors() -> int | None:
    """?priors=N, or {"priors": N} in a JSON body; absent: lifecycle.yaml's prefetch.priors."""
    raw = request.args.get("priors")
    if raw is None and request.is_json:
        body = request.get_json(silent=True)
        if isinstance(body, dict) and "priors" in body:
            raw = str(body["priors"])
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) > MAX_PRIORS:
        raise InvalidParameter(f"priors={raw[:20]!r} must be an integer 0..{MAX_PRIORS}", parameter="priors")
    return int(raw)


@blueprint.post("/studies/<study_uid>/prefetch")
def prefetch(study_uid: str) -> ResponseReturnValue:
    """Queue the prefetch of the study and its priors; 202 with the progress so far (200 when all is
    hot already). GET on the same path follows the progress."""
    who = authorize(Action.PREFETCH)
    check_uid(study_uid, "StudyInstanceUID")
    conn = services()
    priors = _priors()
    tiers.request_prefetch(conn, study_uid, priors, who.subject)
    progress = tiers.prefetch_progress(conn, study_uid)
    if progress["state"] == "done":
        return jsonify(progress), 200
    tiers.enqueue_prefetch(conn.redis, study_uid, priors)
    response = jsonify(progress)
    response.status_code = 202
    response.headers["Location"] = request.path
    return response


@blueprint.get("/studies/<study_uid>/prefetch")
def prefetch_progress(study_uid: str) -> ResponseReturnValue:
    """How far the prefetch is: objects hot, cold but readable, restoring, archived; per study."""
    authorize(Action.PREFETCH)
    return jsonify(tiers.prefetch_progress(services(), check_uid(study_uid, "StudyInstanceUID")))
