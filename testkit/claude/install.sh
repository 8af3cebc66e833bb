#!/usr/bin/env bash
# Installs the two Claude Code CLIs the tests run, each from its package-lock.json (node_modules are git-ignored):
#   - testkit/claude/node_modules      the newest CLI the project is tested with (NEWEST below);
#   - testkit/claude/min/node_modules  the oldest CLI the agent supports (ct_agent::claude::MIN_VERSION).
# The runner's contract tests run against both (agent/tests/claude_runner.rs), so the agent's claim to support
# everything from MIN_VERSION up to NEWEST is tested, not assumed.
# Idempotent: a folder whose CLI already has the pinned version is left alone, so it can run every time.
set -euo pipefail

NEWEST="2.1.332"
MINIMUM="2.1.197"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

installed_version() {
    # `claude --version` prints e.g. "2.1.332 (Claude Code)"; keep the first word only.
    if [[ -x "$1/node_modules/.bin/claude" ]]; then
        DISABLE_AUTOUPDATER=1 "$1/node_modules/.bin/claude" --version 2>/dev/null | awk '{print $1; exit}' || true
    fi
}

install_pinned() {
    local dir="$1" want="$2"
    if [[ "$(installed_version "$dir")" == "$want" ]]; then
        echo "claude ${want} already installed in ${dir}/node_modules"
        return
    fi
    # npm 11 warns that the CLI's postinstall (which links its native binary) is "not yet covered by
    # allowScripts", and runs it all the same; the version check below is what tells whether it worked.
    (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
    local got
    got="$(installed_version "$dir")"
    if [[ "$got" != "$want" ]]; then
        echo "install.sh: expected claude ${want} in ${dir}, got '${got}'" >&2
        echo "Remove ${dir}/node_modules and run this script again; npm needs to reach the npm registry." >&2
        exit 1
    fi
    echo "claude ${want} installed in ${dir}/node_modules"
}

install_pinned "$here" "$NEWEST"
install_pinned "$here/min" "$MINIMUM"
