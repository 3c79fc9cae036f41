"""Job: rebuild one series' precomputed metadata document after instances were stored into it."""

from __future__ import annotations

from gateway import seriesdoc
from gateway.uids import check_uid
from workers import context


def refresh_series(study_uid: str, series_uid: str) -> None:
    seriesdoc.rebuild(
        context.connections(),
        check_uid(study_uid, "StudyInstanceUID"),
        check_uid(series_uid, "SeriesInstanceUID"),
    )
