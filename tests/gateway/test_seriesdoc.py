"""The per-series metadata document: built from the index in instance order, read when current,
rebuilt when missing or stale, and never left older than the index by concurrent rebuilds."""

from __future__ import annotations

import dataclasses
import gzip
import json
import threading
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import keys, seriesdoc
from gateway.connections import Connections
from gateway.dicomfile import read_header
from gateway.dicomjson import compress, instance_json
from gateway.index.db import session_scope
from gateway.index.records import InstanceFacts, record_instance
from gateway.uids import InstanceRef, new_uid
from tests.factories import make_ct, to_bytes


def _index(conn: Connections, tmp_path: Any, study: str, series: str, number: int | None) -> str:
    """Write one instance row the way ingest does (the document is built from rows only)."""
    ds = make_ct(study_uid=study, series_uid=series, rows=8, columns=8, InstanceNumber=number)
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    path.write_bytes(to_bytes(ds))
    header, layout = read_header(str(path))
    ref = InstanceRef(study, series, ds.SOPInstanceUID)
    document = instance_json(header, ref, layout)
    facts = InstanceFacts(
        study,
        series,
        ref.sop_uid,
        ds.SOPClassUID,
        "1.2.840.10008.1.2.1",
        1,
        "0" * 64,
        compress(document),
        layout.to_json() if layout else None,
        document,
    )
    with session_scope(conn.sessions) as session:
        record_instance(session, facts)
    return ref.sop_uid


def _numbers(document: bytes) -> list[Any]:
    return [
        item.get("00200013", {}).get("Value", [None])[0] for item in json.loads(gzip.decompress(document))
    ]


def test_rebuild_orders_by_instance_number_and_records_its_state(conn: Connections, tmp_path: Any) -> None:
    study, series = new_uid(), new_uid()
    for number in (3, None, 1, 2):
        _index(conn, tmp_path, study, series, number)
    seriesdoc.rebuild(conn, study, series)
    key = keys.series_metadata(study, series)
    document = conn.hot.get_bytes(key)
    assert _numbers(document) == [1, 2, 3, None]
    state = seriesdoc.state(conn, study, series)
    assert seriesdoc.comment_of(document) == state.tag
    info = conn.hot.head(key)
    assert info is not None and info.metadata["instances"] == "4" and info.metadata["created"] == state.stamp
    assert b"@@DICOMWEB@@/studies/" in gzip.decompress(document)  # rendered per request, not stored


def test_load_reads_a_current_document_without_rebuilding(conn: Connections, tmp_path: Any) -> None:
    study, series = new_uid(), new_uid()
    _index(conn, tmp_path, study, series, 1)
    seriesdoc.rebuild(conn, study, series)
    key = keys.series_metadata(study, series)
    marker = seriesdoc.compress(b'[{"marker":1}]', seriesdoc.state(conn, study, series).tag)
    conn.hot.put_bytes(key, marker)  # same state tag: load must serve it as is
    assert seriesdoc.load(conn, study, series) == marker


def test_load_rebuilds_missing_and_stale_documents(conn: Connections, tmp_path: Any) -> None:
    study, series = new_uid(), new_uid()
    _index(conn, tmp_path, study, series, 1)
    assert _numbers(seriesdoc.load(conn, study, series)) == [1]  # never built: built on read
    _index(conn, tmp_path, study, series, 2)  # indexed, but nobody rebuilt the document
    assert _numbers(seriesdoc.load(conn, study, series)) == [1, 2]
    assert _numbers(conn.hot.get_bytes(keys.series_metadata(study, series))) == [1, 2]
    with pytest.raises(Exception) as missing:
        seriesdoc.load(conn, study, new_uid())
    assert getattr(missing.value, "status", None) == 404


def test_concurrent_rebuilds_never_leave_an_older_document(conn: Connections, tmp_path: Any) -> None:
    study, series = new_uid(), new_uid()
    errors: list[BaseException] = []

    def writer(offset: int) -> None:
        try:
            for step in range(5):
                _index(conn, tmp_path, study, series, offset * 10 + step)
                seriesdoc.rebuild(conn, study, series)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    document = conn.hot.get_bytes(keys.series_metadata(study, series))
    state = seriesdoc.state(conn, study, series)
    assert state.count == 30
    assert seriesdoc.comment_of(document) == state.tag  # the last write saw the last commit
    assert len(_numbers(document)) == 30


def test_rebuild_without_redis_still_writes(make_settings: Any, private_redis: Any, tmp_path: Any) -> None:
    settings = make_settings(REDIS_URL=private_redis.url)
    conn = Connections(settings)
    try:
        study, series = new_uid(), new_uid()
        _index(conn, tmp_path, study, series, 1)
        private_redis.stop()
        seriesdoc.rebuild(conn, study, series)
        assert _numbers(conn.hot.get_bytes(keys.series_metadata(study, series))) == [1]
    finally:
        conn.close()


def test_removed_series_document_is_deleted(conn: Connections, tmp_path: Any) -> None:
    study, series = new_uid(), new_uid()
    sop = _index(conn, tmp_path, study, series, 1)
    seriesdoc.rebuild(conn, study, series)
    from sqlalchemy import delete

    from gateway.index.models import Instance

    with session_scope(conn.sessions) as session:
        session.execute(delete(Instance).where(Instance.sop_uid == sop))
    seriesdoc.rebuild(conn, study, series)
    assert conn.hot.head(keys.series_metadata(study, series)) is None


@given(
    body=st.binary(max_size=2000),
    comment=st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=255), max_size=80),
)
def test_gzip_comment_round_trip(body: bytes, comment: str) -> None:
    document = seriesdoc.compress(body, comment)
    assert gzip.decompress(document) == body
    assert seriesdoc.comment_of(document) == comment


def test_comment_absent_from_plain_gzip() -> None:
    assert seriesdoc.comment_of(gzip.compress(b"[]")) is None
    assert seriesdoc.comment_of(b"not gzip") is None


def test_state_is_a_value() -> None:
    state = seriesdoc.SeriesState(3, "2024-01-01T00:00:00")
    assert dataclasses.replace(state, count=4).tag != state.tag
