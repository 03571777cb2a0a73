#!/usr/bin/env bash
# mypy on the featmap.* packages. Their code lives in contract/, service/, client/, jobs/ and
# proto/featmap/{v1,oip} (mapped by setuptools' package-dir), which mypy cannot follow, so it
# checks a tree of links.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tree=$(mktemp -d)
trap 'rm -rf "$tree"' EXIT
mkdir -p "$tree/featmap"
ln -s "$root/contract" "$tree/featmap/contract"
ln -s "$root/service" "$tree/featmap/service"
ln -s "$root/client" "$tree/featmap/client"
ln -s "$root/jobs" "$tree/featmap/jobs"
ln -s "$root/proto/featmap/v1" "$tree/featmap/v1"
ln -s "$root/proto/featmap/oip" "$tree/featmap/oip"
cd "$tree"
MYPYPATH="$tree" mypy --config-file "$root/pyproject.toml" -p featmap.contract -p featmap.service \
    -p featmap.client -p featmap.jobs
