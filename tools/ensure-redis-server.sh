#!/usr/bin/env bash
# The Redis tier's tests run a real redis-server (and redis-cli, for a Redis Cluster).
# Where they are absent, install Debian's packages: CI runs as root on a fresh machine.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "redis-server is missing and cannot be installed here (needs root and apt-get):" \
        "install Redis 7 yourself to run the Redis tier's tests" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends redis-server redis-tools >/dev/null
# Debian's package starts a server on 6379; the tests start their own on random ports.
if command -v service >/dev/null; then
    service redis-server stop >/dev/null 2>&1 || true
fi
redis-server --version
