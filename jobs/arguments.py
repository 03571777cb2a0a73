"""Command-line flags for reaching a server (TLS, mutual TLS, a bearer token): argparse only,
so that `featmap --help` loads no gRPC."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..client.channel import ChannelSecurity

TOKEN_ENV = "FEATMAP_TOKEN"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --token-file for a command."""
    group = parser.add_argument_group("connection (TLS and token auth)")
    group.add_argument("--tls", action="store_true", help="TLS, trusting the system's roots")
    group.add_argument("--tls-ca", help="CA certificate (PEM) to trust; implies --tls")
    group.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    group.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    group.add_argument("--tls-server-name", help="name to expect in the server's certificate")
    group.add_argument(
        "--token-file",
        help=f"file holding the bearer token (default: ${TOKEN_ENV}; never on the command line)",
    )


def security_from_arguments(args: argparse.Namespace) -> ChannelSecurity:
    """The ChannelSecurity add_connection_arguments' flags (and $FEATMAP_TOKEN) describe."""
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    from ..client.channel import ChannelSecurity

    return ChannelSecurity(
        tls=args.tls,
        tls_ca=Path(args.tls_ca) if args.tls_ca else None,
        tls_cert=Path(args.tls_cert) if args.tls_cert else None,
        tls_key=Path(args.tls_key) if args.tls_key else None,
        tls_server_name=args.tls_server_name,
        token=token,
    )
