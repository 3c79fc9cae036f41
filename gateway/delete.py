"""DELETE /dicomweb/studies/{study}[/series/{series}[/instances/{sop}]] (admin only): removes the
original, every version, every tier's copy, the hot series metadata and the index rows; 204, then 404
once gone. The work is gateway/purge.py's; this module checks, calls and audits."""

from __future__ import annotations

from flask import Blueprint, Response
from flask.typing import ResponseReturnValue

from gateway import logs
from gateway.errors import NotFound
from gateway.http import authorize, services
from gateway.purge import purge
from policies.permissions import Action

blueprint = Blueprint("delete", __name__)


@blueprint.delete("/studies/<study_uid>")
@blueprint.delete("/studies/<study_uid>/series/<series_uid>")
@blueprint.delete("/studies/<study_uid>/series/<series_uid>/instances/<sop_uid>")
def delete_resource(
    study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> ResponseReturnValue:
    who = authorize(Action.ADMIN)
    purged = purge(services(), study_uid, series_uid, sop_uid)
    if not purged.anything:
        what = (
            f"instance {sop_uid}"
            if sop_uid
            else f"series {series_uid}"
            if series_uid
            else f"study {study_uid}"
        )
        raise NotFound(f"no {what} (already deleted, or never stored)")
    logs.audit(
        "delete", who.subject, who.role, study=study_uid, series=series_uid, instance=sop_uid,
        instances=purged.instances, objects=purged.objects,
    )  # fmt: skip
    return Response(status=204)
