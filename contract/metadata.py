"""gRPC metadata keys featmap's server sets and its clients read (and the reverse)."""

from __future__ import annotations

# Trailing: the request field an error blames (FeatmapError.field).
FIELD_KEY = "featmap-field"
# Trailing: "1" on a RESOURCE_EXHAUSTED that means "busy now", which a client may retry.
RETRYABLE_KEY = "featmap-retryable"
# Trailing: the id an INTERNAL error was logged under on the server.
REQUEST_ID_KEY = "featmap-request-id"
# Leading: `authorization: Bearer <token>`.
AUTHORIZATION_KEY = "authorization"
BEARER_PREFIX = "Bearer "


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry that carries a bearer token."""
    return (AUTHORIZATION_KEY, f"{BEARER_PREFIX}{token}")
