#!/usr/bin/env bash
# Set up a development environment from a fresh clone: .venv with Forgeline (editable) and the
# test tools. Idempotent: a second run only checks, unless pyproject.toml changed or
# FORGELINE_SETUP_FORCE=1. Needs only python3 (>= 3.11) and git; pip needs a package index.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

# ---- system packages ---------------------------------------------------------------------------
# Docker workspaces: a Docker engine (Debian's docker.io, started when root) and debootstrap for
# the offline workspace image. FORGELINE_SKIP_DOCKER=1 skips it (local workspaces only).
if [ "${FORGELINE_SKIP_DOCKER:-0}" != 1 ]; then
    bash scripts/ensure-docker.sh
fi
# Browser tests (tests/e2e/test_ui.py): Debian's Chromium at /usr/bin/chromium, driven by
# Playwright from PyPI (never `playwright install`). FORGELINE_SKIP_BROWSER=1 skips it.
if [ "${FORGELINE_SKIP_BROWSER:-0}" != 1 ] && ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        say "installing Debian's chromium (browser tests)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "WARNING: no chromium and not root: the browser tests will skip" \
            "(as root: apt-get install chromium; FORGELINE_SKIP_BROWSER=1 silences this)" >&2
    fi
fi
# The benchmarks' alternative stack (bench case 6, run by CI's bench smoke) starts its own
# redis-server from Debian's package. FORGELINE_SKIP_BENCH=1 skips it.
if [ "${FORGELINE_SKIP_BENCH:-0}" != 1 ] && ! command -v redis-server >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian's redis-server (bench case 6 starts its own)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
# -----------------------------------------------------------------------------------------------

find_python() {
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 \
            && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "Forgeline needs Python 3.11 or newer as python3.11 or python3; none found." >&2
    return 1
}

create_venv() {
    local python
    python=$(find_python)
    rm -rf .venv
    say "creating .venv with $("$python" -V 2>&1)"
    if ! "$python" -m venv .venv 2>/dev/null; then
        # Debian's python3 ships venv's pip bootstrap separately.
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            say "installing Debian's python3-venv"
            apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
            rm -rf .venv
            "$python" -m venv .venv
        else
            echo "python3 -m venv failed: install python3-venv (apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
}

if ! .venv/bin/python -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    create_venv
fi

stamp=.venv/.forgeline-setup
want=$(.venv/bin/python -c 'import hashlib; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest())')
if [ "${FORGELINE_SETUP_FORCE:-0}" != 1 ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] \
    && .venv/bin/python -c 'import forgeline' 2>/dev/null; then
    say ".venv is up to date ($(.venv/bin/python -V))"
    exit 0
fi

say "upgrading pip"
.venv/bin/python -m pip install --quiet --upgrade pip
say "installing forgeline (editable) with its test and benchmark tools"
.venv/bin/python -m pip install --quiet -e '.[test,bench]'
echo "$want" > "$stamp"
say "done: .venv ready ($(.venv/bin/python -V)); run scripts/test.sh for the checks and tests"
