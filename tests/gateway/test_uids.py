from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import keys
from gateway.errors import InvalidUID
from gateway.uids import InstanceRef, check_uid, is_valid_uid, new_uid

component = st.one_of(st.just("0"), st.from_regex(r"[1-9][0-9]{0,5}", fullmatch=True))


@given(st.lists(component, min_size=1, max_size=8))
def test_dotted_numeric_components_are_valid_up_to_64_chars(parts: list[str]) -> None:
    uid = ".".join(parts)
    assert is_valid_uid(uid) == (len(uid) <= 64)


@pytest.mark.parametrize(
    "bad",
    ["", "1.2.abc", "1." + "2" * 63, "1..2", "1.2.", ".1.2", "1.02.3", "1.2/3", "../1.2", "1.2 ", "1.2\x00"],
)
def test_bad_uids_are_rejected_with_the_reason(bad: str) -> None:
    assert not is_valid_uid(bad)
    with pytest.raises(InvalidUID) as caught:
        check_uid(bad, "StudyInstanceUID")
    assert "StudyInstanceUID" in caught.value.detail
    assert caught.value.status == 400


def test_new_uids_are_valid_and_unique() -> None:
    made = {new_uid() for _ in range(200)} | {new_uid("1.2.826.0.1.3680043.10.999.") for _ in range(50)}
    assert len(made) == 250
    assert all(is_valid_uid(uid) for uid in made)


def test_keys_follow_the_bucket_layout() -> None:
    ref = InstanceRef("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert keys.original(ref) == "studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5.dcm"
    assert keys.version(ref, "q50") == "studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5/q50.dcm"
    assert keys.reduced(ref, "lossless", 512, 256).endswith("/1.2.3.4.5/lossless@512x256.dcm")
    assert keys.series_metadata("1.2.3", "1.2.3.4") == "studies/1.2.3/series/1.2.3.4/metadata.json.gz"
    assert keys.study_record("1.2.3") == "studies/1.2.3/study.json"


@pytest.mark.parametrize("bad", ["..", "1.2/../../etc", "a"])
def test_keys_never_accept_an_invalid_uid(bad: str) -> None:
    with pytest.raises(InvalidUID):
        keys.original(InstanceRef("1.2", bad, "1.3"))
