"""Pipelines from files at start (`featmap serve --pipelines DIR`), registered as clients would.

Every spec file (.yaml/.yml/.json) of DIR becomes the RegisterPipelineRequest a client would
send (contract.wire.registration_message: the spec as JSON text, `<stem>.npz`'s arrays as weight
tensors, `<stem>.calibration.npy` as int8 calibration images, the stem as its name) and goes
through FeatureService.register_pipeline: the same size limits, admission, weights check,
int8 build and store as RegisterPipeline, with `replace`, so that the file's name wins.

Files directly in DIR are the default tenant's; DIR/<tenant>/ holds a tenant's (a tenant that
the server's tokens name). Names starting with '.' are not read: a Kubernetes ConfigMap
volume keeps its own `..data` links and timestamped folders there.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..contract.errors import FeatmapError, listing
from ..contract.names import check_pipeline_name
from ..contract.wire import registration_message
from .api import FeatureService
from .security import DEFAULT_TENANT, TENANT_PATTERN, Caller
from .specfiles import (
    SPEC_SUFFIXES,
    SpecFileError,
    load_array_file,
    load_weight_tensors,
    read_spec_file,
)

log = logging.getLogger("featmap.server")

WEIGHTS_SUFFIX = ".npz"
CALIBRATION_SUFFIX = ".calibration.npy"


class PipelineFileError(ValueError):
    """A file of the pipelines folder cannot be registered; the message names file and field."""


@dataclass(frozen=True)
class PipelineFile:
    """One spec file, the files beside it that it takes, and whose it is."""

    spec: Path
    tenant: str

    @property
    def name(self) -> str:
        """The pipeline's name: the file's stem."""
        return self.spec.stem

    def beside(self, suffix: str) -> Path | None:
        """`<stem><suffix>` in the spec's folder, if there is one."""
        path = self.spec.with_name(self.name + suffix)
        return path if path.is_file() else None


def pipeline_files(
    folder: Path, tenants: Collection[str]
) -> Iterator[PipelineFile | PipelineFileError]:
    """The spec files of `folder` and of its tenants' subfolders, in name order, and a
    PipelineFileError in place of each entry that cannot be one."""
    if not folder.is_dir():
        raise PipelineFileError(f"pipelines_dir: {folder} is not a folder")
    yield from _folder_files(folder, DEFAULT_TENANT)
    for entry in _entries(folder):
        if not entry.is_dir():
            continue
        if TENANT_PATTERN.fullmatch(entry.name) is None or entry.name not in tenants:
            known = (
                f"the tokens name {listing(sorted(tenants))}" if tenants else "no token names one"
            )
            yield PipelineFileError(
                f"{entry}: a folder in pipelines_dir holds the pipelines of the tenant it is named "
                f"after, and {known} (auth_tokens_file: 'tenant:token' lines)"
            )
            continue
        yield from _folder_files(entry, entry.name)


def _entries(folder: Path) -> list[Path]:
    """A folder's entries by name, without those starting with '.'."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _folder_files(folder: Path, tenant: str) -> Iterator[PipelineFile | PipelineFileError]:
    """The spec files directly in `folder`; two for one name is an error naming both."""
    specs: dict[str, list[Path]] = {}
    for entry in _entries(folder):
        if entry.is_file() and entry.suffix.lower() in SPEC_SUFFIXES:
            specs.setdefault(entry.stem, []).append(entry)
        elif entry.is_file() and not entry.name.endswith((WEIGHTS_SUFFIX, CALIBRATION_SUFFIX)):
            log.warning("pipelines_dir: %s is not a spec file (.yaml, .yml, .json): ignored", entry)
    for stem, paths in specs.items():
        if len(paths) > 1:
            yield PipelineFileError(
                f"{paths[0]}: {[p.name for p in paths]} would both name the pipeline {stem!r}"
            )
        else:
            yield PipelineFile(paths[0], tenant)


def register_file(service: FeatureService, file: PipelineFile) -> str:
    """Register one spec file for its tenant; its pipeline id. PipelineFileError names the
    file (the .npz or .npy when the problem is in its arrays) and the field."""
    limits = service.limits
    weights = file.beside(WEIGHTS_SUFFIX)
    calibration = file.beside(CALIBRATION_SUFFIX)
    try:
        name = check_pipeline_name(file.name)
        spec = json.dumps(read_spec_file(file.spec, limits.max_spec_bytes))
        tensors = (
            {}
            if weights is None
            else load_weight_tensors(weights, limits.max_message_bytes, "weights")
        )
        images = (
            None
            if calibration is None
            else load_array_file(calibration, limits.max_message_bytes, "calibration")
        )
        request = registration_message(spec, tensors, name=name, replace=True, calibration=images)
        response = service.register_pipeline(request, Caller(tenant=file.tenant))
    except SpecFileError as exc:
        raise PipelineFileError(str(exc)) from None
    except FeatmapError as exc:
        blamed = {"weights": weights, "calibration": calibration}.get(
            exc.field.partition("[")[0].partition(".")[0]
        )
        raise PipelineFileError(f"{blamed or file.spec}: {exc}") from None
    return response.pipeline_id


def register_pipeline_dir(
    service: FeatureService, folder: Path, tenants: Collection[str], skip_invalid: bool = False
) -> int:
    """Register every spec file of `folder` (see the module docstring); how many were.

    The first file that cannot be registered raises PipelineFileError; with `skip_invalid`
    each is logged at ERROR instead and the rest go on.
    """
    registered = 0
    for file in pipeline_files(folder, tenants):
        try:
            if isinstance(file, PipelineFileError):
                raise file
            pipeline_id = register_file(service, file)
        except PipelineFileError as exc:
            if not skip_invalid:
                raise
            log.error("pipelines_dir: skipped (--skip-invalid): %s", exc)
            continue
        registered += 1
        tenant = f" for tenant {file.tenant}" if file.tenant != DEFAULT_TENANT else ""
        log.info("registered %s as %s%s from %s", pipeline_id, file.name, tenant, file.spec)
    return registered
