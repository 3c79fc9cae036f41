"""The real dicomweb-client package against the gateway served over real HTTP."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.factories import make_ct

FILES = [
    "ct_series_dcmqi/ct_01.dcm",
    "ct_series_dcmqi/ct_02.dcm",
    "ct_series_dcmqi/ct_03.dcm",
    "mr_ts/mr_jpegls_lossless_gdcm.dcm",
    "us_ybr422_30frame_jpeg_baseline.dcm",
    "cr_rg2_nema_htj2k_rpcl.dcm",
    "sr_tid1500_highdicom.dcm",
]


@pytest.fixture
def dicomweb(live_server, settings) -> DICOMwebClient:  # type: ignore[no-untyped-def]
    return DICOMwebClient(url=f"{live_server(settings)}/dicomweb")


@pytest.fixture
def stored(dicomweb: DICOMwebClient, shared_data: Path) -> list[pydicom.Dataset]:
    datasets = [pydicom.dcmread(shared_data / name) for name in FILES]
    response = dicomweb.store_instances(datasets)
    assert "FailedSOPSequence" not in response
    assert len(response.ReferencedSOPSequence) == len(FILES)
    return datasets


def test_store_search_and_retrieve_round_trip(dicomweb: DICOMwebClient, stored, shared_data: Path) -> None:
    ct = stored[0]
    studies = dicomweb.search_for_studies(search_filters={"PatientID": ct.PatientID})
    assert [s["0020000D"]["Value"][0] for s in studies] == [ct.StudyInstanceUID]
    assert studies[0]["00201208"]["Value"][0] == 3
    series = dicomweb.search_for_series(ct.StudyInstanceUID)
    assert [s["0020000E"]["Value"][0] for s in series] == [ct.SeriesInstanceUID]
    metadata = dicomweb.retrieve_series_metadata(ct.StudyInstanceUID, ct.SeriesInstanceUID)
    assert sorted(m["00080018"]["Value"][0] for m in metadata) == sorted(d.SOPInstanceUID for d in stored[:3])
    assert all("BulkDataURI" in m["7FE00010"] and "InlineBinary" not in m["7FE00010"] for m in metadata)


def test_retrieve_as_stored_returns_the_exact_bytes(
    dicomweb: DICOMwebClient, stored, shared_data: Path
) -> None:
    for name, ds in zip(FILES, stored, strict=True):
        if ds.file_meta.TransferSyntaxUID in (
            pydicom.uid.ImplicitVRLittleEndian,
            pydicom.uid.ExplicitVRBigEndian,
        ):
            continue
        response = dicomweb._http_get(  # the raw multipart body, to compare bytes exactly
            f"{dicomweb.base_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
            f"/instances/{ds.SOPInstanceUID}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        parts = list(dicomweb._decode_multipart_message(response, stream=False))
        assert len(parts) == 1
        expected = (shared_data / name).read_bytes()
        assert hashlib.sha256(parts[0]).hexdigest() == hashlib.sha256(expected).hexdigest()


def test_default_retrieve_decodes_compressed_originals(dicomweb: DICOMwebClient, stored) -> None:
    jpegls = stored[3]
    ds = dicomweb.retrieve_instance(
        jpegls.StudyInstanceUID,
        jpegls.SeriesInstanceUID,
        jpegls.SOPInstanceUID,
        media_types=(("application/dicom", "1.2.840.10008.1.2.1"),),
    )
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert np.array_equal(ds.pixel_array, jpegls.pixel_array)


def test_frames_of_a_multiframe_instance(dicomweb: DICOMwebClient, stored) -> None:
    us = stored[4]
    frames = dicomweb.retrieve_instance_frames(
        us.StudyInstanceUID,
        us.SeriesInstanceUID,
        us.SOPInstanceUID,
        frame_numbers=[1, 30],
        media_types=(("application/octet-stream", "*"),),
    )
    assert len(frames) == 2
    assert all(frame[:2] == b"\xff\xd8" for frame in frames)  # JPEG baseline, as stored


def test_store_into_a_named_study_and_refuse_another(dicomweb: DICOMwebClient) -> None:
    first = make_ct()
    other = make_ct()
    response = dicomweb.store_instances([first], study_instance_uid=first.StudyInstanceUID)
    assert response.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    from requests.exceptions import HTTPError

    with pytest.raises(HTTPError) as caught:
        dicomweb.store_instances([other], study_instance_uid=first.StudyInstanceUID)
    assert caught.value.response.status_code == 409
