#!/bin/sh
# Installs ct-agent, the CodeTogether agent, then offers to run it as a service.
#
#   curl -fsSL https://codetogether.dev/install.sh | sh            # latest release
#   sh install.sh --version 0.1.0 --prefix ~/.local                # a given version, elsewhere
#   sh install.sh --from-source                                    # cargo install --locked
#
# Detects the OS (Linux, macOS; WSL counts as Linux) and the architecture (x86_64, aarch64), downloads the
# matching release archive and its .sha256, checks it, and installs the binary into PREFIX/bin. Where no
# release archive exists (or with --from-source) it builds with `cargo install --locked`.
# Environment: CT_RELEASE_URL (base URL of the release archives), CT_REPO (git URL for --from-source).
set -eu

REPO_URL=${CT_REPO:-https://github.com/codetogether/codetogether}
RELEASE_URL=${CT_RELEASE_URL:-$REPO_URL/releases}
VERSION=latest
PREFIX=${PREFIX:-$HOME/.local}
FROM_SOURCE=0
SERVICE=ask

say() { printf '%s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

usage() {
  cat <<USAGE
Usage: install.sh [--version V] [--prefix DIR] [--from-source] [--service | --no-service]
  --version V      release to install (default: latest)
  --prefix DIR     install into DIR/bin (default: ~/.local)
  --from-source    build with cargo install --locked instead of downloading a release
  --service        run 'ct-agent service install' afterwards without asking
  --no-service     do not offer it
USAGE
}

while [ $# -gt 0 ]; do
  case $1 in
    --version) [ $# -ge 2 ] || die "--version needs a value"; VERSION=$2; shift 2 ;;
    --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
    --from-source) FROM_SOURCE=1; shift ;;
    --service) SERVICE=yes; shift ;;
    --no-service) SERVICE=no; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

detect_target() {
  os=$(uname -s)
  arch=$(uname -m)
  case $os in
    Linux) os_part=unknown-linux-musl ;;
    Darwin) os_part=apple-darwin ;;
    *) die "this installer supports Linux, macOS and WSL; on Windows, run installers/install-wsl.ps1 from PowerShell" ;;
  esac
  case $arch in
    x86_64|amd64) arch_part=x86_64 ;;
    aarch64|arm64) arch_part=aarch64 ;;
    *) die "no release for architecture $arch: run with --from-source (needs Rust: https://rustup.rs)" ;;
  esac
  echo "$arch_part-$os_part"
}

is_wsl() {
  grep -qi microsoft /proc/sys/kernel/osrelease 2>/dev/null
}

fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --proto '=https' --tlsv1.2 -o "$2" "$1"
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$2" "$1"
  else
    die "neither curl nor wget is installed: install one of them"
  fi
}

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    shasum -a 256 "$1" | cut -d' ' -f1
  fi
}

install_release() {
  target=$1
  if [ "$VERSION" = latest ]; then
    base=$RELEASE_URL/latest/download
  else
    base=$RELEASE_URL/download/v$VERSION
  fi
  archive=ct-agent-$target.tar.gz
  tmp=$(mktemp -d)
  # shellcheck disable=SC2064 # expand $tmp now: it is local to this function
  trap "rm -rf '$tmp'" EXIT
  say "Downloading $base/$archive"
  fetch "$base/$archive" "$tmp/$archive" || return 1
  fetch "$base/$archive.sha256" "$tmp/$archive.sha256" || die "the release has no $archive.sha256 to check the download against"
  want=$(cut -d' ' -f1 <"$tmp/$archive.sha256")
  got=$(sha256_of "$tmp/$archive")
  [ "$want" = "$got" ] || die "checksum mismatch for $archive (expected $want, got $got): not installing"
  tar -xzf "$tmp/$archive" -C "$tmp"
  mkdir -p "$PREFIX/bin"
  install -m 0755 "$tmp/ct-agent" "$PREFIX/bin/ct-agent"
  say "Installed $PREFIX/bin/ct-agent"
}

install_source() {
  command -v cargo >/dev/null 2>&1 || die "cargo is not installed: get Rust from https://rustup.rs, then run this again"
  say "Building ct-agent with cargo install --locked (a few minutes)"
  cargo install --locked --root "$PREFIX" --git "$REPO_URL" ct-agent
  say "Installed $PREFIX/bin/ct-agent"
}

target=$(detect_target)
if [ "$FROM_SOURCE" = 1 ]; then
  install_source
elif ! install_release "$target"; then
  say "No release archive for $target ($VERSION); building from source instead."
  install_source
fi

case ":$PATH:" in
  *":$PREFIX/bin:"*) ;;
  *) say "Note: $PREFIX/bin is not on your PATH; add it, e.g. echo 'export PATH=\"$PREFIX/bin:\$PATH\"' >> ~/.profile" ;;
esac

if ! command -v claude >/dev/null 2>&1; then
  say "Note: Claude Code (claude) is not on PATH; the agent needs it: npm install -g @anthropic-ai/claude-code, then claude auth login"
fi

say ""
say "Next: pair this machine with a token from /register in Discord:"
say "  $PREFIX/bin/ct-agent pair <token>"
if is_wsl; then
  say "(WSL: the service is a systemd unit when systemd is enabled in this distribution, otherwise a Windows logon task.)"
fi

if [ "$SERVICE" = ask ]; then
  if [ -t 0 ] || { [ -r /dev/tty ] && exec </dev/tty; }; then
    printf 'Run the agent as a service that starts at login/boot (ct-agent service install)? [y/N] '
    read -r answer || answer=
    case $answer in y|Y|yes|YES) SERVICE=yes ;; *) SERVICE=no ;; esac
  else
    SERVICE=no
  fi
fi
if [ "$SERVICE" = yes ]; then
  say "Installing the service (pair first if you have not: it stays stopped until the agent is paired):"
  "$PREFIX/bin/ct-agent" service install
else
  say "Later, to start it at every login/boot: ct-agent service install --allow-dir /path/to/project (see --dry-run first)"
fi
