"""The OpenAPI 3.1 description of every /api route, written by hand (DESIGN.md "HTTP API beyond
DICOMweb"); enumerations (versions, roles, locations) come from the rules in force. Pure data."""

from __future__ import annotations

from typing import Any

from policies.access import AccessRules
from policies.rules import Purpose, VersionRules
from policies.status import DiagnosisStatus

UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$"


def _uid(name: str, where: str = "path", description: str = "") -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description or f"a DICOM UID (PS3.5 9.1), {name}",
        "schema": {"type": "string", "maxLength": 64, "pattern": UID_PATTERN},
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _problem(status: int, description: str) -> tuple[str, dict[str, Any]]:
    return str(status), {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "a malformed UID, parameter or body (the body says which)",
        401: "auth is on and the bearer token is missing or invalid (WWW-Authenticate says why)",
        403: "the caller's role may not do this (the body says why)",
        404: "no such study or profile",
        503: "the index, Redis or object storage failed; retry (Retry-After)",
    }
    return dict(_problem(code, text[code]) for code in codes)


def document(versions: VersionRules, access: AccessRules) -> dict[str, Any]:
    version_ids = [v.id for v in versions.versions]
    statuses = [s.value for s in DiagnosisStatus] + [s.label for s in DiagnosisStatus]
    status_schema = {
        "oneOf": [
            {"type": "integer", "enum": [s.value for s in DiagnosisStatus]},
            {"type": "string", "enum": statuses},
        ]
    }
    study = _uid("study", description="Study Instance UID")
    diagnosis_body = {"$ref": "#/components/schemas/Diagnosis"}
    profile_name = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "user:NAME (a token subject) or group:NAME; a bare name is a user",
        "schema": {"type": "string"},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "DICOMweb gateway API",
            "version": "1",
            "description": "The gateway's API beyond DICOMweb (QIDO-RS, WADO-RS, STOW-RS: /dicomweb).",
        },
        "servers": [{"url": "/api"}],
        "security": [{"bearer": []}],
        "paths": {
            "/studies/{study}/versions": {
                "get": {
                    "summary": "The versions of every instance of a study, with state, size, ratio and PSNR",
                    "description": "Any role that may retrieve.",
                    "parameters": [study],
                    "responses": {
                        "200": _json({"type": "object"}, "per instance, each version"),
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/studies/{study}/storage": {
                "get": {
                    "summary": "Where each object of the study lives (bucket, storage class, restore state)",
                    "description": "Any role that may retrieve.",
                    "parameters": [study],
                    "responses": {
                        "200": _json({"type": "object"}, "per object, each copy"),
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/studies/{study}/prefetch": {
                "post": {
                    "summary": "Make a study (and the patient's priors) hot again ahead of a reading",
                    "description": "radiologist, teleradiologist, referring, admin.",
                    "parameters": [
                        study,
                        _query("priors", {"type": "integer", "minimum": 0}, "how many priors"),
                    ],
                    "responses": {
                        "200": _json({"type": "object"}, "everything is already hot"),
                        "202": {"description": "queued; progress at the Location given"},
                        **_errors(400, 401, 403, 404, 503),
                    },
                },
                "get": {
                    "summary": "Progress of the study's prefetch (restores started, objects hot)",
                    "description": "radiologist, teleradiologist, referring, admin.",
                    "parameters": [study],
                    "responses": {
                        "200": _json({"type": "object"}, "progress"),
                        **_errors(400, 401, 403, 404, 503),
                    },
                },
            },
            "/studies/{study}/diagnosis": {
                "get": {
                    "summary": "The study's diagnosis status and its history",
                    "description": "Any role that may retrieve.",
                    "parameters": [study],
                    "responses": {
                        "200": _json(diagnosis_body, "status and history"),
                        **_errors(400, 401, 403, 404, 503),
                    },
                },
                "put": {
                    "summary": "Set the status (code or name), backwards too, to correct a mistake",
                    "description": "radiologist, teleradiologist, admin.",
                    "parameters": [study, _query("status", status_schema, "the status, instead of a body")],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"status": status_schema},
                                    "required": ["status"],
                                }
                            }
                        },
                    },
                    "responses": {
                        "200": _json(diagnosis_body, "the status now; changed says whether it moved"),
                        **_errors(400, 401, 403, 404, 503),
                    },
                },
            },
            "/studies/{study}/notes": {
                "post": {
                    "summary": "Reading notes, stored in the study as a Basic Text SR (PARTIAL)",
                    "description": "radiologist, teleradiologist, admin. Advances the status to notes.",
                    "parameters": [study],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["text"],
                                    "properties": {"text": {"type": "string", "maxLength": 100000}},
                                }
                            },
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    },
                    "responses": {
                        "201": _json(
                            {"$ref": "#/components/schemas/StoredNotes"}, "stored; Location is its URL"
                        ),
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/policy/explain": {
                "get": {
                    "summary": "The policy's full decision trace for a hypothetical retrieve",
                    "description": "Any role that may retrieve. Without study: status, modality, size.",
                    "parameters": [
                        _uid("study", "query", "a stored study (its status and versions are used)"),
                        _query("status", status_schema, "the status to assume (required without study)"),
                        _query(
                            "role",
                            {"type": "string"},
                            "roles, comma-separated (default: the caller's): " + ", ".join(access.roles),
                        ),
                        _query(
                            "version", {"type": "string", "enum": version_ids}, "a version asked for by name"
                        ),
                        _query(
                            "quality", {"type": "integer", "minimum": 1, "maximum": 100}, "minimum quality"
                        ),
                        _query("purpose", {"type": "string", "enum": [p.value for p in Purpose]}, "purpose"),
                        _query("resolution", {"type": "string", "pattern": r"^\d+(x\d+)?$"}, "display size"),
                        _query("accept", {"type": "string"}, "an Accept header value of a retrieve"),
                        _query("downlink", {"type": "number"}, "Client Hint Downlink (Mbit/s)"),
                        _query("rtt", {"type": "number"}, "Client Hint RTT (ms)"),
                        _query(
                            "ect",
                            {"type": "string", "enum": ["slow-2g", "2g", "3g", "4g"]},
                            "Client Hint ECT",
                        ),
                        _query("save_data", {"type": "string", "enum": ["on"]}, "Client Hint Save-Data"),
                        _query("device_memory", {"type": "number"}, "Client Hint Device-Memory (GiB)"),
                        _query("viewport_width", {"type": "integer"}, "Client Hint Viewport-Width"),
                        _query("dpr", {"type": "number"}, "Client Hint DPR"),
                        _query(
                            "location", {"type": "string", "enum": list(access.location_names)}, "location"
                        ),
                        _query("address", {"type": "string"}, "a client address, located by the CIDR rules"),
                        _query("measured", {"type": "number"}, "measured throughput to assume (Mbit/s)"),
                        _query(
                            "modality", {"type": "string"}, "without study: the modality (for lossy sizes)"
                        ),
                        _query("size", {"type": "integer"}, "without study: bytes of uncompressed originals"),
                    ],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Explanation"}, "decision and trace"),
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/profiles": {
                "get": {
                    "summary": "Every registered client profile",
                    "description": "admin.",
                    "responses": {
                        "200": _json({"type": "object"}, "profiles by name"),
                        **_errors(401, 403, 503),
                    },
                }
            },
            "/profiles/{name}": {
                "get": {
                    "summary": "One client profile",
                    "description": "admin, or the user itself.",
                    "parameters": [profile_name],
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Profile"}, "the profile"),
                        **_errors(400, 401, 403, 404, 503),
                    },
                },
                "put": {
                    "summary": "Register a user's or a group's client profile",
                    "description": "admin. A user's own profile wins over its groups'.",
                    "parameters": [profile_name],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Profile"}}},
                    },
                    "responses": {
                        "200": _json({"$ref": "#/components/schemas/Profile"}, "stored"),
                        **_errors(400, 401, 403, 503),
                    },
                },
                "delete": {
                    "summary": "Remove a client profile",
                    "description": "admin.",
                    "parameters": [profile_name],
                    "responses": {"204": {"description": "removed"}, **_errors(400, 401, 403, 404, 503)},
                },
            },
            "/studies/{study}/series/{series}/instances/{sop}/original": {
                "get": {
                    "summary": "The exact bytes received (any transfer syntax)",
                    "description": "radiologist and admin.",
                    "parameters": [study, _uid("series"), _uid("sop")],
                    "responses": {
                        "200": {"description": "application/dicom"},
                        **_errors(400, 401, 403, 404, 503),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": {
                "Problem": {
                    "type": "object",
                    "properties": {
                        "title": {"type": "string"},
                        "status": {"type": "integer"},
                        "detail": {"type": "string"},
                    },
                },
                "Diagnosis": {
                    "type": "object",
                    "properties": {
                        "study_uid": {"type": "string"},
                        "status": {"type": "integer", "minimum": 1, "maximum": 5},
                        "name": {"type": "string", "enum": [s.label for s in DiagnosisStatus]},
                        "changed": {"type": "boolean"},
                        "history": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "at": {"type": "string", "format": "date-time"},
                                    "who": {"type": "string"},
                                    "role": {"type": ["string", "null"]},
                                    "from": {"type": "integer"},
                                    "to": {"type": "integer"},
                                    "source": {"type": "string"},
                                    "sop_uid": {"type": ["string", "null"]},
                                },
                            },
                        },
                    },
                },
                "StoredNotes": {
                    "type": "object",
                    "properties": {
                        name: {"type": "string"}
                        for name in (
                            "study_uid",
                            "series_uid",
                            "sop_uid",
                            "sop_class_uid",
                            "retrieve_url",
                            "name",
                        )
                    },
                },
                "Profile": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "display": {"type": "string", "pattern": r"^\d+(x\d+)?$"},
                        "decode": {"type": "array", "items": {"type": "string"}},
                        "location": {"type": "string", "enum": list(access.location_names)},
                        "downlink_mbps": {"type": "number", "exclusiveMinimum": 0},
                        "rtt_ms": {"type": "number", "exclusiveMinimum": 0},
                        "save_data": {"type": "boolean"},
                        "note": {"type": "string"},
                    },
                },
                "Explanation": {
                    "type": "object",
                    "properties": {
                        "request": {"type": "object"},
                        "client": {"type": "object"},
                        "decision": {
                            "type": "object",
                            "properties": {
                                "outcome": {
                                    "type": "string",
                                    "enum": ["serve", "denied", "not_acceptable", "unavailable"],
                                },
                                "http_status": {"type": "integer"},
                                "version": {"type": ["string", "null"]},
                                "served": {"type": ["string", "null"]},
                                "reason": {"type": "string"},
                            },
                        },
                        "verdicts": {"type": "array", "items": {"type": "object"}},
                        "trace": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        },
    }
