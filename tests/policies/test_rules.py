from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.errors import RulesError
from policies.rules import Kind, Purpose, RulesStore, load_versions

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "versions.yaml"


def test_shipped_versions_match_the_design() -> None:
    rules = load_versions(SHIPPED)
    assert [(v.id, v.kind, v.quality, v.purpose) for v in rules.versions] == [
        ("original", Kind.ORIGINAL, 100, Purpose.DIAGNOSIS),
        ("lossless", Kind.LOSSLESS, 100, Purpose.DIAGNOSIS),
        ("q50", Kind.LOSSY, 50, Purpose.REFERENCE),
        ("q25", Kind.LOSSY, 25, Purpose.COMPARISON),
    ]
    expected = {"CR": (20, 50), "DX": (20, 50), "MG": (20, 50), "CT": (10, 20), "MR": (5, 10), "US": (10, 20)}
    for modality, (q50, q25) in expected.items():
        assert (rules.target_ratio("q50", modality), rules.target_ratio("q25", modality)) == (q50, q25)


def test_rules_refine_by_body_part_and_description(tmp_path: Path) -> None:
    text = SHIPPED.read_text().replace(
        "  rules: []",
        "  rules:\n    - match: {modality: CT, body_part: HEAD}\n      ratios: {q50: 8}\n"
        "    - match: {series_description: scout}\n      ratios: {q25: 40}",
    )
    path = tmp_path / "versions.yaml"
    path.write_text(text)
    rules = load_versions(path)
    assert rules.target_ratio("q50", "CT", body_part="head") == 8
    assert rules.target_ratio("q25", "CT", body_part="HEAD") == 20
    assert rules.target_ratio("q25", "CT", series_description="Topogram SCOUT 1") == 40
    assert rules.target_ratio("q50", "CT", body_part="CHEST") == 10


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [
        ("  CT: {q50: 10, q25: 20}", "  CT: {q50: 0.5, q25: 20}", "above 1"),
        ("    quality: 50", "    quality: 500", "quality"),
        ("  default: {q50: 10, q25: 20}", "  default: {q50: 10, q99: 20}", "q99"),
        ("    kind: lossy", "    kind: weird", "kind"),
        ("versions:", "versions: [", "YAML"),
    ],
)
def test_a_bad_file_is_refused_with_line_and_reason(tmp_path: Path, old: str, new: str, words: str) -> None:
    text = SHIPPED.read_text()
    changed_line = text[: text.index(old)].count("\n") + 1
    path = tmp_path / "versions.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(RulesError) as caught:
        load_versions(path)
    message = str(caught.value)
    reported = int(re.search(r": line (\d+):", message).group(1))  # type: ignore[union-attr]
    assert abs(reported - changed_line) <= 2 and words in message, message


def test_a_bad_reload_keeps_the_last_good_rules(tmp_path: Path) -> None:
    (tmp_path / "versions.yaml").write_text(SHIPPED.read_text())
    store = RulesStore(tmp_path)
    assert store.versions.target_ratio("q50", "MR") == 5
    (tmp_path / "versions.yaml").write_text("versions: {{{")
    with pytest.raises(RulesError):
        store.reload()
    assert store.versions.target_ratio("q50", "MR") == 5


def test_objects_without_versions() -> None:
    rules = load_versions(SHIPPED)
    assert rules.gets_versions("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", True) == (True, "")
    for sop_class, syntax, pixels in [
        ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.1.2.1", True),
        ("1.2.840.10008.5.1.4.1.1.104.1", "1.2.840.10008.1.2.1", False),
        ("1.2.840.10008.5.1.4.1.1.481.1", "1.2.840.10008.1.2.1", True),
        ("1.2.840.10008.5.1.4.1.1.77.1.4.1", "1.2.840.10008.1.2.4.102", True),
        ("1.2.840.10008.5.1.4.1.1.88.22", "1.2.840.10008.1.2.1", False),
    ]:
        wanted, reason = rules.gets_versions(sop_class, syntax, pixels)
        assert not wanted and reason
