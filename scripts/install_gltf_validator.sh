#!/usr/bin/env bash
# Installs the Khronos glTF validator (npm package `gltf-validator`) into a project-local
# folder, tools/node/, so tests and CI find it without a global install.
# Used by tests/test_export.py and by the CI script; run from anywhere. The version is pinned
# so validation results do not change under us; override with GLTF_VALIDATOR_VERSION.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! command -v npm >/dev/null 2>&1; then
    echo "install_gltf_validator.sh: npm not found on PATH; install Node.js (>= 16) first" >&2
    exit 1
fi
mkdir -p "${repo_root}/tools/node"
npm install --prefix "${repo_root}/tools/node" --no-audit --no-fund "gltf-validator@${GLTF_VALIDATOR_VERSION:-2.0.0-dev.3.10}"
