"""Diagnosis status of a study (DESIGN.md "Diagnosis status") and which stored objects advance it.

Pure: no I/O. The rules that map object kinds to statuses are data (access.yaml `status_rules`);
this module only says what a rule is and which one an object matches."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum


class DiagnosisStatus(IntEnum):
    UNREAD = 1
    READ = 2
    NOTES = 3
    ANNOTATED = 4
    REPORTED = 5

    @property
    def label(self) -> str:
        """The lower-case name the API speaks ("unread", "read", ...)."""
        return self.name.lower()

    @classmethod
    def parse(cls, value: object) -> DiagnosisStatus:
        """A status from its code (1..5, as int or text) or its name, any case.

        Raises:
            ValueError: saying which values are valid.
        """
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a diagnosis status; {cls.choices()}")
        if isinstance(value, int):
            try:
                return cls(value)
            except ValueError:
                raise ValueError(f"{value} is not a diagnosis status code; {cls.choices()}") from None
        text = str(value).strip()
        if text.isdigit():
            return cls.parse(int(text))
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"{text[:40]!r} is not a diagnosis status; {cls.choices()}") from None

    @classmethod
    def choices(cls) -> str:
        return "use a code 1..5 or a name: " + ", ".join(f"{s.value} {s.label}" for s in cls)


def may_advance(current: DiagnosisStatus, new: DiagnosisStatus) -> bool:
    """Automatic changes only move forward; a stored object never takes a study back."""
    return new > current


def may_set(current: DiagnosisStatus, new: DiagnosisStatus) -> bool:
    """Through the API any code may be set, backwards too, to correct a mistake (DESIGN.md)."""
    return new != current


@dataclass(frozen=True)
class ObjectFacts:
    """What the status rules look at in a stored object (extracted by gateway/diagnosis.py)."""

    sop_class_uid: str
    completion_flag: str | None = None  # (0040,A491) COMPLETE / PARTIAL
    templates: tuple[str, ...] = ()  # (0040,DB00) Template Identifier of the root content item
    document_title: str | None = None  # "SCHEME:VALUE" of (0040,A043) Concept Name Code Sequence


@dataclass(frozen=True)
class StatusRule:
    """A kind of object and the status its storage advances the study to; every given field must match."""

    name: str
    status: DiagnosisStatus
    sop_classes: tuple[str, ...] = ()  # exact UIDs, or "prefix.*"
    completion_flag: str | None = None
    template: str | None = None
    document_title: str | None = None

    def may_apply(self, sop_class_uid: str) -> bool:
        """The SOP Class alone does not rule this out (so images skip the rest cheaply)."""
        return not self.sop_classes or _class_matches(self.sop_classes, sop_class_uid)

    def matches(self, facts: ObjectFacts) -> bool:
        if not self.may_apply(facts.sop_class_uid):
            return False
        if self.completion_flag is not None and (facts.completion_flag or "").upper() != self.completion_flag:
            return False
        if self.template is not None and self.template not in facts.templates:
            return False
        return self.document_title is None or (facts.document_title or "").upper() == self.document_title


def _class_matches(patterns: Iterable[str], sop_class_uid: str) -> bool:
    for pattern in patterns:
        if pattern.endswith(".*"):
            if sop_class_uid.startswith(pattern[:-1]):
                return True
        elif sop_class_uid == pattern:
            return True
    return False


def status_for(rules: Sequence[StatusRule], facts: ObjectFacts) -> StatusRule | None:
    """The first rule the object matches (rules are ordered most specific first), or None."""
    return next((rule for rule in rules if rule.matches(facts)), None)
