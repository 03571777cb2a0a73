"""The console script's start (jobs/startup.py): collections paused while a job loads, and on
with what was loaded frozen once it runs; no other command and no in-process caller changed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import README_SPEC

# Runs the console script's function in a fresh process and reports the collector's state
# when the job starts (the runner's first batch) and after.
PROBE = """
import gc, json, sys
import featmap.jobs.runners as runners
seen = {}
run = runners.EmbeddedRunner.run
def probe(self, batches):
    seen["during"] = [gc.isenabled(), gc.get_freeze_count() > 0]
    yield from run(self, batches)
runners.EmbeddedRunner.run = probe
from featmap.jobs import cli
seen["before"] = [gc.isenabled(), gc.get_freeze_count() > 0]
entry = cli.console if sys.argv[1] == "console" else cli.main
code = entry(sys.argv[2:])
seen["after"] = [gc.isenabled(), gc.get_freeze_count() > 0]
seen["code"] = code
print(json.dumps(seen))
"""


def probe(tmp_path: Path, entry: str, *argv: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, entry, *argv],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        timeout=120,
    )
    return json.loads(result.stdout.splitlines()[-1])


def job_arguments(tmp_path: Path) -> list[str]:
    (tmp_path / "pipeline.json").write_text(json.dumps(README_SPEC))
    images = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    return ["extract", "--pipeline", "pipeline.json", "--input", "images.npy",
            "--output", "out.npz", "--quiet"]  # fmt: skip


def test_the_console_script_runs_the_job_with_collections_on_and_its_start_frozen(
    tmp_path: Path,
) -> None:
    seen = probe(tmp_path, "console", *job_arguments(tmp_path))
    assert seen["code"] == 0
    assert seen["before"] == [True, False]
    assert seen["during"] == [True, True]  # resumed before the first batch, the start frozen
    assert seen["after"][0] is True
    with np.load(tmp_path / "out.npz") as archive:
        assert len(archive["paths"]) == 3


def test_main_in_a_callers_process_leaves_its_collector_alone(tmp_path: Path) -> None:
    seen = probe(tmp_path, "main", *job_arguments(tmp_path))
    assert seen["code"] == 0
    assert seen["during"] == [True, False] and seen["after"] == [True, False]


def test_other_commands_resume_collections_at_once(tmp_path: Path) -> None:
    seen = probe(tmp_path, "console", "schema")
    assert seen["code"] == 0 and seen["after"][0] is True
