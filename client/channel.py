"""Channels to a featmap server: plaintext or TLS (mutual with a client certificate), and a
bearer token sent with every call."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from ..contract.metadata import bearer

# A PEM file's path, or its bytes.
PemSource = str | os.PathLike[str] | bytes


def read_pem(source: PemSource | None) -> bytes | None:
    """PEM bytes given as bytes or read from a path; None stays None."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    """grpc.ClientCallDetails with the token's metadata added."""


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call of a blocking channel."""

    def __init__(self, token: str) -> None:
        self.entry = bearer(token)

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self.entry],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _with_token(details: Any, entry: tuple[str, str]) -> Any:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*entry)
    return details._replace(metadata=metadata)


class _AioUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.entry), request)


class _AioUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self.entry), request)


class _AioStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self.entry), requests)


class _AioStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, entry: tuple[str, str]) -> None:
        self.entry = entry

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(_with_token(details, self.entry), requests)


def aio_bearer_token(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding the token to every call of a grpc.aio channel (one per call kind:
    grpc.aio files each interceptor under its first matching kind only)."""
    entry = bearer(token)
    kinds: list[Callable[[tuple[str, str]], grpc.aio.ClientInterceptor]] = [
        _AioUnaryUnary,
        _AioUnaryStream,
        _AioStreamUnary,
        _AioStreamStream,
    ]
    return [kind(entry) for kind in kinds]


@dataclass(frozen=True)
class ChannelSecurity:
    """How a client reaches the server: TLS or not, its client certificate, its token.

    TLS is on when `tls` is set or any of tls_ca/tls_cert/tls_key is given; without tls_ca the
    server's certificate is checked against the system's roots.
    """

    tls: bool = False
    tls_ca: PemSource | None = None
    tls_cert: PemSource | None = None
    tls_key: PemSource | None = None
    tls_server_name: str | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both or neither")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("token must be non-empty and contain no whitespace")

    @property
    def uses_tls(self) -> bool:
        """Whether the channel is a TLS one."""
        return self.tls or any(v is not None for v in (self.tls_ca, self.tls_cert, self.tls_key))

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials: the CA to trust and, for mutual TLS, this client's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.tls_ca),
            private_key=read_pem(self.tls_key),
            certificate_chain=read_pem(self.tls_cert),
        )

    def options(self, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Channel options plus the TLS server-name override, if any."""
        if self.tls_server_name is None:
            return list(options)
        return [*options, ("grpc.ssl_target_name_override", self.tls_server_name)]

    def channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        """A blocking channel to `address`."""
        if self.uses_tls:
            channel = grpc.secure_channel(address, self.credentials(), self.options(options))
        else:
            channel = grpc.insecure_channel(address, self.options(options))
        if self.token is None:
            return channel
        return grpc.intercept_channel(channel, BearerToken(self.token))

    def aio_channel(self, address: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """A grpc.aio channel to `address`."""
        interceptors = None if self.token is None else aio_bearer_token(self.token)
        if self.uses_tls:
            return grpc.aio.secure_channel(
                address, self.credentials(), self.options(options), interceptors=interceptors
            )
        return grpc.aio.insecure_channel(address, self.options(options), interceptors=interceptors)
