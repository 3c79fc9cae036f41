"""DICOM JSON -> PS3.19 Native DICOM Model XML."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pydicom
import pytest

from gateway.dicomxml import NAMESPACE, to_xml

NS = {"d": NAMESPACE}


def parse(document: dict[str, Any]) -> ET.Element:
    raw = to_xml(document)
    assert raw.startswith(b"<?xml version='1.0' encoding='utf-8'?>")
    root = ET.fromstring(raw)
    assert root.tag == f"{{{NAMESPACE}}}NativeDicomModel"
    return root


def attribute(parent: ET.Element, tag: str) -> ET.Element:
    found = parent.find(f"d:DicomAttribute[@tag='{tag}']", NS)
    assert found is not None, f"no DicomAttribute {tag}"
    return found


def test_values_keywords_and_order() -> None:
    root = parse({
        "00200013": {"vr": "IS", "Value": [7]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00280030": {"vr": "DS", "Value": [0.5, 1.0]},
        "00080008": {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]},
        "00081190": {"vr": "UR", "Value": ["https://x.example/dicomweb/studies/1.2?a=1&b=<2>"]},
        "00100020": {"vr": "LO"},
    })  # fmt: skip
    tags = [a.get("tag") for a in root.findall("d:DicomAttribute", NS)]
    assert tags == ["00080008", "00080060", "00081190", "00100020", "00200013", "00280030"]
    modality = attribute(root, "00080060")
    assert (modality.get("vr"), modality.get("keyword")) == ("CS", "Modality")
    assert [(v.get("number"), v.text) for v in modality.findall("d:Value", NS)] == [("1", "CT")]
    assert [v.text for v in attribute(root, "00280030").findall("d:Value", NS)] == ["0.5", "1"]
    image_type = [(v.get("number"), v.text) for v in attribute(root, "00080008").findall("d:Value", NS)]
    assert image_type == [("1", "ORIGINAL"), ("2", None), ("3", "AXIAL")]
    url = attribute(root, "00081190").find("d:Value", NS)
    assert url is not None and url.text == "https://x.example/dicomweb/studies/1.2?a=1&b=<2>"
    assert list(attribute(root, "00100020")) == []  # empty value: the attribute, no Value
    assert attribute(root, "00200013").find("d:Value", NS).text == "7"  # type: ignore[union-attr]


def test_person_name_components_and_groups() -> None:
    root = parse({"00100010": {"vr": "PN", "Value": [
        {"Alphabetic": "Yamada^Tarou^^Dr^", "Ideographic": "山田^太郎", "Phonetic": "やまだ^たろう"},
        {"Alphabetic": "Doe"},
    ]}})  # fmt: skip
    names = attribute(root, "00100010").findall("d:PersonName", NS)
    assert [n.get("number") for n in names] == ["1", "2"]
    alphabetic = names[0].find("d:Alphabetic", NS)
    assert alphabetic is not None
    assert [(c.tag.split("}")[1], c.text) for c in alphabetic] == [
        ("FamilyName", "Yamada"), ("GivenName", "Tarou"), ("NamePrefix", "Dr"),
    ]  # fmt: skip
    assert names[0].find("d:Ideographic/d:GivenName", NS).text == "太郎"  # type: ignore[union-attr]
    assert names[0].find("d:Phonetic/d:FamilyName", NS).text == "やまだ"  # type: ignore[union-attr]
    assert names[1].find("d:Alphabetic/d:FamilyName", NS).text == "Doe"  # type: ignore[union-attr]


def test_sequences_binary_and_private_elements() -> None:
    root = parse({
        "00081115": {"vr": "SQ", "Value": [
            {"0020000E": {"vr": "UI", "Value": ["1.2.3"]}},
            {"0020000E": {"vr": "UI", "Value": ["1.2.4"]}, "00081140": {"vr": "SQ"}},
        ]},
        "00291010": {"vr": "OB", "InlineBinary": base64.b64encode(b"\x00\x01").decode()},
        "00290010": {"vr": "LO", "Value": ["ACME 1.0"]},
        "7FE00010": {"vr": "OW", "BulkDataURI": "https://x/dicomweb/studies/1/bulkdata/7FE00010"},
    })  # fmt: skip
    items = attribute(root, "00081115").findall("d:Item", NS)
    assert [i.get("number") for i in items] == ["1", "2"]
    assert attribute(items[1], "0020000E").find("d:Value", NS).text == "1.2.4"  # type: ignore[union-attr]
    assert list(attribute(items[1], "00081140")) == []
    private = attribute(root, "00291010")
    assert private.get("privateCreator") == "ACME 1.0" and private.get("keyword") is None
    assert base64.b64decode(private.find("d:InlineBinary", NS).text or "") == b"\x00\x01"  # type: ignore[union-attr]
    bulk = attribute(root, "7FE00010").find("d:BulkData", NS)
    assert bulk is not None and bulk.get("uri") == "https://x/dicomweb/studies/1/bulkdata/7FE00010"
    assert attribute(root, "7FE00010").get("keyword") == "PixelData"


def test_characters_xml_cannot_carry_are_replaced() -> None:
    root = parse({"00081030": {"vr": "LO", "Value": ["bad\x01char"]}})
    assert attribute(root, "00081030").find("d:Value", NS).text == "bad\ufffdchar"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["sr_comprehensive_dcmtk.dcm", "mr_siemens_overlays_private.dcm"])
def test_real_files_convert_completely(shared_data: Path, name: str) -> None:
    ds = pydicom.dcmread(shared_data / name, stop_before_pixels=True)
    document = ds.to_json_dict(bulk_data_threshold=64, bulk_data_element_handler=lambda e: "https://x/bulk")
    root = parse(document)
    top = {a.get("tag") for a in root.findall("d:DicomAttribute", NS)}
    assert top == set(document)

    def count(doc: dict[str, Any]) -> int:
        return sum(
            1 + sum(count(item) for item in (v.get("Value") or []) if v["vr"] == "SQ") for v in doc.values()
        )

    assert len(root.findall(".//d:DicomAttribute", NS)) == count(document)
