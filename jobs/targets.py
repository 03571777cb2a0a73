"""`--server` values as gRPC targets: one target, or several IP host:ports balanced, and every
address they resolve to."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence

from .job import JobError


def grpc_target(servers: Sequence[str]) -> tuple[str, bool]:
    """(target, load balanced) for --server values: one target, or several IP host:ports."""
    if len(servers) == 1:
        return servers[0], servers[0].startswith("dns:")
    addresses: list[tuple[str, str]] = []
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise JobError(
                f"--server {server!r}: several servers must be given as IP host:port "
                "(gRPC's ipv4:/ipv6: target lists); for a host name with several addresses "
                "give one dns:///name:port target instead",
                exit_code=2,
            ) from None
        if not port.isdigit():
            raise JobError(f"--server {server!r}: expected host:port", exit_code=2)
        addresses.append((f"ipv{ip.version}", f"[{ip}]:{port}" if ip.version == 6 else server))
    schemes = {scheme for scheme, _ in addresses}
    if len(schemes) != 1:
        raise JobError(
            "--server: gRPC cannot balance over IPv4 and IPv6 addresses together", exit_code=2
        )
    return f"{schemes.pop()}:{','.join(address for _, address in addresses)}", True


def target_addresses(servers: Sequence[str]) -> list[str]:
    """Every host:port the --server values reach (a dns:/// name resolved here, as gRPC would)."""
    addresses: list[str] = []
    for server in servers:
        if not server.startswith("dns:"):
            addresses.append(server)
            continue
        host, _, port = server.removeprefix("dns:").lstrip("/").rpartition(":")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            raise JobError(f"--server {server!r}: cannot resolve {host!r}: {exc}") from None
        for info in infos:
            ip = str(info[4][0])
            address = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
            if address not in addresses:
                addresses.append(address)
    return addresses
