#!/usr/bin/env bash
# Installs the pinned Claude Code CLI into testkit/claude/node_modules (git-ignored) from package-lock.json.
# Idempotent: does nothing when the pinned version is already there, so CI and developers can run it every time.
set -euo pipefail

PINNED="2.1.197"
cd "$(dirname "${BASH_SOURCE[0]}")"

installed_version() {
    # `claude --version` prints e.g. "2.1.197 (Claude Code)"; keep the first word only.
    if [[ -x node_modules/.bin/claude ]]; then
        DISABLE_AUTOUPDATER=1 node_modules/.bin/claude --version 2>/dev/null | awk '{print $1; exit}' || true
    fi
}

if [[ "$(installed_version)" == "$PINNED" ]]; then
    echo "claude ${PINNED} already installed in $(pwd)/node_modules"
    exit 0
fi

npm ci --no-audit --no-fund

got="$(installed_version)"
if [[ "$got" != "$PINNED" ]]; then
    echo "install.sh: expected claude ${PINNED}, got '${got}'" >&2
    exit 1
fi
echo "claude ${PINNED} installed in $(pwd)/node_modules"
