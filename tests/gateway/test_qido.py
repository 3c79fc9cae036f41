"""QIDO-RS over HTTP: every route, OHIF's exact requests, JSON and XML, errors and warnings."""

from __future__ import annotations

import email.parser
import email.policy
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.dicomxml import NAMESPACE
from tests.factories import make_ct, multipart_body, to_bytes

JSON = "application/dicom+json"
XML_MULTIPART = 'multipart/related; type="application/dicom+xml"'
NS = {"d": NAMESPACE}

REAL_FILES = [
    "ct_series_dcmqi/ct_01.dcm",
    "ct_series_dcmqi/ct_02.dcm",
    "ct_series_dcmqi/ct_03.dcm",
    "seg_liver_on_ct_series.dcm",
    "mr_siemens_overlays_private.dcm",
    "ct1_nema_uncompressed.dcm",
    "us1_nema_rgb_uncompressed.dcm",
]


@dataclass
class Stored:
    synthetic_study: str
    synthetic_series: str
    synthetic_sops: list[str]
    jan_study: str  # JANCT000: 3 CT slices and a SEG
    jan_ct_series: str
    mr_study: str
    nema_study: str  # NEMA CT1
    us_study: str  # NEMA US1


def uid_of(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).data_element(keyword).value)  # type: ignore[union-attr]


@pytest.fixture
def stored(client: Any, shared_data: Path) -> Stored:
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    synthetic = [
        make_ct(study, series, rows=8, columns=8, InstanceNumber=n, PatientName="Doe^John", PatientID="PID-Q",
                StudyDescription="Synthetic chest", ReferringPhysicianName="Welby^Marcus")
        for n in (2, 1)
    ]  # fmt: skip
    parts = [to_bytes(ds) for ds in synthetic] + [(shared_data / name).read_bytes() for name in REAL_FILES]
    body, content_type = multipart_body(parts)
    response = client.post("/dicomweb/studies", data=body, content_type=content_type)
    assert response.status_code == 200, response.get_data(as_text=True)
    ct = shared_data / "ct_series_dcmqi/ct_01.dcm"
    return Stored(
        synthetic_study=study,
        synthetic_series=series,
        synthetic_sops=[str(ds.SOPInstanceUID) for ds in synthetic],
        jan_study=uid_of(ct, "StudyInstanceUID"),
        jan_ct_series=uid_of(ct, "SeriesInstanceUID"),
        mr_study=uid_of(shared_data / "mr_siemens_overlays_private.dcm", "StudyInstanceUID"),
        nema_study=uid_of(shared_data / "ct1_nema_uncompressed.dcm", "StudyInstanceUID"),
        us_study=uid_of(shared_data / "us1_nema_rgb_uncompressed.dcm", "StudyInstanceUID"),
    )


def get_json(client: Any, url: str, **headers: str) -> list[dict[str, Any]]:
    response = client.get(url, headers=headers)
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == JSON
    return json.loads(response.get_data())


def value(dataset: dict[str, Any], tag: str) -> Any:
    values = dataset.get(tag, {}).get("Value")
    return values[0] if values else None


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.headers["Content-Type"] == "application/problem+json"
    return json.loads(response.get_data())


# --- every route --------------------------------------------------------------------------------------------


def test_every_route_answers(client: Any, stored: Stored) -> None:
    studies = get_json(client, "/dicomweb/studies")
    assert {value(s, "0020000D") for s in studies} == {
        stored.synthetic_study,
        stored.jan_study,
        stored.mr_study,
        stored.nema_study,
        stored.us_study,
    }
    assert len(get_json(client, "/dicomweb/series")) == 6
    assert len(get_json(client, "/dicomweb/instances")) == 9
    jan_series = get_json(client, f"/dicomweb/studies/{stored.jan_study}/series")
    assert sorted(value(s, "00080060") for s in jan_series) == ["CT", "SEG"]
    assert len(get_json(client, f"/dicomweb/studies/{stored.jan_study}/instances")) == 4
    ct = get_json(client, f"/dicomweb/studies/{stored.jan_study}/series/{stored.jan_ct_series}/instances")
    assert [value(i, "00200013") for i in ct] == sorted(value(i, "00200013") for i in ct)
    assert len(ct) == 3


def test_study_results_carry_the_defaults(client: Any, stored: Stored) -> None:
    (study,) = get_json(client, f"/dicomweb/studies?StudyInstanceUID={stored.jan_study}")
    assert value(study, "00100010") == {"Alphabetic": "JANCT000"}
    assert value(study, "00100020") == "99000" and value(study, "00080020") == "20030417"
    assert value(study, "00201206") == 2 and value(study, "00201208") == 4
    assert study["00080061"]["Value"] == ["CT", "SEG"]
    assert value(study, "00081190") == f"http://localhost/dicomweb/studies/{stored.jan_study}"
    assert value(study, "00080056") == "ONLINE"


# --- OHIF's exact requests (issue 7) ------------------------------------------------------------------------

OHIF_LIST = "/dicomweb/studies?limit=101&offset=0&fuzzymatching=true&includefield=00081030%2C00080060%2C00080090%2C00100030"  # noqa: E501


def test_ohif_study_list(client: Any, stored: Stored) -> None:
    studies = get_json(client, OHIF_LIST, Accept="application/dicom+json")
    by_uid = {value(s, "0020000D"): s for s in studies}
    assert value(by_uid[stored.synthetic_study], "00081030") == "Synthetic chest"
    assert value(by_uid[stored.mr_study], "00081030") == "abdomen^liver"
    assert value(by_uid[stored.synthetic_study], "00080090") == {"Alphabetic": "Welby^Marcus"}
    assert value(by_uid[stored.synthetic_study], "00100030") == "19700101"
    assert value(by_uid[stored.synthetic_study], "00201208") == 2


def test_ohif_study_by_uid_and_priors_by_patient_id(client: Any, stored: Stored) -> None:
    (one,) = get_json(client, f"{OHIF_LIST}&StudyInstanceUID={stored.jan_study}")
    assert value(one, "0020000D") == stored.jan_study
    assert value(one, "00201208") == 4
    priors = get_json(client, f"{OHIF_LIST}&00100020=1CT1")
    assert [value(s, "0020000D") for s in priors] == [stored.nema_study]
    several = get_json(client, f"{OHIF_LIST}&StudyInstanceUID={stored.jan_study}%5C{stored.mr_study}")
    assert {value(s, "0020000D") for s in several} == {stored.jan_study, stored.mr_study}


def test_ohif_fuzzy_patient_name_search(client: Any, stored: Stored) -> None:
    found = get_json(client, f"{OHIF_LIST}&PatientName=*compressed*")
    assert {value(s, "0020000D") for s in found} == {stored.nema_study, stored.us_study}
    found = get_json(client, f"{OHIF_LIST}&PatientName=compressedsamples%5Eus1")
    assert {value(s, "0020000D") for s in found} == {stored.us_study}
    found = get_json(client, f"{OHIF_LIST}&PatientName=jo")
    assert {value(s, "0020000D") for s in found} == {stored.synthetic_study}


def test_ohif_series_list(client: Any, stored: Stored) -> None:
    fields = "includefield=00080021%2C00080031%2C0008103E%2C00200011"
    url = f"/dicomweb/studies/{stored.synthetic_study}/series?{fields}"
    (series,) = get_json(client, url)
    assert value(series, "0020000E") == stored.synthetic_series
    assert value(series, "00080021") == "20240102" and value(series, "00080031") == "101500"
    assert value(series, "0008103E") == "Test series" and value(series, "00200011") == 1
    assert value(series, "00201209") == 2
    assert value(series, "00081190") == (
        f"http://localhost/dicomweb/studies/{stored.synthetic_study}/series/{stored.synthetic_series}"
    )


# --- XML ----------------------------------------------------------------------------------------------------


def xml_parts(response: Any) -> list[ET.Element]:
    head = f"Content-Type: {response.headers['Content-Type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + response.get_data())
    assert message.get_content_type() == "multipart/related"
    assert message.get_param("type") == "application/dicom+xml"
    parts = list(message.iter_parts())
    assert all(p.get_content_type() == "application/dicom+xml" for p in parts)
    return [ET.fromstring(p.get_payload(decode=True)) for p in parts]


def test_xml_results_carry_the_same_values(client: Any, stored: Stored) -> None:
    url = f"/dicomweb/studies/{stored.synthetic_study}/series/{stored.synthetic_series}/instances"
    as_json = get_json(client, url)
    response = client.get(url, headers={"Accept": XML_MULTIPART})
    assert response.status_code == 200
    documents = xml_parts(response)
    assert len(documents) == len(as_json) == 2
    for document, dataset in zip(documents, as_json, strict=True):
        for tag, element in dataset.items():
            node = document.find(f"d:DicomAttribute[@tag='{tag}']", NS)
            assert node is not None and node.get("vr") == element["vr"]
            texts = [v.text for v in node.findall("d:Value", NS)]
            assert texts == [str(v) for v in element.get("Value", [])], tag


def test_xml_person_names_are_structured(client: Any, stored: Stored) -> None:
    url = f"/dicomweb/studies?StudyInstanceUID={stored.synthetic_study}"
    (document,) = xml_parts(
        client.get(url, headers={"Accept": "multipart/related; type=application/dicom+xml"})
    )
    family = document.find("d:DicomAttribute[@tag='00100010']/d:PersonName/d:Alphabetic/d:FamilyName", NS)
    assert family is not None and family.text == "Doe"


@pytest.mark.parametrize(
    ("accept", "xml"),
    [
        ("application/dicom+json", False),
        ("application/json", False),
        ("*/*", False),
        ("application/dicom+json, application/json", False),  # dicomweb-client (Python)
        ("text/html, */*;q=0.8", False),
        (f"{XML_MULTIPART}", True),
        (f"application/dicom+json;q=0.5, {XML_MULTIPART}", True),
        (f"{XML_MULTIPART};q=0.2, application/dicom+json", False),
        ("application/dicom+xml", True),
    ],
)
def test_accept_chooses_the_representation(client: Any, stored: Stored, accept: str, xml: bool) -> None:
    response = client.get(f"/dicomweb/studies?StudyInstanceUID={stored.mr_study}", headers={"Accept": accept})
    assert response.status_code == 200
    if xml:
        assert response.headers["Content-Type"].startswith('multipart/related; type="application/dicom+xml"')
        assert len(xml_parts(response)) == 1
    else:
        assert response.headers["Content-Type"] == JSON


def test_accept_query_parameter_overrides_the_header(client: Any, stored: Stored) -> None:
    url = f"/dicomweb/studies?StudyInstanceUID={stored.mr_study}&accept=application/dicom%2Bjson"
    response = client.get(url, headers={"Accept": "image/png"})
    assert response.status_code == 200 and response.headers["Content-Type"] == JSON


UNACCEPTABLE = [
    "image/jpeg",
    "application/dicom",
    "multipart/related; type=application/dicom",
    "text/html;q=1",
]


@pytest.mark.parametrize("accept", [*UNACCEPTABLE, "application/dicom+json;q=0"])
def test_unacceptable_media_type_is_406_with_reason(client: Any, stored: Stored, accept: str) -> None:
    body = problem(client.get("/dicomweb/studies", headers={"Accept": accept}), 406)
    assert "application/dicom+json" in body["detail"] and accept.split(";")[0] in body["detail"]


# --- empty results, limits and warnings ---------------------------------------------------------------------


def test_no_match_is_204_without_body(client: Any, stored: Stored) -> None:
    response = client.get("/dicomweb/studies?PatientID=nobody")
    assert response.status_code == 204 and response.get_data() == b""
    xml = client.get("/dicomweb/studies?PatientID=nobody", headers={"Accept": XML_MULTIPART})
    assert xml.status_code == 204


def test_scoped_search_of_an_unknown_study_is_empty(client: Any, stored: Stored) -> None:
    # The path UIDs are matching keys (PS3.18 10.6.1.2): an unknown study has no series to match.
    assert client.get("/dicomweb/studies/1.2.3.4.5.6/series").status_code == 204
    assert client.get("/dicomweb/studies/1.2.3.4.5.6/series/1.2.3/instances").status_code == 204


def test_cut_results_get_a_warning_and_pages_join_up(client: Any, stored: Stored) -> None:
    response = client.get("/dicomweb/instances?limit=4")
    assert response.status_code == 200
    warnings = response.headers.getlist("Warning")
    assert any(
        w.startswith("299 http://localhost/dicomweb: ") and "additional results" in w for w in warnings
    )
    pages = []
    for offset in (0, 4, 8):
        page = client.get(f"/dicomweb/instances?limit=4&offset={offset}")
        pages += json.loads(page.get_data())
        assert bool(page.headers.getlist("Warning")) == (offset < 8)
    everything = get_json(client, "/dicomweb/instances")
    assert [value(d, "00080018") for d in pages] == [value(d, "00080018") for d in everything]
    assert client.get("/dicomweb/instances").headers.get("Warning") is None


def test_ignored_attributes_are_named_in_a_warning(client: Any, stored: Stored) -> None:
    response = client.get(f"/dicomweb/studies?PatientAge=045Y&StudyInstanceUID={stored.mr_study}")
    assert response.status_code == 200
    (warning,) = response.headers.getlist("Warning")
    assert warning.startswith("299 ") and "PatientAge" in warning


# --- bad requests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=ten", "limit"),
        ("limit=-1", "limit"),
        ("offset=-3", "offset"),
        ("fuzzymatching=maybe", "fuzzymatching"),
        ("includefield=00081030%2CNotAKeyword", "includefield"),
        ("NotAKeyword=1", "NotAKeyword"),
        ("StudyInstanceUID=1.2.abc", "StudyInstanceUID"),
        ("StudyDate=2020-01-01", "StudyDate"),
        ("StudyDate=20201231-20200101", "StudyDate"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(client: Any, query: str, parameter: str) -> None:
    body = problem(client.get(f"/dicomweb/studies?{query}"), 400)
    assert body["parameter"] == parameter
    assert body["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/dicomweb/studies/1.2.abc/series",
        f"/dicomweb/studies/1.{'2' * 63}/series",
        "/dicomweb/studies/1..2/instances",
        "/dicomweb/studies/../series",
        "/dicomweb/studies/1.2/series/01.2/instances",
    ],
)
def test_bad_uids_in_the_path_are_400(client: Any, path: str) -> None:
    body = problem(client.get(path), 400)
    assert body["parameter"] in ("StudyInstanceUID", "SeriesInstanceUID")


def test_search_needs_the_search_permission(make_settings: Any) -> None:
    from gateway.app import create_app
    from gateway.connections import Connections

    settings = make_settings(DEFAULT_ROLE="uploader")
    connections = Connections(settings)
    try:
        client = create_app(settings, connections).test_client()
        assert problem(client.get("/dicomweb/studies"), 403)["detail"]
    finally:
        connections.close()


# --- URLs behind a proxy ------------------------------------------------------------------------------------


def test_retrieve_urls_follow_forwarded_headers(client: Any, stored: Stored) -> None:
    headers = {
        "X-Forwarded-Host": "pacs.example.org",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Prefix": "/gw",
    }
    (series,) = get_json(client, f"/dicomweb/studies/{stored.mr_study}/series", **headers)
    assert value(series, "00081190").startswith(
        f"https://pacs.example.org/gw/dicomweb/studies/{stored.mr_study}/"
    )
    response = client.get(f"/dicomweb/studies/{stored.mr_study}/instances?includefield=all", headers=headers)
    (instance,) = json.loads(response.get_data())
    assert "@@" not in response.get_data(as_text=True)
    uris = [e["BulkDataURI"] for e in instance.values() if "BulkDataURI" in e]
    assert uris and all(u.startswith("https://pacs.example.org/gw/dicomweb/studies/") for u in uris)


# --- a real DICOMweb client ---------------------------------------------------------------------------------


def test_dicomweb_client_searches(settings: Any, conn: Any, live_server: Any, shared_data: Path) -> None:
    from dicomweb_client.api import DICOMwebClient

    base = live_server(settings)
    web = DICOMwebClient(url=f"{base}/dicomweb")
    web.store_instances([pydicom.dcmread(shared_data / "mr_siemens_overlays_private.dcm")])
    (study,) = web.search_for_studies(
        fields=["StudyDescription"], fuzzymatching=True, search_filters={"PatientName": "sss"}
    )
    assert value(study, "00081030") == "abdomen^liver"
    assert web.search_for_studies(search_filters={"PatientID": "nobody"}) == []
    (series,) = web.search_for_series(value(study, "0020000D"))
    assert value(series, "00080060") == "MR"
    (instance,) = web.search_for_instances(value(study, "0020000D"), value(series, "0020000E"))
    assert value(instance, "00080016") == pydicom.uid.MRImageStorage
