"""Shared-memory names: what a region or segment key may be called, and whose it is.

A client holds a random owner *secret* and sends it with every shared-memory call. Names in
/dev/shm are visible to every local user, so they carry only the owner's public id, a hash of
the secret: `featmap_<id>_...`. The server accepts a region or segment key only if it starts
with the prefix of the secret the caller presented, so knowing a name is not enough to use it.
"""

from __future__ import annotations

import hashlib
import re

# Letters, digits, `_ - .`, starting with a letter, digit or `_`: no slashes (one flat POSIX
# namespace), and no "." or ".." that would name /dev/shm itself or its parent.
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,199}")
MAX_NAME_LENGTH = 200
SEGMENT_PREFIX = "featmap_"
# At least 16 characters, so that a secret cannot be guessed; the client's are 32 hex digits.
SECRET_PATTERN = re.compile(r"[A-Za-z0-9_-]{16,128}")
OWNER_ID_LENGTH = 24  # hex digits of the secret's hash in names: 96 bits


def owner_id(secret: str) -> str:
    """The public id of an owner secret: what names in /dev/shm show instead of the secret."""
    return hashlib.sha256(f"featmap-shared-memory\0{secret}".encode()).hexdigest()[:OWNER_ID_LENGTH]


def segment_prefix(secret: str) -> str:
    """The prefix of every segment and region name the client holding `secret` may use."""
    return f"{SEGMENT_PREFIX}{owner_id(secret)}_"


# Where Linux keeps POSIX shared-memory objects: shm_open names them /<key>. The client creates
# its segments there, the server opens them there.
SHM_DIRECTORY = "/dev/shm"
