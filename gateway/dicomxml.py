"""DICOM JSON (PS3.18 F.2) -> Native DICOM Model XML (PS3.19 Annex A). Core: no Flask, no I/O."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any

from pydicom.datadict import dictionary_has_tag, keyword_for_tag

NAMESPACE = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_NAME_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
_NAME_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# XML 1.0 forbids most control characters; such characters in a value become U+FFFD.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value) if abs(value) < 2**53 else value
    return _NOT_XML.sub("\ufffd", str(value))


def _private_creator(tag: str, dataset: dict[str, Any]) -> str | None:
    """PS3.19 A.1.1: a private element names its creator, the value of (gggg,00xx) for (gggg,xxyy)."""
    group, element = int(tag[:4], 16), int(tag[4:], 16)
    if group % 2 == 0 or element < 0x1000:
        return None
    creator = dataset.get(f"{group:04X}00{element >> 8:02X}", {}).get("Value") or [None]
    return None if creator[0] is None else str(creator[0])


def _person_name(parent: ET.Element, number: int, value: Any) -> None:
    name = ET.SubElement(parent, "PersonName", number=str(number))
    if not isinstance(value, dict):
        return
    for group in _NAME_GROUPS:
        text = value.get(group)
        if not text:
            continue
        group_element = ET.SubElement(name, group)
        for component, part in zip(_NAME_COMPONENTS, str(text).split("^"), strict=False):
            if part:
                ET.SubElement(group_element, component).text = _text(part)


def _attribute(parent: ET.Element, tag: str, element: dict[str, Any], dataset: dict[str, Any]) -> None:
    vr = element.get("vr", "UN")
    attrs = {"tag": tag.upper(), "vr": vr}
    number = int(tag, 16)
    if dictionary_has_tag(number):
        attrs["keyword"] = keyword_for_tag(number)
    creator = _private_creator(tag, dataset)
    if creator:
        attrs["privateCreator"] = creator
    node = ET.SubElement(parent, "DicomAttribute", attrs)
    if "BulkDataURI" in element:
        ET.SubElement(node, "BulkData", uri=element["BulkDataURI"])
        return
    if "InlineBinary" in element:
        ET.SubElement(node, "InlineBinary").text = element["InlineBinary"]
        return
    for index, value in enumerate(element.get("Value") or [], start=1):
        if vr == "SQ":
            item = ET.SubElement(node, "Item", number=str(index))
            _dataset(item, value or {})
        elif vr == "PN":
            _person_name(node, index, value)
        else:
            child = ET.SubElement(node, "Value", number=str(index))
            if value is not None:  # a null in Value is an empty value (PS3.18 F.2.5)
                child.text = _text(value)


def _dataset(parent: ET.Element, dataset: dict[str, Any]) -> None:
    for tag in sorted(dataset, key=str.upper):
        _attribute(parent, tag, dataset[tag], dataset)


def to_xml(dataset_json: dict[str, Any]) -> bytes:
    """One dataset as an application/dicom+xml document (UTF-8, with the XML declaration)."""
    root = ET.Element("NativeDicomModel", {"xmlns": NAMESPACE, "xml:space": "preserve"})
    _dataset(root, dataset_json)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)
