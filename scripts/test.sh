#!/usr/bin/env bash
# The test command of the README: installs everything the tests use, then runs them.
#
#   bash scripts/test.sh           lint, the whole suite, then the Dagster-facing tests on the lowest
#                                  supported Dagster (scripts/test-dagster-lowest.sh): what CI runs
#   bash scripts/test.sh --fast    lint, then the fast tier (no daemon, webserver, cluster, browser or
#                                  object-store emulator)
#   bash scripts/test.sh -- ARGS   lint, then pytest ARGS (any pytest selection)
#
# It needs Python 3.11+ as python3 and node/npm. Debian packages (bsdtar, chromium, redis-server,
# postgresql) are installed with apt-get when run as root, otherwise it stops with the line to run.
set -euo pipefail
cd "$(dirname "$0")/.."

fast=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --fast) fast=1 ;;
    --) shift; args=("$@"); break ;;
    *) args+=("$1") ;;
  esac
  shift
done

say() { echo "+ $*" >&2; }

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "scripts/test.sh: Python 3.11 or newer is needed as python3 (found $(python3 --version 2>&1))" >&2
  exit 1
fi

# Debian packages: bsdtar (libarchive-tools) writes part of the real-writer tar corpus; chromium
# renders the Dagster UI in the browser test; redis-server and postgresql serve the cluster tests.
missing=()
command -v bsdtar >/dev/null || missing+=(libarchive-tools)
command -v chromium >/dev/null || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v initdb >/dev/null || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q "${missing[@]}" >/dev/null
  else
    echo "scripts/test.sh: the tests need these Debian packages: ${missing[*]}" >&2
    echo "  install them as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

# Azurite, the Azure Blob emulator, comes from npm. A global prefix this user cannot write to
# (/usr as non-root): install it under the home folder instead and put that on PATH.
if ! command -v azurite-blob >/dev/null; then
  if ! command -v npm >/dev/null; then
    echo "scripts/test.sh: npm is needed to install Azurite (apt-get install -y npm)" >&2
    exit 1
  fi
  prefix="$(npm config get prefix 2>/dev/null || true)"
  if [ -z "$prefix" ] || ! [ -w "$prefix" ] || { [ -d "$prefix/lib" ] && ! [ -w "$prefix/lib" ]; }; then
    export NPM_CONFIG_PREFIX="$HOME/.npm-global"
    export PATH="$NPM_CONFIG_PREFIX/bin:$PATH"
  fi
  say "npm install -g azurite"
  npm install -g -s azurite >/dev/null
fi

say "python3 -m venv .venv && .venv/bin/pip install -e '.[dev]'"
[ -x .venv/bin/python ] || python3 -m venv .venv
if ! .venv/bin/pip install -q -e '.[dev]' > .venv/pip-install.log 2>&1; then
  cat .venv/pip-install.log >&2
  exit 1
fi

say "ruff check ."
.venv/bin/ruff check .

full=0
[ ${#args[@]} -eq 0 ] && [ "$fast" = 0 ] && full=1

# Most of the suite waits on servers, daemons and subprocesses: three processes, each taking whole
# test files (module-scoped fixtures stay shared), finish it in about half the time on two cores.
if [ ${#args[@]} -eq 0 ]; then
  args=(-n 3 --dist loadfile)
  if [ "$fast" = 1 ]; then
    args+=(-m "not slow and not cloud")
  fi
fi
say "pytest ${args[*]}"
status=0
.venv/bin/python -m pytest -q "${args[@]}" || status=$?
if [ "$full" = 1 ]; then
  # The Dagster-facing tests again on the lowest Dagster the project supports, in a venv of its own.
  say "bash scripts/test-dagster-lowest.sh"
  lowest=0
  bash scripts/test-dagster-lowest.sh -n 3 --dist loadfile || lowest=$?
  [ "$status" = 0 ] && status=$lowest
fi
exit "$status"
