"""QIDO-RS parameter parsing: every matching kind, the control parameters, and each bad-parameter case."""

from __future__ import annotations

import re
import sqlite3
from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.datastructures import MultiDict

from gateway.errors import InvalidParameter
from gateway.query import (
    MATCHABLE,
    MAX_RESULTS,
    Kind,
    Level,
    Query,
    Term,
    attribute_tag,
    glob_pattern,
    like_pattern,
    name_tokens,
    parse,
)

OHIF_STUDIES = (
    "/dicomweb/studies?limit=101&offset=0&fuzzymatching=true"
    "&includefield=00081030%2C00080060%2C00080090%2C00100030"
)


def args_of(url: str) -> MultiDict[str, str]:
    """Query parameters exactly as Flask hands them over (percent-decoded, repeated keys kept)."""
    return MultiDict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def bad(level: Level, args: dict[str, str | list[str]] | MultiDict[str, str]) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as caught:
        parse(level, args)
    return caught.value


def terms(query: Query, tag: str) -> tuple[Term, ...]:
    criterion = query.criterion(tag)
    assert criterion is not None, f"no criterion for {tag}"
    return criterion.terms


# --- attributes by keyword or tag ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["PatientID", "00100020", "0010,0020", "(0010,0020)"])
def test_attribute_named_by_keyword_or_tag(name: str) -> None:
    query = parse(Level.STUDY, {name: "PID1"})
    assert terms(query, "00100020") == (Term(Kind.EQUAL, "PID1"),)
    assert "00100020" in query.include


def test_lower_case_hex_tag_is_accepted() -> None:
    assert attribute_tag("0008103e") == "0008103E"
    assert parse(Level.SERIES, {"0008103e": "AX*"}).criterion("0008103E") is not None


@pytest.mark.parametrize("name", ["PatientNam", "patientname", "0010001", "0010002G", "Foo.Bar", ""])
def test_unknown_attribute_names_the_parameter(name: str) -> None:
    error = bad(Level.STUDY, {name: "x"})
    assert error.status == 400
    assert error.extra["parameter"] == name
    assert repr(name.split(".")[0]) in error.detail or name == ""


# --- UID lists ----------------------------------------------------------------------------------------------


UIDS = ["1.2.3", "1.2.840.10008.5", "2.25.1234"]


@pytest.mark.parametrize(
    "args",
    [
        {"StudyInstanceUID": ",".join(UIDS)},  # PS3.18
        {"StudyInstanceUID": "\\".join(UIDS)},  # OHIF
        MultiDict([("StudyInstanceUID", uid) for uid in UIDS]),  # repeated keys
        MultiDict([("0020000D", "1.2.3,1.2.840.10008.5"), ("StudyInstanceUID", "2.25.1234")]),
    ],
)
def test_uid_list_forms_are_equivalent(args: dict[str, str] | MultiDict[str, str]) -> None:
    query = parse(Level.STUDY, args)
    assert [t.value for t in terms(query, "0020000D")] == UIDS
    assert all(t.kind is Kind.EQUAL for t in terms(query, "0020000D"))


@pytest.mark.parametrize("value", ["1.2.abc", "1.02.3", "1..2", "1." + "2" * 64, "1.2.*", "1.2.3,x"])
def test_bad_uid_in_a_uid_key_is_rejected(value: str) -> None:
    error = bad(Level.SERIES, {"SeriesInstanceUID": value})
    assert error.extra["parameter"] == "SeriesInstanceUID"


uid_strategy = st.builds(
    lambda parts: ".".join(parts),
    st.lists(st.from_regex(r"0|[1-9][0-9]{0,5}", fullmatch=True), min_size=2, max_size=8),
).filter(lambda uid: len(uid) <= 64)


@given(
    uids=st.lists(uid_strategy, min_size=1, max_size=6, unique=True),
    form=st.sampled_from(["comma", "backslash", "repeat"]),
)
def test_uid_lists_round_trip_through_every_separator(uids: list[str], form: str) -> None:
    if form == "repeat":
        args: MultiDict[str, str] = MultiDict([("SOPInstanceUID", uid) for uid in uids])
    else:
        args = MultiDict({"SOPInstanceUID": ("," if form == "comma" else "\\").join(uids)})
    query = parse(Level.INSTANCE, args)
    assert [t.value for t in terms(query, "00080018")] == uids


# --- single value, wildcards, universal ---------------------------------------------------------------------


def test_single_value_and_wildcards() -> None:
    query = parse(Level.STUDY, {"AccessionNumber": "A1?3", "StudyDescription": "Chest*", "PatientID": "P1"})
    assert terms(query, "00080050") == (Term(Kind.WILDCARD, "A1?3"),)
    assert terms(query, "00081030") == (Term(Kind.WILDCARD, "Chest*"),)
    assert terms(query, "00100020") == (Term(Kind.EQUAL, "P1"),)


@pytest.mark.parametrize("value", ["", "*"])
def test_universal_matching_returns_the_attribute_without_matching(value: str) -> None:
    query = parse(Level.STUDY, {"PatientName": value, "StudyDate": value})
    assert query.criteria == ()
    assert {"00100010", "00080020"} <= set(query.include)


def test_backslash_list_of_text_values_is_an_or() -> None:
    query = parse(Level.SERIES, {"Modality": "CT\\MR", "SeriesDescription": "a,b\\c"})
    assert [t.value for t in terms(query, "00080060")] == ["CT", "MR"]
    # Commas are literal in LO values; only CS and UI take comma lists.
    assert [t.value for t in terms(query, "0008103E")] == ["a,b", "c"]


def test_modalities_in_study_takes_several_values() -> None:
    for value in ("CT\\MR", "CT,MR"):
        query = parse(Level.STUDY, {"ModalitiesInStudy": value})
        assert [t.value for t in terms(query, "00080061")] == ["CT", "MR"]


# --- person names -------------------------------------------------------------------------------------------


def test_person_names_are_upper_cased_and_trailing_separators_dropped() -> None:
    query = parse(Level.STUDY, {"PatientName": "doe^john^^", "ReferringPhysicianName": "we*"})
    assert terms(query, "00100010") == (Term(Kind.EQUAL, "DOE^JOHN"),)
    assert terms(query, "00080090") == (Term(Kind.WILDCARD, "WE*"),)
    # Only the alphabetic group is indexed: the other groups are not matched.
    assert terms(parse(Level.STUDY, {"PatientName": "Yamada^Tarou=山田^太郎"}), "00100010") == (
        Term(Kind.EQUAL, "YAMADA^TAROU"),
    )
    assert parse(Level.STUDY, {"PatientName": "=山田"}).criteria == ()


def test_fuzzymatching_makes_person_names_fuzzy_only() -> None:
    query = parse(Level.STUDY, {"PatientName": "smi^jo", "PatientID": "p*", "fuzzymatching": "true"})
    assert query.fuzzy is True
    assert terms(query, "00100010") == (Term(Kind.FUZZY, "SMI^JO"),)
    assert terms(query, "00100020") == (Term(Kind.WILDCARD, "p*"),)
    assert name_tokens("SMI^JO=X Y") == ("SMI", "JO", "X", "Y")


@pytest.mark.parametrize("value", ["yes", "1", "TRUEISH"])
def test_fuzzymatching_must_be_boolean(value: str) -> None:
    assert bad(Level.STUDY, {"fuzzymatching": value}).extra["parameter"] == "fuzzymatching"


def test_fuzzymatching_is_case_insensitive_boolean() -> None:
    assert parse(Level.STUDY, {"fuzzymatching": "TRUE"}).fuzzy is True
    assert parse(Level.STUDY, {"fuzzymatching": "false"}).fuzzy is False


# --- dates, times and ranges --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "term"),
    [
        ("20200101", Term(Kind.EQUAL, "20200101")),
        ("20200101-", Term(Kind.RANGE, low="20200101")),
        ("-20201231", Term(Kind.RANGE, high="20201231")),
        ("20200101-20201231", Term(Kind.RANGE, low="20200101", high="20201231")),
        ("20200101-20200101", Term(Kind.RANGE, low="20200101", high="20200101")),
    ],
)
def test_date_values_and_ranges(value: str, term: Term) -> None:
    assert terms(parse(Level.STUDY, {"StudyDate": value}), "00080020") == (term,)


@pytest.mark.parametrize(
    "value", ["2020-01-01", "20201301", "20200230", "2020010", "20201231-20200101", "-", "2020*", "abc", "--"]
)
def test_bad_dates_and_ranges_are_rejected(value: str) -> None:
    assert bad(Level.STUDY, {"StudyDate": value}).extra["parameter"] == "StudyDate"


def test_time_ranges() -> None:
    query = parse(Level.STUDY, {"StudyTime": "0800-123000.5"})
    assert terms(query, "00080030") == (Term(Kind.RANGE, low="0800", high="123000.5"),)
    assert terms(parse(Level.SERIES, {"SeriesTime": "10"}), "00080031") == (Term(Kind.EQUAL, "10"),)
    for value in ("2500", "12:30", "1260", "1200-1100", "1230.5"):
        assert bad(Level.STUDY, {"00080030": value}).extra["parameter"] == "00080030"


def test_datetime_range_tells_offsets_from_the_range_dash() -> None:
    # AcquisitionDateTime is not indexed, so it is ignored, but its value is still validated.
    query = parse(Level.INSTANCE, {"AcquisitionDateTime": "20200101120000-0500"})
    assert query.criteria == ()
    bad(Level.INSTANCE, {"AcquisitionDateTime": "2020x"})
    from gateway.query import _range_term

    assert _range_term("DT", "20200101-0500-20200102", "x") == Term(
        Kind.RANGE, low="20200101-0500", high="20200102"
    )
    assert _range_term("DT", "20200101-", "x") == Term(Kind.RANGE, low="20200101")


def test_integer_attributes() -> None:
    assert terms(parse(Level.SERIES, {"SeriesNumber": "007"}), "00200011") == (Term(Kind.EQUAL, "7"),)
    assert terms(parse(Level.INSTANCE, {"Rows": "512\\256"}), "00280010") == (
        Term(Kind.EQUAL, "512"),
        Term(Kind.EQUAL, "256"),
    )
    for value in ("1.5", "x", "1*"):
        assert bad(Level.INSTANCE, {"InstanceNumber": value}).extra["parameter"] == "InstanceNumber"


# --- limit, offset, includefield ----------------------------------------------------------------------------


def test_limit_and_offset() -> None:
    query = parse(Level.STUDY, {"limit": "25", "offset": "50"})
    assert (query.limit, query.offset, query.warnings) == (25, 50, ())
    default = parse(Level.STUDY, {})
    assert (default.limit, default.offset) == (MAX_RESULTS, 0)
    assert parse(Level.STUDY, {"limit": "0"}).limit == MAX_RESULTS  # 0: no client limit


def test_limit_over_the_maximum_is_capped_with_a_warning() -> None:
    query = parse(Level.STUDY, {"limit": "5000"}, max_results=100)
    assert query.limit == 100
    assert any("5000" in w and "100" in w for w in query.warnings)


@pytest.mark.parametrize(("name", "value"), [("limit", "ten"), ("limit", "-1"), ("limit", "1.5"),
                                             ("offset", "-5"), ("offset", "x"), ("offset", "")])  # fmt: skip
def test_bad_limit_or_offset_names_the_parameter(name: str, value: str) -> None:
    error = bad(Level.STUDY, {name: value})
    assert error.extra["parameter"] == name
    assert value in error.detail


def test_includefield_lists_repeats_and_all() -> None:
    query = parse(Level.STUDY, args_of(OHIF_STUDIES))
    assert query.include == ("00081030", "00080060", "00080090", "00100030")
    assert (query.limit, query.offset, query.fuzzy) == (101, 0, True)
    repeated = parse(
        Level.SERIES, MultiDict([("includefield", "SeriesDate"), ("includefield", "00080031,0008103e")])
    )
    assert repeated.include == ("00080021", "00080031", "0008103E")
    assert parse(Level.STUDY, {"includefield": "all"}).include_all is True
    assert parse(Level.STUDY, {"includefield": "PatientAge,ALL"}).include_all is True


def test_bad_includefield_names_the_parameter() -> None:
    error = bad(Level.STUDY, {"includefield": "00081030,NoSuchThing"})
    assert error.extra["parameter"] == "includefield"
    assert "NoSuchThing" in error.detail


# --- what cannot be matched is ignored with a warning -------------------------------------------------------


def test_valid_but_unmatchable_attributes_are_ignored_with_a_warning() -> None:
    query = parse(
        Level.STUDY,
        MultiDict([("PatientAge", "045Y"), ("00091010", "x"), ("Modality", "CT"),
                   ("RequestAttributesSequence.RequestedProcedureID", "R1"), ("PatientID", "P1")]),
    )  # fmt: skip
    assert [c.tag for c in query.criteria] == ["00100020"]
    (warning,) = query.warnings
    for name in ("PatientAge", "00091010", "Modality", "RequestAttributesSequence.RequestedProcedureID"):
        assert name in warning
    assert "PatientID" not in warning
    assert {"00101010", "00091010", "00080060", "00400275"} <= set(query.include)


def test_higher_level_keys_match_at_lower_levels() -> None:
    query = parse(Level.INSTANCE, {"PatientName": "DOE*", "Modality": "CT", "SOPClassUID": "1.2.3"})
    assert {c.tag: c.level for c in query.criteria} == {
        "00100010": Level.STUDY,
        "00080060": Level.SERIES,
        "00080016": Level.INSTANCE,
    }
    assert query.warnings == ()


def test_transport_parameters_are_not_attributes() -> None:
    assert parse(Level.STUDY, {"accept": "application/dicom+json", "charset": "utf-8"}).criteria == ()


def test_scope_from_the_path_is_kept() -> None:
    query = parse(Level.INSTANCE, {}, study_uid="1.2", series_uid="1.3")
    assert (query.study_uid, query.series_uid, query.level) == ("1.2", "1.3", Level.INSTANCE)


def test_every_matchable_attribute_parses_at_its_level() -> None:
    samples = {"UI": "1.2.3", "DA": "20200101", "TM": "1200", "PN": "A^B", "IS": "1", "US": "8"}
    for tag, level in MATCHABLE.items():
        from gateway.query import vr_of

        query = parse(level, {tag: samples.get(vr_of(tag), "X")})
        assert query.criterion(tag) is not None, tag


# --- wildcard translation: SQL sees exactly what DICOM wildcard semantics say -------------------------------


def reference_match(pattern: str, text: str) -> bool:
    """PS3.4 C.2.2.2.4: '*' any run of characters, '?' one character, everything else literal."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL) is not None


ALPHABET = st.sampled_from(list("ab*?%_[]\\^ Z-é"))
TEXT = st.text(alphabet=st.sampled_from(list("ab%_[]\\^ Z-éA")), max_size=8)


@pytest.fixture(scope="module")
def sqlite_db() -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.execute("PRAGMA case_sensitive_like = ON")
    return db


@settings(max_examples=300, deadline=None)
@given(pattern=st.text(alphabet=ALPHABET, max_size=6), text=TEXT)
def test_wildcard_translation_matches_dicom_semantics(
    sqlite_db: sqlite3.Connection, pattern: str, text: str
) -> None:
    expected = reference_match(pattern, text)
    (glob,) = sqlite_db.execute("SELECT ? GLOB ?", (text, glob_pattern(pattern))).fetchone()
    (like,) = sqlite_db.execute("SELECT ? LIKE ? ESCAPE '\\'", (text, like_pattern(pattern))).fetchone()
    assert bool(glob) == expected
    assert bool(like) == expected


def test_percent_and_underscore_stay_literal() -> None:
    assert like_pattern("a%b_c*d?") == "a\\%b\\_c%d_"
    assert glob_pattern("a[1]*") == "a[[]1]*"


NAMES = ["PatientName", "StudyDate", "StudyTime", "StudyInstanceUID", "SeriesNumber", "Modality", "limit",
         "offset", "includefield", "fuzzymatching", "AcquisitionDateTime", "00100020", "Bogus"]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.sampled_from(NAMES), st.text(max_size=20)), max_size=5),
    level=st.sampled_from(list(Level)),
)
def test_any_input_parses_or_names_the_bad_parameter(pairs: list[tuple[str, str]], level: Level) -> None:
    try:
        query = parse(level, MultiDict(pairs))
    except InvalidParameter as error:
        assert error.extra["parameter"] in {name for name, _ in pairs} | {"includefield"}
        return
    assert 0 < query.limit <= MAX_RESULTS and query.offset >= 0
    assert all(c.terms for c in query.criteria)
