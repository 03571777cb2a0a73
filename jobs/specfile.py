"""Pipeline spec files for the command line: YAML or JSON, chosen by the file's extension."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..contract.spec import (
    Pipeline,
    parse_pipeline,
)

YAML_SUFFIXES = (".yaml", ".yml")


class SpecFileError(ValueError):
    """The file cannot be read or is not YAML/JSON; the message names the file."""


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The spec in a .yaml/.yml or .json file, as a dict (not yet validated)."""
    path = Path(path)
    if path.suffix.lower() not in (*YAML_SUFFIXES, ".json"):
        raise SpecFileError(
            f"{path}: a pipeline file is .yaml, .yml or .json (the extension picks the parser)"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        # JSON is YAML too, but a .json file gets JSON's stricter parser and its messages.
        data = yaml.safe_load(text) if path.suffix.lower() in YAML_SUFFIXES else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "YAML" if path.suffix.lower() in YAML_SUFFIXES else "JSON"
        raise SpecFileError(f"{path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise SpecFileError(f"{path}: expected a mapping with 'input' and 'layers' at the top")
    return data


def load_pipeline_file(path: str | Path) -> Pipeline:
    """A validated Pipeline from a spec file; InvalidSpec names the offending field."""
    return parse_pipeline(read_spec_file(path))


def load_weight_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Named weight tensors from a .npz file (the names the spec's {"tensor": NAME} uses).

    SpecFileError, saying `--weights` and why, when the file cannot be read as one.
    """
    try:
        with Path(path).open("rb") as file, np.load(file, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise SpecFileError(f"--weights: cannot read {path}: {exc}") from None
