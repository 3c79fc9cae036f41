"""lifecycle.yaml: the shipped default and presets, what is due when, refusals with line and reason,
and the S3-native configuration each bucket gets (put to moto server and read back)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import RulesError
from policies.lifecycle import (
    PRESETS,
    Action,
    Copy,
    Holding,
    LifecycleRules,
    load_lifecycle,
    rules_path,
)
from policies.rules import load_versions

POLICIES = Path(__file__).resolve().parents[2] / "policies"
VERSIONS = load_versions(POLICIES / "versions.yaml")
T0 = datetime(2024, 1, 1, tzinfo=UTC)
BUCKETS = {"originals": "orig-b", "hot": "hot-b", "cold": "cold-b"}


def load(name: str | None = None) -> LifecycleRules:
    return load_lifecycle(rules_path(POLICIES, preset=name), VERSIONS)


def at_home(object_id: str, kind: str, read_days: float | None = None, **extra: object) -> Holding:
    home = "originals" if kind == "original" else "hot"
    read_at = T0 + timedelta(days=read_days) if read_days is not None else None
    copies = extra.pop("copies", (Copy(home),))
    return Holding(object_id, kind, T0, read_at, copies, **extra)  # type: ignore[arg-type]


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lifecycle.yaml"
    path.write_text(text)
    return path


# --- the default ------------------------------------------------------------------------------------------


def test_default_sends_originals_cold_30_days_after_reading_and_keeps_versions_hot() -> None:
    rules = load()
    read_on_day_5 = at_home("original", "original", read_days=5)
    assert rules.plan(read_on_day_5, day(34.9)) is None
    planned = rules.plan(read_on_day_5, day(35))
    assert planned is not None
    assert (planned.action, planned.source, planned.target, planned.storage_class) == (
        Action.MOVE, "originals", "cold", "GLACIER_IR"
    )  # fmt: skip
    assert planned.copy_needed and planned.rules == ("originals-cold",)
    for version_id, kind in (("lossless", "lossless"), ("q50", "lossy"), ("q25", "lossy")):
        assert rules.plan(at_home(version_id, kind, read_days=5), day(1000)) is None


def test_default_moves_a_never_read_study_after_the_ingest_period() -> None:
    rules = load()
    never_read = at_home("original", "original")
    assert rules.plan(never_read, day(89)) is None
    assert rules.plan(never_read, day(90)) is not None
    # read late (day 80): the read period counts, not the ingest one
    assert rules.plan(at_home("original", "original", read_days=80), day(100)) is None
    assert rules.plan(at_home("original", "original", read_days=80), day(110)) is not None


def test_nothing_is_planned_once_the_home_copy_is_gone_and_a_verified_copy_only_needs_the_delete() -> None:
    rules = load()
    moved = at_home("original", "original", copies=(Copy("cold", "GLACIER_IR"),))
    assert rules.plan(moved, day(1000)) is None
    half = at_home("original", "original", copies=(Copy("originals"), Copy("cold", "GLACIER_IR")))
    planned = rules.plan(half, day(1000))
    assert planned is not None and planned.action is Action.MOVE and not planned.copy_needed
    leaving = at_home(
        "original", "original", copies=(Copy("originals", usable=False), Copy("cold", "GLACIER_IR"))
    )
    assert rules.plan(leaving, day(1000)) is None


def test_a_prefetched_object_stays_hot_until_its_pin_expires() -> None:
    rules = load()
    pinned = at_home("original", "original", pinned_until=day(200))
    meanwhile = rules.plan(pinned, day(150))
    assert meanwhile is not None and meanwhile.action is Action.COPY  # the cold copy may be made; home stays
    copied = at_home(
        "original", "original", pinned_until=day(200), copies=(Copy("originals"), Copy("cold", "GLACIER_IR"))
    )
    assert rules.plan(copied, day(150)) is None
    later = rules.plan(copied, day(201))
    assert later is not None and later.action is Action.MOVE


# --- the presets ------------------------------------------------------------------------------------------


def test_every_preset_is_shipped_and_loads() -> None:
    assert sorted(p.stem for p in (POLICIES / "presets").glob("*.yaml")) == sorted(PRESETS)
    for name in PRESETS:
        assert load(name).moves


def test_preset_a_archives_originals_and_lossless_and_keeps_lossy_hot() -> None:
    rules = load("archive-originals")
    for object_id, kind in (("original", "original"), ("lossless", "lossless")):
        planned = rules.plan(at_home(object_id, kind, read_days=0), day(30))
        assert planned is not None and planned.action is Action.MOVE and planned.storage_class == "GLACIER"
    for object_id in ("q50", "q25"):
        assert rules.plan(at_home(object_id, "lossy", read_days=0), day(3000)) is None
    rendered = rules.render(BUCKETS)["cold-b"]
    assert rendered is not None
    assert rendered["Rules"][0]["Filter"] == {
        "And": {"Prefix": "studies/", "Tags": [{"Key": "gw-object", "Value": "original"}]}
    }
    assert rendered["Rules"][0]["Transitions"] == [{"Days": 365, "StorageClass": "DEEP_ARCHIVE"}]


def test_preset_b_mirrors_everything_at_once_then_originals_and_lossless_leave_hot() -> None:
    rules = load("mirror")
    for object_id, kind in (
        ("original", "original"),
        ("lossless", "lossless"),
        ("q50", "lossy"),
        ("q25", "lossy"),
    ):
        planned = rules.plan(at_home(object_id, kind), day(0))
        assert planned is not None and planned.action is Action.COPY and planned.copy_needed, object_id
        mirrored = at_home(object_id, kind, copies=(Copy(planned.source), Copy("cold", "GLACIER")))
        assert rules.plan(mirrored, day(1)) is None
        later = rules.plan(mirrored, day(90))
        if kind == "lossy":
            assert later is None
        else:
            assert later is not None and later.action is Action.MOVE and not later.copy_needed


def test_preset_c_archives_lossy_too_and_moves_originals_and_lossless_after_the_period() -> None:
    rules = load("archive-lossy")
    planned = rules.plan(at_home("q25", "lossy"), day(0))
    assert planned is not None and planned.action is Action.COPY
    assert rules.plan(at_home("lossless", "lossless"), day(0)) is None
    assert rules.plan(at_home("original", "original"), day(0)) is None
    for object_id, kind in (("original", "original"), ("lossless", "lossless")):
        planned = rules.plan(at_home(object_id, kind, read_days=1), day(31))
        assert planned is not None and planned.action is Action.MOVE and planned.copy_needed


# --- refusals ---------------------------------------------------------------------------------------------

GOOD = """\
moves:
  - id: m
    objects: [original]
    storage_class: GLACIER
    after: {read_days: 30}
transitions:
  - id: t
    bucket: cold
    transitions:
      - {days: 30, storage_class: STANDARD_IA}
"""


@pytest.mark.parametrize(
    ("old", "new", "line", "reason"),
    [
        ("storage_class: GLACIER", "storage_class: FROZEN", 4, "is not a storage class"),
        ("{days: 30, storage_class: STANDARD_IA}", "{days: 10, storage_class: STANDARD_IA}", 10, "30 days"),
        ("objects: [original]", "objects: [original, q99]", 3, "'q99' is not one of"),
        ("after: {read_days: 30}", "after: {read_days: -1}", 5, "must be a number of at least 0"),
        ("after: {read_days: 30}", "after: {}", 5, "read_days and/or ingest_days"),
        ("    bucket: cold", "    bucket: lukewarm", 8, "must be one of originals, hot, cold"),
        (
            "    bucket: cold",
            "    bucket: hot\n    tags: {a: b}",
            9,
            "tag filters only match in the cold bucket",
        ),
        ("  - id: m\n", "  - id: m\n    to: hot\n", 3, "moves go to the cold bucket"),
        ("  - id: m\n", "  - id: m\n    colour: blue\n", 3, "unknown key 'colour'"),
        (
            "      - {days: 30, storage_class: STANDARD_IA}",
            "      - {days: 30, storage_class: STANDARD_IA}\n      - {days: 40, storage_class: GLACIER}",
            11,
            "at least 30 days after the step to STANDARD_IA",
        ),
        (
            "      - {days: 30, storage_class: STANDARD_IA}",
            "      - {days: 90, storage_class: GLACIER}\n      - {days: 100, storage_class: STANDARD_IA}",
            11,
            "is not colder than GLACIER",
        ),
    ],
)
def test_a_bad_file_is_refused_with_its_line_and_reason(
    tmp_path: Path, old: str, new: str, line: int, reason: str
) -> None:
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(RulesError) as caught:
        load_lifecycle(path, VERSIONS)
    message = str(caught.value)
    assert message.startswith(f"{path}: line {line}:"), message
    assert reason in message


def test_two_classes_for_one_object_in_the_cold_bucket_are_refused(tmp_path: Path) -> None:
    text = (
        GOOD
        + """\
  - id: t2
    bucket: originals
    transitions:
      - {days: 30, storage_class: STANDARD_IA}
"""
    )
    load_lifecycle(write(tmp_path, text), VERSIONS)
    extra = (
        "  - id: m2\n    objects: [versions]\n    storage_class: GLACIER_IR\n    after: {ingest_days: 1}\n"
        "  - id: m3\n    objects: [lossless]\n    storage_class: DEEP_ARCHIVE\n    after: {ingest_days: 2}\n"
    )
    clash = GOOD.replace("transitions:\n", extra + "transitions:\n", 1)
    with pytest.raises(
        RulesError, match=r"line 12: moves\.2\.storage_class: lossless would go .* DEEP_ARCHIVE"
    ):
        load_lifecycle(write(tmp_path, clash), VERSIONS)


def test_broken_yaml_and_unknown_preset_say_where(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"line 3: not valid YAML"):
        load_lifecycle(write(tmp_path, "moves:\n  - id: a\n  bad: [\n"), VERSIONS)
    with pytest.raises(
        RulesError, match="no lifecycle preset 'tepid'.*archive-lossy, archive-originals, mirror"
    ):
        rules_path(POLICIES, preset="tepid")


# --- rendering --------------------------------------------------------------------------------------------


def test_render_gives_each_bucket_its_rules_in_boto3_shape(tmp_path: Path) -> None:
    text = """\
moves: []
transitions:
  - id: originals-ia
    bucket: originals
    transitions:
      - {days: 30, storage_class: STANDARD_IA}
      - {days: 60, storage_class: GLACIER}
  - id: cold-big
    bucket: cold
    prefix: ""
    min_size: 1000000
    tags: {gw-object: lossless}
    transitions:
      - {days: 1, storage_class: DEEP_ARCHIVE}
abort_incomplete_upload_days: null
"""
    rendered = load_lifecycle(write(tmp_path, text), VERSIONS).render(BUCKETS)
    assert rendered == {
        "orig-b": {
            "Rules": [
                {
                    "ID": "originals-ia",
                    "Status": "Enabled",
                    "Filter": {"Prefix": "studies/"},
                    "Transitions": [
                        {"Days": 30, "StorageClass": "STANDARD_IA"},
                        {"Days": 60, "StorageClass": "GLACIER"},
                    ],
                }
            ]
        },
        "hot-b": None,
        "cold-b": {
            "Rules": [
                {
                    "ID": "cold-big",
                    "Status": "Enabled",
                    "Filter": {
                        "And": {
                            "ObjectSizeGreaterThan": 1000000,
                            "Tags": [{"Key": "gw-object", "Value": "lossless"}],
                        }
                    },
                    "Transitions": [{"Days": 1, "StorageClass": "DEEP_ARCHIVE"}],
                }
            ]
        },
    }


def test_every_bucket_gets_the_abort_rule_by_default() -> None:
    for config in load().render(BUCKETS).values():
        assert config is not None
        assert config["Rules"][-1]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 7}


# --- properties -------------------------------------------------------------------------------------------

_copies = st.lists(
    st.builds(
        Copy,
        st.sampled_from(["originals", "hot", "cold"]),
        st.sampled_from(["STANDARD", "STANDARD_IA", "GLACIER_IR", "GLACIER", "DEEP_ARCHIVE"]),
        st.booleans(),
    ),
    max_size=3,
).map(tuple)


@given(
    preset=st.sampled_from([None, *PRESETS]),
    object_kind=st.sampled_from([("original", "original"), ("lossless", "lossless"), ("q50", "lossy")]),
    copies=_copies,
    read=st.one_of(st.none(), st.floats(0, 400)),
    when=st.floats(0, 800),
    pinned=st.one_of(st.none(), st.floats(0, 800)),
)
def test_plans_only_ever_read_from_a_usable_home_copy_and_never_unpin(
    preset: str | None,
    object_kind: tuple[str, str],
    copies: tuple[Copy, ...],
    read: float | None,
    when: float,
    pinned: float | None,
) -> None:
    rules = _loaded[preset]
    object_id, kind = object_kind
    holding = Holding(
        object_id,
        kind,
        T0,
        day(read) if read is not None else None,
        copies,
        day(pinned) if pinned is not None else None,
    )
    planned = rules.plan(holding, day(when))
    if planned is None:
        return
    assert any(c.tier == holding.home and c.usable for c in copies)
    assert planned.source == holding.home and planned.target == "cold"
    if pinned is not None and day(pinned) > day(when):
        assert planned.action is Action.COPY
    assert planned.copy_needed or planned.action is Action.MOVE
    assert re.match(r"rule [\w-]+: due since ", planned.reason)


_loaded = {name: load(name) for name in [None, *PRESETS]}
