#!/usr/bin/env bash
# Make sure a Docker engine answers (Docker workspaces and their tests need one) and that
# debootstrap is there to build the workspace image offline. Idempotent: when an engine answers
# and debootstrap is installed, it changes nothing.
#   root, no engine: installs Debian's docker.io (and debootstrap) with apt-get when missing,
#                    starts dockerd in the background, waits up to 60 s for it to answer.
#   not root, no engine: warns; fails only when CI=true.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*" >&2; }
log=/var/log/forgeline-dockerd.log
socket=/var/run/docker.sock

engine_answers() {
    if command -v docker >/dev/null 2>&1 && timeout 15 docker info >/dev/null 2>&1; then
        return 0
    fi
    [ -z "${DOCKER_HOST:-}" ] && [ -S "$socket" ] && command -v curl >/dev/null 2>&1 \
        && [ "$(curl -s --max-time 5 --unix-socket "$socket" http://localhost/_ping)" = OK ]
}

apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-docker: no apt-get here; install $* yourself" >&2
        return 1
    fi
    say "installing $* (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

is_root=false
[ "$(id -u)" = 0 ] && is_root=true

# debootstrap builds the workspace image when no registry has it (handlers/workspaces/image.py).
if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
    if $is_root; then
        apt_install debootstrap debian-archive-keyring
    else
        warn "debootstrap is missing: the workspace image can only be used, not built" \
            "(sudo apt-get install debootstrap)"
    fi
fi

# npm installs the agent CLIs (Codex, Claude Code) into the image (handlers/workspaces/agent_tools.py).
if ! command -v npm >/dev/null 2>&1; then
    if $is_root; then
        apt_install npm
    else
        warn "npm is missing: the workspace image can only be used, not built (sudo apt-get install npm)"
    fi
fi

if engine_answers; then
    say "Docker engine answers"
    exit 0
fi

if ! $is_root; then
    warn "no Docker engine answers: Docker workspaces and the tests marked 'docker' need one" \
        "(run this script as root, or start Docker and let this user use it)"
    [ "${CI:-}" = true ] && exit 1
    exit 0
fi

if ! command -v dockerd >/dev/null 2>&1 && [ ! -x /usr/sbin/dockerd ]; then
    apt_install docker.io
fi
PATH="$PATH:/usr/sbin:/sbin"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
    say "starting docker (systemctl)"
    systemctl start docker || true
fi
if ! engine_answers && ! pgrep -x dockerd >/dev/null 2>&1; then
    say "starting dockerd in the background (log: $log)"
    nohup dockerd >"$log" 2>&1 &
fi
for _ in $(seq 60); do
    if engine_answers; then
        say "Docker engine answers"
        exit 0
    fi
    sleep 1
done
echo "ensure-docker: no Docker engine answered at ${DOCKER_HOST:-unix://$socket} within 60 s" >&2
if [ -s "$log" ]; then
    echo "dockerd's log ($log) ends with:" >&2
    tail -n 20 "$log" >&2
fi
exit 1
