"""TLS, mutual TLS, bearer tokens and the Unix socket, against real servers with throwaway
certificates."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import logging
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from featmap.client import AsyncFeatureClient, FeatmapRpcError, FeatureClient
from featmap.contract.spec import (
    Pipeline,
    parse_pipeline,
)
from featmap.service.security import Tenants, TokenAuthInterceptor
from featmap.service.server import SERVICE_NAME, FeatmapServer
from featmap.service.settings import ServerSettings
from tests.conftest import README_SPEC, assert_matches_reference
from tests.test_cli import run_featmap

TOKEN = "tok-3f9a1c0d7e"
OTHER_TOKEN = "tok-from-file-5b2e"
WRONG_TOKEN = "tok-WRONG-8c1d44"


@dataclass(frozen=True)
class Issued:
    """A key and its certificate, as PEM files."""

    key: Path
    cert: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(
    directory: Path, stem: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Issued:
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Issued(key_path, cert_path)


class CertificateAuthority:
    """A throwaway CA that issues server and client certificates, valid for a day."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.files = _write(directory, name, self.key, self.cert)

    def issue(self, name: str, *, server: bool) -> Issued:
        """A leaf certificate: for 127.0.0.1 and localhost (server), or a client's."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if server:
            names: list[x509.GeneralName] = [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _write(self.directory, name, key, cert)


@dataclass(frozen=True)
class Pki:
    """Two unrelated CAs, a server certificate and a client certificate from each."""

    ca: CertificateAuthority
    server: Issued
    client: Issued
    other_ca: CertificateAuthority
    other_client: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "featmap-test-ca")
    other = CertificateAuthority(directory, "someone-elses-ca")
    return Pki(
        ca=ca,
        server=ca.issue("featmap-server", server=True),
        client=ca.issue("featmap-client", server=False),
        other_ca=other,
        other_client=other.issue("intruder", server=False),
    )


def _settings(**overrides: object) -> ServerSettings:
    return ServerSettings(host="127.0.0.1", port=0, intra_op_threads=1, grpc_workers=4, **overrides)


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[FeatmapServer]:
    settings = _settings(tls_cert=pki.server.cert, tls_key=pki.server.key)
    with FeatmapServer(settings) as running:
        yield running


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[FeatmapServer]:
    settings = _settings(
        tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.files.cert
    )
    with FeatmapServer(settings) as running:
        yield running


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatmapServer]:
    tokens_file = tmp_path_factory.mktemp("auth") / "tokens"
    tokens_file.write_text(f"# comment lines and blank lines are skipped\n\n{OTHER_TOKEN}\n")
    settings = _settings(auth_tokens=[TOKEN], auth_tokens_file=tokens_file, reflection=True)
    with FeatmapServer(settings) as running:
        yield running


def _images() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((2, 3, 12, 12)).astype(np.float32)


def _refused(client: FeatureClient) -> FeatmapRpcError:
    with pytest.raises(FeatmapRpcError) as caught:
        client.server_info()
    return caught.value


# --------------------------------------------------------------------------- TLS


def test_tls_extract_matches_reference(
    tls_server: FeatmapServer, pki: Pki, readme_pipeline: Pipeline
) -> None:
    with FeatureClient(tls_server.address, timeout=30, tls_ca=pki.ca.files.cert) as client:
        outputs = client.extract(_images(), README_SPEC)
    assert_matches_reference(outputs, readme_pipeline, _images())


def test_tls_by_hostname_with_ca_as_bytes(tls_server: FeatmapServer, pki: Pki) -> None:
    ca = pki.ca.files.cert.read_bytes()
    with FeatureClient(f"localhost:{tls_server.port}", timeout=30, tls_ca=ca) as client:
        client.wait_ready()
        assert client.server_info().version


def test_tls_server_name_override_is_checked(tls_server: FeatmapServer, pki: Pki) -> None:
    ca = pki.ca.files.cert
    with FeatureClient(
        tls_server.address, timeout=30, tls_ca=ca, tls_server_name="localhost"
    ) as client:
        assert client.server_info().version
    with FeatureClient(
        tls_server.address, timeout=5, tls_ca=ca, tls_server_name="not-the-server.example"
    ) as client:
        assert _refused(client).code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_fails_against_tls_server(tls_server: FeatmapServer) -> None:
    with FeatureClient(tls_server.address, timeout=5) as client:
        assert _refused(client).code == grpc.StatusCode.UNAVAILABLE


def test_client_refuses_a_server_certificate_from_another_ca(
    tls_server: FeatmapServer, pki: Pki
) -> None:
    with FeatureClient(tls_server.address, timeout=5, tls_ca=pki.other_ca.files.cert) as client:
        assert _refused(client).code == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_are_checked() -> None:
    with pytest.raises(ValidationError, match="tls_cert and tls_key go together"):
        ServerSettings(tls_cert="server.pem")
    with pytest.raises(ValidationError, match="tls_client_ca"):
        ServerSettings(tls_client_ca="ca.pem")
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        FeatureClient("127.0.0.1:1", tls_cert=b"cert")


def test_missing_certificate_file_is_named(tmp_path: Path) -> None:
    settings = _settings(tls_cert=tmp_path / "absent.pem", tls_key=tmp_path / "absent.key")
    with pytest.raises(OSError, match=r"tls_key: cannot read .*absent\.key"):
        FeatmapServer(settings)


# --------------------------------------------------------------------------- mutual TLS


def test_mtls_client_without_certificate_is_refused(mtls_server: FeatmapServer, pki: Pki) -> None:
    with FeatureClient(mtls_server.address, timeout=5, tls_ca=pki.ca.files.cert) as client:
        assert _refused(client).code == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_certificate_from_another_ca_is_refused(
    mtls_server: FeatmapServer, pki: Pki
) -> None:
    with FeatureClient(
        mtls_server.address,
        timeout=5,
        tls_ca=pki.ca.files.cert,
        tls_cert=pki.other_client.cert,
        tls_key=pki.other_client.key,
    ) as client:
        assert _refused(client).code == grpc.StatusCode.UNAVAILABLE


def test_mtls_client_with_its_certificate_extracts(
    mtls_server: FeatmapServer, pki: Pki, readme_pipeline: Pipeline
) -> None:
    with FeatureClient(
        mtls_server.address,
        timeout=30,
        tls_ca=pki.ca.files.cert,
        tls_cert=pki.client.cert,
        tls_key=pki.client.key.read_bytes(),
    ) as client:
        outputs = client.extract(_images(), README_SPEC)
    assert_matches_reference(outputs, readme_pipeline, _images())


def test_async_client_over_mtls(
    mtls_server: FeatmapServer, pki: Pki, readme_pipeline: Pipeline
) -> None:
    async def run() -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
        async with AsyncFeatureClient(
            mtls_server.address,
            timeout=30,
            tls_ca=pki.ca.files.cert,
            tls_cert=pki.client.cert,
            tls_key=pki.client.key,
        ) as client:
            await client.wait_ready()
            whole = await client.extract(_images(), README_SPEC)
            parts = [part async for part in client.extract_stream([_images()], README_SPEC)]
            return whole, parts

    whole, parts = asyncio.run(run())
    assert_matches_reference(whole, readme_pipeline, _images())
    assert_matches_reference(parts[0], readme_pipeline, _images())


# --------------------------------------------------------------------------- tokens


def test_call_without_token_is_unauthenticated(token_server: FeatmapServer) -> None:
    with FeatureClient(token_server.address, timeout=10) as client:
        error = _refused(client)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing bearer token" in error.details


def test_wrong_token_is_unauthenticated_and_never_logged(
    token_server: FeatmapServer, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.DEBUG),
        FeatureClient(token_server.address, timeout=10, token=WRONG_TOKEN) as client,
    ):
        error = _refused(client)
        with pytest.raises(FeatmapRpcError) as stream_error:
            list(client.extract_stream([_images()], README_SPEC))
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.details == "invalid bearer token"
    assert stream_error.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert "UNAUTHENTICATED" in caplog.text  # the request lines were captured...
    assert WRONG_TOKEN not in caplog.text  # ...without the token
    assert WRONG_TOKEN not in error.details


def test_right_token_works_for_unary_and_stream_calls(
    token_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    images = _images()
    for token in (TOKEN, OTHER_TOKEN):  # from the settings, and from the tokens file
        with FeatureClient(token_server.address, timeout=30, token=token) as client:
            assert_matches_reference(client.extract(images, README_SPEC), readme_pipeline, images)
            [streamed] = client.extract_stream([images], README_SPEC)
            assert_matches_reference(streamed, readme_pipeline, images)


def test_async_client_sends_its_token(
    token_server: FeatmapServer, readme_pipeline: Pipeline
) -> None:
    async def run(token: str | None) -> dict[str, np.ndarray]:
        async with AsyncFeatureClient(token_server.address, timeout=30, token=token) as client:
            whole = await client.extract(_images(), README_SPEC)
            parts = [part async for part in client.extract_stream([_images()], README_SPEC)]
            assert_matches_reference(parts[0], readme_pipeline, _images())
            return whole

    assert_matches_reference(asyncio.run(run(TOKEN)), readme_pipeline, _images())
    # A unary call: grpc.aio may report a stream the server refuses before reading it as
    # INTERNAL "Internal error from Core" (grpc/grpc#36066); the blocking client does not.
    with pytest.raises(FeatmapRpcError) as caught:
        asyncio.run(run(None))
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(token_server: FeatmapServer) -> None:
    with FeatureClient(token_server.address, timeout=10) as client:
        client.wait_ready()  # grpc.health.v1.Health/Check, no token
    with grpc.insecure_channel(token_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [response] = stub.ServerReflectionInfo(iter([request]), timeout=10)
    names = {service.name for service in response.list_services_response.service}
    assert SERVICE_NAME in names


def test_refused_calls_are_counted(token_server: FeatmapServer) -> None:
    registry = token_server.metrics.registry
    labels = {"method": "GetServerInfo", "code": "UNAUTHENTICATED"}
    before = registry.get_sample_value("featmap_requests_total", labels) or 0.0
    with FeatureClient(token_server.address, timeout=10) as client:
        _refused(client)
    assert registry.get_sample_value("featmap_requests_total", labels) == before + 1


def test_tokens_from_env_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEATMAP_AUTH_TOKENS", " first , second,")
    tokens = [token.get_secret_value() for token in ServerSettings().auth_tokens]
    assert tokens == ["first", "second"]
    assert "first" not in repr(ServerSettings())


def test_empty_tokens_file_refuses_to_start(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text("# nobody\n\n")
    with pytest.raises(ValueError, match="has no tokens"):
        FeatmapServer(_settings(auth_tokens_file=tokens_file))


def test_token_check_messages() -> None:
    auth = TokenAuthInterceptor(Tenants([("", TOKEN.encode())]))
    assert auth.problem([]) is not None and "missing" in auth.problem([])  # type: ignore[operator]
    assert auth.problem([("authorization", f"Basic {TOKEN}")]) == (
        "invalid authorization metadata: expected 'Bearer <token>'"
    )
    assert auth.problem([("authorization", f"Bearer {TOKEN}x")]) == "invalid bearer token"
    assert auth.problem([("authorization", f"Bearer {TOKEN}")]) is None


def test_serve_names_an_unreadable_certificate(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    result = run_featmap("serve", "--port", "0", "--tls-cert", missing, "--tls-key", missing)
    assert result.returncode == 2
    assert "tls_key: cannot read" in result.stderr
    half = run_featmap("serve", "--port", "0", "--tls-cert", missing)
    assert half.returncode == 2
    assert "tls_cert and tls_key go together" in half.stderr


# --------------------------------------------------------------------------- the CLI's clients


def test_health_command_speaks_tls(tls_server: FeatmapServer, pki: Pki) -> None:
    from featmap.jobs.cli import main

    assert main(["health", "--server", tls_server.address, "--timeout", "5"]) == 2
    assert main(["health", "--server", tls_server.address, "--tls-ca", str(pki.ca.files.cert)]) == 0


def test_extract_command_sends_tls_and_token(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from featmap.jobs.cli import main

    settings = _settings(tls_cert=pki.server.cert, tls_key=pki.server.key, auth_tokens=[TOKEN])
    images = np.random.default_rng(8).random((2, 3, 12, 12), dtype=np.float32)
    for index, image in enumerate(images):
        np.save(tmp_path / f"image{index}.npy", image[None])
    spec = tmp_path / "pipeline.json"
    spec.write_text(json.dumps(README_SPEC))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    monkeypatch.delenv("FEATMAP_TOKEN", raising=False)
    with FeatmapServer(settings) as server:
        command = [
            "extract", "--pipeline", str(spec), "--input", str(tmp_path / "image0.npy"),
            str(tmp_path / "image1.npy"), "--server", server.address, "--quiet",
            "--tls-ca", str(pki.ca.files.cert),
        ]  # fmt: skip
        assert main([*command, "--output", str(tmp_path / "no-token.npz")]) == 1
        assert (
            main([*command, "--token-file", str(token_file), "--output", str(tmp_path / "a.npz")])
            == 0
        )
    with np.load(tmp_path / "a.npz", allow_pickle=False) as saved:
        outputs = {name: saved[name] for name in ("conv1", "features")}
    assert_matches_reference(outputs, parse_pipeline(README_SPEC), images)


# --------------------------------------------------------------------------- the Unix socket


def test_unix_socket_is_private_and_local(tmp_path: Path) -> None:
    path = tmp_path / "featmap.sock"
    with FeatmapServer(_settings(unix_socket=path, auth_tokens=[TOKEN])) as running:
        assert running.unix_address == f"unix:{path}"
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600  # only the server's user connects
        # Tokens apply on the socket as on the port.
        with FeatureClient(f"unix:{path}", timeout=30) as anonymous:
            assert _refused(anonymous).code == grpc.StatusCode.UNAUTHENTICATED
        with FeatureClient(f"unix:{path}", timeout=30, token=TOKEN) as client:
            client.extract(_images(), README_SPEC)
        # A second server cannot take over a socket that is in use.
        with pytest.raises(OSError, match="in use"):
            FeatmapServer(_settings(unix_socket=path))
    assert not path.exists()  # removed at stop


def test_a_stale_socket_is_replaced_and_other_files_are_left(tmp_path: Path) -> None:
    path = tmp_path / "featmap.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: what a killed server leaves
    with FeatmapServer(_settings(unix_socket=path)) as running:
        assert running.unix_address is not None
    path.write_text("not a socket")
    with pytest.raises(OSError, match="not a socket"):
        FeatmapServer(_settings(unix_socket=path))
    assert path.read_text() == "not a socket"


def test_max_streams_must_leave_threads_to_unary_calls() -> None:
    with pytest.raises(ValidationError, match="below grpc_workers"):
        ServerSettings(grpc_workers=8, max_streams=8)
    assert ServerSettings(grpc_workers=8).stream_limit == 4
    assert ServerSettings(grpc_workers=1).stream_limit == 1
