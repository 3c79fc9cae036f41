"""Derive jobs run for real: STOW through HTTP, then an RQ SimpleWorker works the queue off."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from rq import Queue, SimpleWorker
from sqlalchemy import select

from gateway import codecs, keys
from gateway.connections import Connections
from gateway.index.models import Version
from gateway.jobs import DERIVE_QUEUE
from gateway.uids import InstanceRef
from tests.factories import make_ct, multipart_body, to_bytes
from workers import context


def store(client, datasets: list[bytes]) -> None:  # type: ignore[no-untyped-def]
    body, content_type = multipart_body(datasets)
    response = client.post("/dicomweb/studies", data=body, content_type=content_type)
    assert response.status_code == 200, response.get_data(as_text=True)


def work(conn: Connections) -> None:
    context.configure(conn.settings, conn)
    queue = Queue(DERIVE_QUEUE, connection=conn.redis)
    SimpleWorker([queue], connection=conn.redis).work(burst=True)


def versions(conn: Connections, sop_uid: str) -> dict[str, Version]:
    with conn.sessions() as session:
        rows = session.execute(select(Version).where(Version.sop_uid == sop_uid)).scalars().all()
        return {row.version_id: row for row in rows}


def read_version(conn: Connections, ds: pydicom.Dataset, version_id: str) -> pydicom.Dataset:
    ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return pydicom.dcmread(io.BytesIO(conn.hot.get_bytes(keys.version(ref, version_id))))


def multi(ds: pydicom.Dataset, keyword: str) -> list:
    element = ds[keyword]
    return list(element.value) if element.VM > 1 else [element.value]


def frames_of(version: pydicom.Dataset) -> list[bytes]:
    from pydicom.encaps import generate_frames

    count = int(version.get("NumberOfFrames", 1) or 1)
    return list(generate_frames(version.PixelData, number_of_frames=count))


@pytest.mark.parametrize(
    "name",
    [
        "ct1_nema_uncompressed.dcm",
        "mr_ts/mr_jpegls_lossless_gdcm.dcm",
        "cr_rg2_nema_htj2k_rpcl.dcm",
        "us1_nema_rgb_uncompressed.dcm",
        "nm1_nema_jpeg_lossless_sv1.dcm",
        "dx_small_monochrome1.dcm",
    ],
)
def test_lossless_is_pixel_identical_and_lossy_hits_its_ratio(
    client, conn: Connections, shared_data: Path, name: str
) -> None:
    path = shared_data / name
    store(client, [path.read_bytes()])
    work(conn)
    original = pydicom.dcmread(path)
    rows = versions(conn, original.SOPInstanceUID)
    assert {k: v.state for k, v in rows.items()}.keys() == {"lossless", "q50", "q25"}
    assert rows["lossless"].state == "ready", rows["lossless"].reason
    lossless = read_version(conn, original, "lossless")
    assert lossless.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.202"
    decoded = codecs.decode(frames_of(lossless)[0])
    expected = original.pixel_array
    if original.PhotometricInterpretation in ("YBR_FULL", "YBR_FULL_422"):
        expected = pydicom.pixels.convert_color_space(expected, original.PhotometricInterpretation, "RGB")
    assert np.array_equal(decoded.reshape(expected.shape), expected)
    info = codecs.validate_codestream(frames_of(lossless)[0])
    assert info.problems() == []
    for version_id in ("q50", "q25"):
        row = rows[version_id]
        if row.state == "skipped":
            assert "lossless already reaches" in row.reason
            assert rows["lossless"].ratio >= row.target_ratio
            continue
        assert row.state == "ready", row.reason
        assert abs(row.ratio - row.target_ratio) <= 0.1 * row.target_ratio
        lossy = read_version(conn, original, version_id)
        assert lossy.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.203"
        assert lossy.LossyImageCompression == "01"
        methods = multi(lossy, "LossyImageCompressionMethod")
        ratios = multi(lossy, "LossyImageCompressionRatio")
        assert methods[-1] == "ISO_15444_15" and len(methods) == len(ratios)
        assert float(ratios[-1]) == pytest.approx(row.ratio, rel=0.01)
        assert row.psnr and row.psnr > 20  # 8-bit DX at 1/50 lands near 23 dB; garbage is far below


def test_multiframe_gets_one_codestream_per_frame(client, conn: Connections, shared_data: Path) -> None:
    path = shared_data / "us_palette_10frame_rle.dcm"
    store(client, [path.read_bytes()])
    work(conn)
    original = pydicom.dcmread(path)
    lossless = read_version(conn, original, "lossless")
    frames = frames_of(lossless)
    assert len(frames) == 10
    assert lossless.PhotometricInterpretation == "PALETTE COLOR"
    assert np.array_equal(codecs.decode(frames[9]), original.pixel_array[9])
    rows = versions(conn, original.SOPInstanceUID)
    if rows["q50"].state == "ready":
        assert read_version(conn, original, "q50").PhotometricInterpretation == "YBR_ICT"


def test_objects_without_pixels_get_no_versions(client, conn: Connections, shared_data: Path) -> None:
    store(client, [(shared_data / "sr_tid1500_highdicom.dcm").read_bytes()])
    sr = pydicom.dcmread(shared_data / "sr_tid1500_highdicom.dcm")
    rows = versions(conn, sr.SOPInstanceUID)
    assert {row.state for row in rows.values()} == {"skipped"}
    assert all("Pixel Data" in row.reason for row in rows.values())


def test_derive_is_idempotent(client, conn: Connections) -> None:
    ds = make_ct(rows=128, columns=128)
    store(client, [to_bytes(ds)])
    work(conn)
    first = {k: v.sha256 for k, v in versions(conn, ds.SOPInstanceUID).items()}
    from workers.derive import derive

    assert derive(conn, InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)) == {}
    assert {k: v.sha256 for k, v in versions(conn, ds.SOPInstanceUID).items()} == first


def test_undecodable_pixels_fail_visibly(client, conn: Connections) -> None:
    ds = make_ct(rows=64, columns=64)
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless

    ds.PixelData = encapsulate([b"\xff\xd8 this is not a jpeg-ls stream"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    store(client, [to_bytes(ds)])
    work(conn)
    rows = versions(conn, ds.SOPInstanceUID)
    assert {row.state for row in rows.values()} == {"failed"}
    assert all("cannot be coded" in row.reason for row in rows.values())
    from rq.registry import FailedJobRegistry

    from gateway.jobs import job_id

    failed = FailedJobRegistry(DERIVE_QUEUE, connection=conn.redis).get_job_ids()
    assert failed == [job_id("derive", ds.SOPInstanceUID)]


def test_an_already_lossy_original_keeps_its_lossy_history(
    client, conn: Connections, shared_data: Path
) -> None:
    path = shared_data / "cr_rg2_nema_jpeg_extended_12bit.dcm"
    store(client, [path.read_bytes()])
    work(conn)
    original = pydicom.dcmread(path)
    rows = versions(conn, original.SOPInstanceUID)
    assert rows["lossless"].state == "ready"
    lossless = read_version(conn, original, "lossless")
    assert np.array_equal(codecs.decode(frames_of(lossless)[0]), original.pixel_array)
    # 1/20 of this CR is larger than its 1/35 JPEG original, 1/50 is smaller.
    assert (rows["q50"].state, rows["q25"].state) == ("skipped", "ready")
    for version_id in ("q50", "q25"):
        if rows[version_id].state == "ready":
            lossy = read_version(conn, original, version_id)
            assert multi(lossy, "LossyImageCompressionMethod")[-1] == "ISO_15444_15"
            # The JPEG step stays recorded before ours, with its ratio and method.
            assert multi(lossy, "LossyImageCompressionMethod") == ["ISO_10918_1", "ISO_15444_15"]
            assert float(multi(lossy, "LossyImageCompressionRatio")[0]) == 35
        else:
            assert rows[version_id].state == "skipped" and rows[version_id].reason


def test_a_storage_fault_fails_the_attempt_and_a_retry_completes(client, conn: Connections) -> None:
    ds = make_ct(rows=128, columns=128)
    store(client, [to_bytes(ds)])
    ref = InstanceRef(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    from gateway.errors import StorageUnavailable
    from workers.derive import derive

    put = conn.hot.put_file

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise StorageUnavailable("injected: hot bucket refuses the put")

    conn.hot.put_file = refuse  # type: ignore[method-assign]
    with pytest.raises(StorageUnavailable):
        derive(conn, ref)
    rows = versions(conn, ds.SOPInstanceUID)
    assert rows["lossless"].state == "failed" and "retrying" in rows["lossless"].reason
    assert list(conn.hot.list(keys.instance_prefix(ref))) == []
    conn.hot.put_file = put  # type: ignore[method-assign]
    derive(conn, ref)
    assert versions(conn, ds.SOPInstanceUID)["lossless"].state == "ready"


def test_pending_versions_are_queued_again_after_redis_lost_the_queue(client, conn: Connections) -> None:
    from datetime import timedelta

    from workers.reconcile import requeue_pending

    ds = make_ct(rows=128, columns=128)
    store(client, [to_bytes(ds)])
    conn.redis.flushall()  # Redis lost: the queue and its job are gone, the index still says pending
    work(conn)
    assert {v.state for v in versions(conn, ds.SOPInstanceUID).values()} == {"pending"}
    assert requeue_pending(conn, older_than=timedelta(0)) == 1
    work(conn)
    assert versions(conn, ds.SOPInstanceUID)["lossless"].state == "ready"


def test_ybr_full_422_jpeg_multiframe_gets_rgb_lossless_frames(
    client, conn: Connections, shared_data: Path
) -> None:
    path = shared_data / "us_ybr422_30frame_jpeg_baseline.dcm"
    store(client, [path.read_bytes()])
    work(conn)
    original = pydicom.dcmread(path)
    lossless = read_version(conn, original, "lossless")
    frames = frames_of(lossless)
    assert len(frames) == 30 and lossless.PhotometricInterpretation == "YBR_RCT"
    rgb = original.pixel_array  # pydicom 3 converts YBR_FULL_422 to RGB
    for index in (0, 29):
        assert np.array_equal(codecs.decode(frames[index]), rgb[index])
    assert lossless.get("PixelPaddingValue") == original.get("PixelPaddingValue")


def test_the_versions_api_lists_each_version_with_its_state_and_facts(client, conn: Connections) -> None:
    smooth = make_ct(rows=256, columns=256)
    smooth.PixelData = (np.add.outer(np.arange(256), np.arange(256)).astype(np.uint16) * 4).tobytes()
    noisy = make_ct(
        study_uid=smooth.StudyInstanceUID, series_uid=smooth.SeriesInstanceUID, rows=256, columns=256
    )
    store(client, [to_bytes(smooth), to_bytes(noisy)])
    pending = client.get(f"/api/studies/{smooth.StudyInstanceUID}/versions").get_json()
    assert {v["state"] for i in pending["instances"] for v in i["versions"] if v["id"] != "original"} == {
        "pending"
    }
    work(conn)
    body = client.get(f"/api/studies/{smooth.StudyInstanceUID}/versions").get_json()
    by_sop = {i["sop_uid"]: {v["id"]: v for v in i["versions"]} for i in body["instances"]}
    for sop in (smooth.SOPInstanceUID, noisy.SOPInstanceUID):
        versions = by_sop[sop]
        assert list(versions) == ["original", "lossless", "q50", "q25"]
        assert versions["original"]["sha256"] and versions["original"]["quality"] == 100
        assert versions["lossless"]["state"] == "ready" and versions["lossless"]["psnr"] is None
        assert versions["lossless"]["transfer_syntax"] == "1.2.840.10008.1.2.4.202"
    # the smooth image compresses losslessly past 1/10: q50 is not made, and the list says why
    assert by_sop[smooth.SOPInstanceUID]["q50"]["state"] == "skipped"
    assert "lossless already reaches" in by_sop[smooth.SOPInstanceUID]["q50"]["reason"]
    noisy_q50 = by_sop[noisy.SOPInstanceUID]["q50"]
    assert noisy_q50["state"] == "ready" and noisy_q50["purpose"] == "reference"
    assert abs(noisy_q50["ratio"] - noisy_q50["target_ratio"]) <= 0.1 * noisy_q50["target_ratio"]
    assert client.get("/api/studies/1.2.3.4/versions").status_code == 404
    assert client.get("/api/studies/1.2.abc/versions").status_code == 400
