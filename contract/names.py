"""Pipeline names and ids: what a registered pipeline may be called, without the spec's models.

A name is what a person calls a registered pipeline (and what OIP clients address it by); an
id is the content hash the server gives it. A name can be used wherever an id is, so the two
must not be confusable: a name is never 32 lowercase hex digits. The client checks a name
before sending it, the server when it registers one; neither needs pydantic for it.
"""

from __future__ import annotations

import re

from .errors import InvalidSpec

PIPELINE_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")
PIPELINE_ID_PATTERN = re.compile(r"[0-9a-f]{32}")


def check_pipeline_name(name: str, field: str = "name") -> str:
    """`name` if it may name a pipeline; InvalidSpec naming `field` otherwise."""
    if PIPELINE_NAME_PATTERN.fullmatch(name) is None:
        raise InvalidSpec(
            field,
            f"{name!r} must be 1-64 letters, digits, '_', '.' or '-', starting with a letter",
        )
    if PIPELINE_ID_PATTERN.fullmatch(name) is not None:
        raise InvalidSpec(field, f"{name!r} looks like a pipeline id; choose another name")
    return name
