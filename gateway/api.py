"""The HTTP API beyond DICOMweb (/api/...): what the gateway knows of a study's versions."""

from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue
from sqlalchemy import select

from gateway.errors import NotFound
from gateway.http import authorize, services
from gateway.index.db import session_scope
from gateway.index.models import Instance, Study, Version
from gateway.uids import check_uid
from policies.permissions import Action
from policies.rules import VersionSpec

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
