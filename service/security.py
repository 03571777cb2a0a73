"""Who may call: TLS (mutual with a client CA) on the port, bearer tokens on each call and the
tenants they name, and the Unix socket that proves a caller is local (README "Threat model")."""

from __future__ import annotations

import contextlib
import hmac
import os
import re
import socket
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ..contract.metadata import AUTHORIZATION_KEY, BEARER_PREFIX
from .settings import ServerSettings

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


def add_unix_socket(server: grpc.Server, path: Path) -> str:
    """Serve plaintext on a Unix domain socket that only the server's user may connect to.

    Connecting needs write permission on the socket file, so mode 0600 is the proof that a
    caller on it runs as the server's user on this host (Python's gRPC exposes no SO_PEERCRED
    to check instead). The umask makes the file private from the moment gRPC binds it; the
    chmod is for filesystems that ignore it. Returns the gRPC target, `unix:<path>`.
    """
    _remove_stale_socket(path)
    with _private_umask():
        bound = server.add_insecure_port(f"unix:{path}")
    if not bound:
        raise OSError(f"unix_socket: could not bind {path}")
    os.chmod(path, 0o600)
    return f"{UNIX_PEER_PREFIX}{path}"


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file a killed server left; refuse a live socket or any other file."""
    if not path.exists() and not path.is_symlink():
        return
    if not stat.S_ISSOCK(path.lstat().st_mode):
        raise OSError(f"unix_socket: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # nobody listens: left over
            return
    raise OSError(f"unix_socket: {path} is in use by another server")


@contextlib.contextmanager
def _private_umask() -> Iterator[None]:
    # Process-wide for a moment; 0o077 only takes rights from others, never from this user.
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


# A tenant's name: what `tenant:token` lines may say before the colon.
TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Tokens without a tenant, and every call when no tokens are set, belong to this one.
DEFAULT_TENANT = ""
UNIX_PEER_PREFIX = "unix:"


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant its token names, and whether it came over the Unix socket."""

    tenant: str = DEFAULT_TENANT
    local: bool = False


def parse_token(entry: str, source: str) -> tuple[str, bytes]:
    """`tenant:token` (or a bare `token` of the default tenant) as (tenant, token)."""
    tenant, colon, token = entry.partition(":")
    if not colon:
        tenant, token = DEFAULT_TENANT, entry
    elif TENANT_PATTERN.fullmatch(tenant) is None:
        # The entry may be a token: never quote it.
        raise ValueError(
            f"{source}: a tenant name must be 1 to 64 letters, digits, '_', '.' or '-' "
            "(lines are 'tenant:token' or 'token')"
        )
    if not token:
        raise ValueError(f"{source}: an entry has a tenant but no token")
    return tenant, token.encode()


def load_tenants(settings: ServerSettings) -> Tenants | None:
    """The accepted tokens and their tenants: FEATMAP_AUTH_TOKENS plus auth_tokens_file's
    lines; None when there are none (calls then need no token)."""
    entries = [
        parse_token(token.get_secret_value(), "auth_tokens") for token in settings.auth_tokens
    ]
    if settings.auth_tokens_file is not None:
        text = _read(settings.auth_tokens_file, "auth_tokens_file").decode()
        lines = [line.strip() for line in text.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        if not lines:
            # An empty file would otherwise quietly leave the server open to everyone.
            raise ValueError(f"auth_tokens_file: {settings.auth_tokens_file} has no tokens")
        entries += [parse_token(line, "auth_tokens_file") for line in lines]
    return Tenants(entries) if entries else None


class Tenants:
    """Bearer tokens and the tenant each names; which tenant a call's metadata proves."""

    def __init__(self, entries: list[tuple[str, bytes]]) -> None:
        if not entries:
            raise ValueError("Tenants needs at least one token")
        tenants: dict[bytes, str] = {}
        for tenant, token in entries:
            if tenants.setdefault(token, tenant) != tenant:
                raise ValueError("a token is listed for two tenants; each token names one")
        self._entries = list(tenants.items())

    @property
    def names(self) -> frozenset[str]:
        """The tenants the tokens name (the default tenant's is "")."""
        return frozenset(tenant for _, tenant in self._entries)

    def resolve(self, metadata: Any) -> tuple[str | None, str | None]:
        """(tenant, None) for a call with a known token, else (None, why it is refused).

        The reason never repeats what was sent.
        """
        values = [value for key, value in metadata or () if key == AUTHORIZATION_KEY]
        if not values:
            return (
                None,
                f"missing bearer token: send metadata '{AUTHORIZATION_KEY}: Bearer <token>'",
            )
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if not value.startswith(BEARER_PREFIX):
            return None, f"invalid authorization metadata: expected '{BEARER_PREFIX}<token>'"
        given = value[len(BEARER_PREFIX) :].strip().encode()
        # Compare with every token, not stopping at a match: the time taken says nothing.
        found: str | None = None
        for token, tenant in self._entries:
            if hmac.compare_digest(given, token):
                found = tenant
        return (found, None) if found is not None else (None, "invalid bearer token")


def caller_of(context: grpc.ServicerContext, tenants: Tenants | None) -> Caller:
    """The Caller of a call the TokenAuthInterceptor let through.

    Read on the handler's own thread from its metadata: the interceptor runs where gRPC looks
    up handlers, not where they run, so it has no way to hand its answer over.
    """
    tenant = DEFAULT_TENANT
    if tenants is not None:
        resolved, _ = tenants.resolve(context.invocation_metadata())
        if resolved is None:  # unreachable past the interceptor; refuse rather than guess
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid bearer token")
        tenant = resolved or DEFAULT_TENANT
    return Caller(tenant=tenant, local=context.peer().startswith(UNIX_PEER_PREFIX))


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

    def __init__(self, tenants: Tenants) -> None:
        self.tenants = tenants

    def problem(self, metadata: Any) -> str | None:
        """Why this call's metadata is refused, or None; never repeats what was sent."""
        return self.tenants.resolve(metadata)[1]

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
