"""`featmap health`: the grpc.health.v1 check that Docker's HEALTHCHECK runs."""

from __future__ import annotations

from featmap.jobs.health import check_health
from featmap.service.server import SERVICE_NAME, FeatmapServer
from tests.test_cli import free_port, run_featmap


def test_serving_server_exits_0(server: FeatmapServer) -> None:
    result = run_featmap("health", "--server", server.address)
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_named_service(server: FeatmapServer) -> None:
    assert check_health(server.address, SERVICE_NAME).exit_code == 0
    unknown = check_health(server.address, "no.such.Service")
    assert unknown.exit_code == 1
    assert "unknown" in unknown.message


def test_closed_port_exits_2_with_message_on_stderr() -> None:
    result = run_featmap("health", "--server", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert result.returncode == 2
    assert "cannot reach" in result.stderr
    assert result.stdout == ""


def test_not_serving_exits_1() -> None:
    from featmap.service.settings import ServerSettings

    settings = ServerSettings(host="127.0.0.1", port=0, grpc_workers=2, intra_op_threads=1)
    with FeatmapServer(settings) as running:
        # What a draining server reports after SIGTERM, while in-flight calls finish.
        running.health.enter_graceful_shutdown()
        result = check_health(running.address)
    assert result.exit_code == 1
    assert "NOT_SERVING" in result.message
