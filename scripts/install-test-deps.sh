#!/usr/bin/env bash
# Install what the test suite needs: DCMTK (storescu, echoscu, ...), Orthanc with its
# DICOMweb plugin, and dicom-bridge itself in editable mode with the test and codec extras.
#
# Idempotent: when everything is already present it only runs two quick checks.
# The Orthanc package ships a system service; it is never started here (the tests start
# their own Orthanc on free loopback ports with their own configuration).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

SUDO=()
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO=(sudo)
fi

pkg_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

system_deps_present() {
    [[ -x /usr/bin/storescu ]] && [[ -x /usr/sbin/Orthanc ]] && pkg_installed orthanc-dicomweb
}

POLICY=/usr/sbin/policy-rc.d
OUR_POLICY=0
remove_policy() {
    if [[ "$OUR_POLICY" -eq 1 ]]; then
        "${SUDO[@]}" rm -f "$POLICY" || true
    fi
}
trap remove_policy EXIT

if ! system_deps_present; then
    echo "install-test-deps: installing dcmtk, orthanc, orthanc-dicomweb" >&2
    # Keep the orthanc service from being started by the package scripts: it is not needed,
    # would hold ports 4242/8042, and failing to start it must not fail the install.
    if [[ ! -e "$POLICY" ]]; then
        "${SUDO[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > '$POLICY' && chmod 755 '$POLICY'"
        OUR_POLICY=1
    fi
    "${SUDO[@]}" apt-get update -qq
    status=0
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends dcmtk orthanc orthanc-dicomweb || status=$?
    if [[ "$status" -ne 0 ]]; then
        # Usually a package script that tried to start the service; finish configuring.
        echo "install-test-deps: apt-get exited with $status; finishing package configuration" >&2
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive dpkg --configure -a || true
    fi
    remove_policy
    OUR_POLICY=0
    if ! system_deps_present; then
        echo "install-test-deps: DCMTK or Orthanc (with orthanc-dicomweb) is still missing" >&2
        exit 1
    fi
fi

# dicom-bridge itself, editable, with the test and codec extras. Skipped when the installed
# distribution is an editable install of this checkout whose requirements are all satisfied.
python_deps_present() {
    # From /, so that the dicom_bridge.egg-info in the checkout does not shadow the install.
    (cd / && python3 - "$ROOT") <<'PY' 2>/dev/null
import importlib.metadata as md
import json
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

root = Path(sys.argv[1]).resolve()
project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
dist = md.distribution(project["name"])
if dist.version != project["version"]:
    sys.exit(1)
direct = json.loads(dist.read_text("direct_url.json") or "{}")
if not direct.get("dir_info", {}).get("editable") or direct.get("url") != root.as_uri():
    sys.exit(1)
scripts = {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}
if scripts != set(project.get("scripts", {})):
    sys.exit(1)
wanted = list(project.get("dependencies", []))
for extra in ("test", "codecs"):
    wanted += project.get("optional-dependencies", {}).get(extra, [])
for text in wanted:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(version, prereleases=True):
        sys.exit(1)
PY
}

if ! python_deps_present; then
    echo "install-test-deps: pip install -e '.[test,codecs]'" >&2
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        python3 -m pip install -q -e '.[test,codecs]'
fi
