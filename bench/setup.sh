#!/usr/bin/env bash
# Installs what the imgate benchmark's comparison peers need:
#   - redis-server (Debian package) for the Socket.IO Redis adapter
#   - the Node dependencies of bench/socketio (from package-lock.json)
# Idempotent; safe to run from any directory.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "setup: installing redis-server" >&2
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server
fi
redis-server --version

if ! command -v node >/dev/null 2>&1; then
  echo "setup: node is not installed" >&2
  exit 1
fi
node_version="$(node --version)"
node_major="${node_version#v}"
node_major="${node_major%%.*}"
if [ "$node_major" -lt 18 ]; then
  echo "setup: node >= 18 required, found $node_version" >&2
  exit 1
fi
echo "node $node_version"

if [ ! -d socketio/node_modules ]; then
  echo "setup: npm ci in bench/socketio" >&2
  (cd socketio && npm ci --no-audit --no-fund)
fi
