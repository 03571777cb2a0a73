"""Who may call: TLS (mutual with a client CA) on the port, and bearer tokens on each call."""

from __future__ import annotations

import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from featmap.contract.metadata import AUTHORIZATION_KEY, BEARER_PREFIX
from featmap.service.settings import ServerSettings

# Health checks (load balancers, orchestrators) and reflection answer without a token.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
_BEHAVIOURS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise OSError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files; None when TLS is off."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    key = _read(settings.tls_key, "tls_key")
    chain = _read(settings.tls_cert, "tls_cert")
    client_ca = (
        None if settings.tls_client_ca is None else _read(settings.tls_client_ca, "tls_client_ca")
    )
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def add_port(server: grpc.Server, address: str, settings: ServerSettings) -> int:
    """Bind `address`, with TLS when the settings name a certificate; the bound port."""
    credentials = server_credentials(settings)
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


def load_tokens(settings: ServerSettings) -> list[bytes]:
    """The accepted bearer tokens: FEATMAP_AUTH_TOKENS plus auth_tokens_file's lines."""
    tokens = [token.get_secret_value() for token in settings.auth_tokens]
    if settings.auth_tokens_file is not None:
        text = _read(settings.auth_tokens_file, "auth_tokens_file").decode()
        from_file = [line.strip() for line in text.splitlines()]
        from_file = [token for token in from_file if token and not token.startswith("#")]
        if not from_file:
            # An empty file would otherwise quietly leave the server open to everyone.
            raise ValueError(f"auth_tokens_file: {settings.auth_tokens_file} has no tokens")
        tokens += from_file
    return [token.encode() for token in tokens]


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour replaced by an UNAUTHENTICATED answer."""

    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    changes: dict[str, Any] = {
        name: refuse for name in _BEHAVIOURS if getattr(handler, name) is not None
    }
    # An unauthenticated peer's bytes are not worth parsing (None would mean "did not parse").
    changes["request_deserializer"] = lambda raw: b""
    return handler._replace(**changes)  # type: ignore[attr-defined, no-any-return]


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` naming one of the tokens."""

    def __init__(self, tokens: list[bytes]) -> None:
        if not tokens:
            raise ValueError("TokenAuthInterceptor needs at least one token")
        self._tokens = tokens

    def problem(self, metadata: Any) -> str | None:
        """Why this call's metadata is refused, or None; never repeats what was sent."""
        values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
        if not values:
            return f"missing bearer token: send metadata '{AUTHORIZATION_KEY}: Bearer <token>'"
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if not value.startswith(BEARER_PREFIX):
            return f"invalid authorization metadata: expected '{BEARER_PREFIX}<token>'"
        given = value[len(BEARER_PREFIX) :].strip().encode()
        # Compare with every token, not stopping at a match: the time taken says nothing.
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(given, token)
        return None if matched else "invalid bearer token"

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        problem = self.problem(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        return handler if problem is None else _refusing(handler, problem)
