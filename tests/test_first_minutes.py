"""The first ten minutes of a new user: the commands as the README gives them, their help and
their mistakes."""

from __future__ import annotations

import re
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

from featmap.contract.limits import DEFAULT_LIMITS
from featmap.service.settings import ServerSettings, default_grpc_workers
from tests.conftest import README_SPEC
from tests.test_cli import FEATMAP, clean_env, featmap_serve, free_port, run_featmap
from tests.test_extract import spec_file


def test_version() -> None:
    result = run_featmap("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"featmap {version('featmap')}"


def test_serve_help_shows_the_settings_defaults() -> None:
    result = run_featmap("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    fields = ServerSettings.model_fields
    assert f"(default: {fields['session_cache_size'].default})" in text
    assert f"(default: {DEFAULT_LIMITS.max_message_bytes})" in text
    assert f"= {default_grpc_workers()} here)" in text
    assert "(default: INFO)" in text and "(default: 127.0.0.1)" in text


def test_the_readme_server_block_does_not_race() -> None:
    # `featmap serve ... &` then at once `featmap health --wait 10`: no "connection refused".
    port = free_port()
    with featmap_serve("--port", str(port)) as serving:
        started = time.monotonic()
        result = run_featmap("health", "--server", f"127.0.0.1:{port}", "--wait", "20")
        assert result.returncode == 0, (result.stderr, serving.stderr())
        assert "SERVING" in result.stdout
    assert time.monotonic() - started < 20


def test_health_wait_gives_up_on_a_dead_address() -> None:
    started = time.monotonic()
    result = run_featmap("health", "--server", f"127.0.0.1:{free_port()}", "--wait", "1")
    assert result.returncode == 2 and "cannot reach" in result.stderr
    assert 1 <= time.monotonic() - started < 10


def test_a_missing_input_is_said_alike_for_files_and_folders(tmp_path: Path) -> None:
    spec = spec_file(tmp_path, README_SPEC)
    for missing in ("photos/", "photo.png"):
        result = run_featmap(
            "extract", "--pipeline", str(spec), "--input", str(tmp_path / missing),
            "--output", str(tmp_path / "out.npz"),
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert re.search(r"no such file or folder", result.stderr), result.stderr
        assert "Traceback" not in result.stderr


def test_a_pipeline_of_another_kind_of_file_is_named_as_such(tmp_path: Path) -> None:
    notes = tmp_path / "NOTES.md"
    notes.write_text("# not a pipeline\n")
    result = run_featmap("summary", "--pipeline", str(notes))
    assert result.returncode == 2
    assert "a pipeline file is .yaml, .yml or .json" in result.stderr
    assert "not valid JSON" not in result.stderr


def test_readme_install_commands_do_not_undo_each_other() -> None:
    # The README leads with the user's install and keeps the editable one for Development; the
    # two are alternatives (`pip install .` after `pip install -e ".[dev]"` would silently
    # replace the editable install), and Development says so.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    user, development = readme.split("\n## Development\n")

    def installs(text: str) -> list[str]:
        commands = [
            line.split("#")[0].strip()
            for block in re.findall(r"```bash\n(.*?)```", text, re.S)
            for line in block.splitlines()
        ]
        return [c for c in commands if re.fullmatch(r"pip install (-e )?\"?\.(\[\w+\])?\"?", c)]

    assert installs(user) == ['pip install ".[server]"']
    assert installs(development) == ['pip install -e ".[dev]"']
    assert "one way or the other, not both" in development


def test_the_readme_server_block_waits_for_the_server() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme[readme.index("featmap serve --port 50051 &") :][:400]
    assert re.search(r"featmap health --server \S+ --wait \d+", block)


def test_featmap_help_is_quick_to_start() -> None:
    # Not a benchmark: `featmap --help` must not import the server, gRPC or onnxruntime.
    probe = (
        "import sys; sys.argv = ['featmap', '--help']\n"
        "from featmap.jobs.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('grpc', 'onnxruntime', 'onnx', 'pydantic', 'featmap.service', 'numpy')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))"
    )
    result = subprocess.run(
        [str(FEATMAP.parent / "python"), "-c", probe],
        capture_output=True, text=True, timeout=60, env=clean_env(), check=True,
    )  # fmt: skip
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
