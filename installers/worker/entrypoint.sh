#!/bin/sh
# Entrypoint of the pool worker image (installers/worker/Dockerfile): pair once, then serve the pool.
#
#   ANTHROPIC_API_KEY   the operator's key: given to the agent only as its shared (metering) key, never left
#                       in the environment the agent starts anything with.
#   CT_PAIR_TOKEN       a token from `ct-relay admin pool-code --pool NAME`, used only while the config
#   CT_PAIR_TOKEN_FILE  directory holds no pairing (or a file holding the token: a mounted Secret).
#   CT_WORKER_NAME      the name the worker is listed under [default: the host name].
#   CT_AGENT_CONFIG_DIR the agent's config directory (the image sets /config, a volume of its own).
# Arguments are passed on to `ct-agent run --pool --workspaces /data`.
set -eu

config="${CT_AGENT_CONFIG_DIR:?the image sets CT_AGENT_CONFIG_DIR; set it to the config volume}"

# The key moves to the one setting the agent uses it for: its metering proxy adds it to the API requests of
# every task, outside the task's sandbox. Unset under its own name, so that nothing the agent runs could inherit
# it from ANTHROPIC_API_KEY (sandboxed tasks get an allow-listed environment and a dummy key anyway).
if [ -z "${ANTHROPIC_API_KEY:-}" ]; then
  echo "ct-worker: ANTHROPIC_API_KEY is not set: the worker needs the operator's Anthropic API key, which it" >&2
  echo "adds to every task's API requests outside the sandbox (tasks never see it)." >&2
  exit 1
fi
CT_AGENT_SHARED_API_KEY="$ANTHROPIC_API_KEY"
export CT_AGENT_SHARED_API_KEY
unset ANTHROPIC_API_KEY

# A worker that cannot sandbox refuses every pool task; say why now rather than at each task.
if ! bwrap --unshare-user --unshare-pid --unshare-net --die-with-parent --ro-bind / / --proc /proc --dev /dev \
  true; then
  echo "ct-worker: bubblewrap cannot create its namespaces in this container, so no pool task could run." >&2
  echo "The container needs unprivileged user namespaces, mount and a fresh /proc (no --privileged):" >&2
  echo "  Docker/Compose: security_opt seccomp=unconfined (or a profile allowing unshare, mount, pivot_root)," >&2
  echo "  apparmor=unconfined, systempaths=unconfined; Kubernetes: procMount Unmasked with hostUsers false," >&2
  echo "  seccomp and AppArmor as in installers/worker/k8s/worker.yaml; the host: user.max_user_namespaces > 0." >&2
  exit 1
fi

# Pair once: the pairing (the agent's key and the relay's pinned key) lives on the config volume, and the token
# is single-use, so a restarted worker keeps its pairing and never needs the token again.
# Neither variable is passed on to anything the entrypoint starts.
token="${CT_PAIR_TOKEN:-}"
token_file="${CT_PAIR_TOKEN_FILE:-}"
unset CT_PAIR_TOKEN CT_PAIR_TOKEN_FILE
if [ ! -f "$config/pairing.json" ]; then
  if [ -z "$token" ] && [ -n "$token_file" ] && [ -f "$token_file" ]; then
    token="$(cat "$token_file")"
  fi
  if [ -z "$token" ]; then
    echo "ct-worker: not paired yet and no CT_PAIR_TOKEN (or CT_PAIR_TOKEN_FILE) given: mint one with" >&2
    echo "  ct-relay admin pool-code --pool NAME" >&2
    echo "on the relay and start the worker with it." >&2
    exit 1
  fi
  # On standard input, not the command line, where any process of the container could read it.
  printf '%s\n' "$token" | ct-agent pair --name "${CT_WORKER_NAME:-$(uname -n)}" -
fi
unset token token_file

exec ct-agent run --pool --workspaces /data "$@"
