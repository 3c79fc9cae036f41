"""access.yaml: the shipped defaults are DESIGN.md's tables; bad files are refused with line and reason;
edited files are reloaded without a restart and a bad edit keeps the last good rules."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from gateway.errors import RulesError
from policies.access import load_access
from policies.permissions import Action
from policies.rules import RulesStore, load_versions
from policies.status import DiagnosisStatus

POLICIES = Path(__file__).resolve().parents[2] / "policies"
S = DiagnosisStatus


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("versions.yaml", "access.yaml"):
        (tmp_path / name).write_text((POLICIES / name).read_text())
    return tmp_path


def test_shipped_matrix_is_the_designs() -> None:
    rules = RulesStore(POLICIES).access
    design = {
        "original": {1, 2, 3, 4},
        "lossless": {1, 2, 3, 4},
        "q50": {2, 3, 4, 5},
        "q25": {2, 3, 4, 5},
    }
    assert {k: {int(s) for s in v} for k, v in rules.matrix.items()} == design


def test_shipped_roles_are_the_designs() -> None:
    rules = RulesStore(POLICIES).access
    assert not rules.roles["radiologist"].follows_matrix and not rules.roles["admin"].follows_matrix
    assert rules.roles["teleradiologist"].follows_matrix and rules.roles["referring"].follows_matrix
    assert rules.roles["referring"].versions == {"q50", "q25"}
    assert rules.roles["uploader"].versions == frozenset()
    assert rules.roles["uploader"].may == {Action.STORE}
    # DESIGN.md "Details settled": who may STOW; "HTTP API": who may set status, prefetch
    assert {r for r in rules.roles if rules.may({r}, Action.STORE)} == {
        "uploader", "radiologist", "teleradiologist", "admin"
    }  # fmt: skip
    assert {r for r in rules.roles if rules.may({r}, Action.DIAGNOSE)} == {
        "radiologist",
        "teleradiologist",
        "admin",
    }
    assert {r for r in rules.roles if rules.may({r}, Action.PREFETCH)} == {
        "radiologist", "teleradiologist", "referring", "admin"
    }  # fmt: skip
    assert {r for r in rules.roles if rules.may({r}, Action.ADMIN)} == {"admin"}
    # radiologist and admin have no transfer-time budget
    assert rules.budget({"radiologist"}, "home") is None and rules.budget({"admin"}, "er") is None


def test_several_roles_get_the_most_permissive() -> None:
    rules = RulesStore(POLICIES).access
    assert rules.allowed({"referring", "radiologist"}, "original", S.REPORTED)
    assert not rules.allowed({"referring", "uploader"}, "lossless", S.READ)
    assert rules.budget({"referring", "teleradiologist"}, "home") == 60
    assert rules.budget({"referring", "radiologist"}, "home") is None
    assert rules.may({"uploader", "referring"}, Action.STORE) and rules.may(
        {"uploader", "referring"}, Action.SEARCH
    )


def test_locations_take_the_most_specific_range(folder: Path) -> None:
    text = (folder / "access.yaml").read_text().replace("  er: []", "  er: [10.20.0.0/16]")
    (folder / "access.yaml").write_text(text)
    rules = RulesStore(folder).access
    assert rules.location_of("10.20.3.4") == "er"
    assert rules.location_of("10.1.2.3") == "hospital"
    assert rules.location_of("::1") == "hospital"
    assert rules.location_of("203.0.113.9") == "home"
    assert rules.location_of("not an address") == "home"
    assert rules.location_of(None) == "home"


def test_role_aliases_map_identity_provider_names() -> None:
    rules = RulesStore(POLICIES).access
    assert rules.known_roles({"dicom-radiologist", "offline_access", "referring"}) == {
        "radiologist",
        "referring",
    }


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("  q50: [read, notes, annotated, reported]", "  q50: [read, notes, final]", "final"),
        ("  q25: [read, notes, annotated, reported]", "  q99: [read]", "q99"),
        ("    versions: [q50, q25]", "    versions: [q50, q75]", "versions"),
        (
            "    matrix: ignore\n  teleradiologist",
            "    matrix: sometimes\n  teleradiologist",
            "follow or ignore",
        ),
        ("    may: [store]", "    may: [store, fly]", "fly"),
        ("  er: []", "  er: [10.0.0.0/33]", "CIDR"),
        ("  referring: {hospital: 20", "  referring: {hospital: -3", "positive"),
        ("  teleradiologist: {hospital: null", "  surgeon: {hospital: null", "surgeon"),
        ("    status: reported", "    status: finished", "finished"),
        ("decision_cache_seconds: 300", "decision_cache_seconds: many", "integer"),
        ("roles:\n", "roles: [\n", "YAML"),
    ],
)
def test_a_bad_access_file_is_refused_with_line_and_reason(
    folder: Path, old: str, new: str, words: str
) -> None:
    text = (folder / "access.yaml").read_text()
    assert old in text, old
    changed_line = text[: text.index(old)].count("\n") + 1
    (folder / "access.yaml").write_text(text.replace(old, new, 1))
    with pytest.raises(RulesError) as caught:
        load_access(folder / "access.yaml", load_versions(folder / "versions.yaml"))
    message = str(caught.value)
    reported = int(re.search(r": line (\d+):", message).group(1))  # type: ignore[union-attr]
    assert abs(reported - changed_line) <= 2 and words in message, message


def test_a_matrix_without_a_row_for_a_version_is_refused(folder: Path) -> None:
    text = (folder / "access.yaml").read_text().replace("  q25: [read, notes, annotated, reported]\n", "")
    (folder / "access.yaml").write_text(text)
    with pytest.raises(RulesError, match="no row for q25"):
        RulesStore(folder).access  # noqa: B018


def _touch_later(path: Path, text: str) -> None:
    path.write_text(text)
    stamp = time.time() + 5  # a different mtime even on coarse file systems
    os.utime(path, (stamp, stamp))


def test_edited_rules_are_picked_up_without_a_restart(folder: Path) -> None:
    text = (
        (folder / "access.yaml").read_text().replace("reload_check_seconds: 5", "reload_check_seconds: 0.01")
    )
    (folder / "access.yaml").write_text(text)
    store = RulesStore(folder)
    assert store.access.budget({"referring"}, "home") == 20
    first = store.generation
    _touch_later(folder / "access.yaml", text.replace("home: 20, default: 20}", "home: 45, default: 20}"))
    time.sleep(0.02)
    assert store.access.budget({"referring"}, "home") == 45
    assert store.generation != first


def test_a_bad_edit_keeps_the_last_good_rules_and_says_why(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = (
        (folder / "access.yaml").read_text().replace("reload_check_seconds: 5", "reload_check_seconds: 0.01")
    )
    (folder / "access.yaml").write_text(text)
    store = RulesStore(folder)
    assert store.access.allowed({"referring"}, "q50", S.READ)
    good = store.generation
    _touch_later(folder / "access.yaml", text.replace("  q50: [read,", "  q50: [reed,"))
    time.sleep(0.02)
    assert store.access.allowed({"referring"}, "q50", S.READ)  # still the last good rules
    assert store.generation == good
    assert store.last_error is not None and "reed" in store.last_error and "line" in store.last_error
    assert any("last good rules stay" in r.getMessage() for r in caplog.records)
    with pytest.raises(RulesError):
        store.reload()


def test_both_files_are_swapped_together(folder: Path) -> None:
    """A good versions.yaml beside a bad access.yaml changes nothing."""
    store = RulesStore(folder)
    assert store.access and store.versions.target_ratio("q50", "CT") == 10
    (folder / "versions.yaml").write_text(
        (folder / "versions.yaml").read_text().replace("CT: {q50: 10, q25: 20}", "CT: {q50: 12, q25: 20}")
    )
    (folder / "access.yaml").write_text("matrix: {}\n")
    with pytest.raises(RulesError):
        store.reload()
    assert store.versions.target_ratio("q50", "CT") == 10
