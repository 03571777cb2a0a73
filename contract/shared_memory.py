"""Shared-memory names: what a region, segment key or owner may be called, and the segment
names a client's pool creates (which carry the owner, so the server can check whose they are)."""

from __future__ import annotations

import re

# Letters, digits, `_ - .`, starting with a letter, digit or `_`: no slashes (one flat POSIX
# namespace), and no "." or ".." that would name /dev/shm itself or its parent.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
MAX_NAME_LENGTH = 200
SEGMENT_PREFIX = "featmap_"


def segment_prefix(owner: str) -> str:
    """The prefix of every segment and region name a client with this owner id creates."""
    return f"{SEGMENT_PREFIX}{owner}_"
