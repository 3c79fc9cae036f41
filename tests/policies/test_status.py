from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from policies.rules import RulesStore
from policies.status import DiagnosisStatus, ObjectFacts, may_advance, may_set, status_for

POLICIES = Path(__file__).resolve().parents[2] / "policies"
SR = "1.2.840.10008.5.1.4.1.1.88"


@pytest.fixture(scope="module")
def status_rules() -> tuple:
    return RulesStore(POLICIES).access.status_rules


def test_codes_and_names_are_the_designs() -> None:
    assert [(s.value, s.label) for s in DiagnosisStatus] == [
        (1, "unread"),
        (2, "read"),
        (3, "notes"),
        (4, "annotated"),
        (5, "reported"),
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(1, 1), ("2", 2), ("notes", 3), ("ANNOTATED", 4), (" Reported ", 5), ("5", 5)],
)
def test_parse_accepts_code_or_name(raw: object, expected: int) -> None:
    assert DiagnosisStatus.parse(raw) == expected


@pytest.mark.parametrize("raw", [0, 6, "6", "final", "", True, "2.0", None])
def test_parse_refuses_anything_else_and_says_what_is_valid(raw: object) -> None:
    with pytest.raises(ValueError, match="unread"):
        DiagnosisStatus.parse(raw)


@given(st.sampled_from(list(DiagnosisStatus)), st.sampled_from(list(DiagnosisStatus)))
def test_automatic_changes_only_move_forward_while_the_api_may_go_anywhere(
    current: DiagnosisStatus, new: DiagnosisStatus
) -> None:
    assert may_advance(current, new) == (new > current)
    assert may_set(current, new) == (new != current)


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        # the notes API's SR: Basic Text, PARTIAL, the gateway's own title
        (ObjectFacts(f"{SR}.11", "PARTIAL", (), "99DCMWEBGW:NOTES"), DiagnosisStatus.NOTES),
        # the same title but COMPLETE is somebody's report, not the notes API's
        (ObjectFacts(f"{SR}.11", "COMPLETE", (), "99DCMWEBGW:NOTES"), DiagnosisStatus.REPORTED),
        (ObjectFacts("1.2.840.10008.5.1.4.1.1.11.1"), DiagnosisStatus.ANNOTATED),  # GSPS
        (ObjectFacts("1.2.840.10008.5.1.4.1.1.11.2"), DiagnosisStatus.ANNOTATED),  # colour PS
        (ObjectFacts("1.2.840.10008.5.1.4.1.1.66.4"), DiagnosisStatus.ANNOTATED),  # SEG
        (ObjectFacts(f"{SR}.34", "PARTIAL", ("1500",), "DCM:126000"), DiagnosisStatus.ANNOTATED),  # TID 1500
        (ObjectFacts(f"{SR}.33", "COMPLETE", ("1500",), "DCM:126000"), DiagnosisStatus.ANNOTATED),
        (ObjectFacts(f"{SR}.22", None, (), "DCM:126000"), DiagnosisStatus.ANNOTATED),  # title alone
        (ObjectFacts(f"{SR}.33", "COMPLETE", (), "TEST:1111"), DiagnosisStatus.REPORTED),
        (ObjectFacts(f"{SR}.11", "PARTIAL", (), "LN:18748-4"), DiagnosisStatus.NOTES),
        (ObjectFacts(f"{SR}.59"), DiagnosisStatus.NOTES),  # Key Object Selection: any other SR
    ],
)
def test_stored_objects_map_to_the_designs_statuses(
    status_rules: tuple, facts: ObjectFacts, expected: DiagnosisStatus
) -> None:
    rule = status_for(status_rules, facts)
    assert rule is not None and rule.status is expected, rule


@pytest.mark.parametrize(
    "sop_class",
    ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.104.1"],
)
def test_images_and_documents_advance_nothing(status_rules: tuple, sop_class: str) -> None:
    assert status_for(status_rules, ObjectFacts(sop_class, "COMPLETE")) is None
    assert not any(rule.may_apply(sop_class) for rule in status_rules)
