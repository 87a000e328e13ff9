#!/bin/sh
# The image's HEALTHCHECK: GET /health on this node's own http address (liveness only;
# readiness is GET /ready, see docs/DEPLOY.md).
#
# It reads the address from IMGATE_HTTP (default port 9501) and uses https when
# IMGATE_TLS_CERT is set. A node configured by flags or a file instead of these two
# variables needs its own check (docker run --health-cmd ...). Certificate checks are off
# (--insecure): this asks the process on the same host whether it is alive, over loopback,
# and the certificate is made for the names clients use, not for 127.0.0.1.
set -eu

addr="${IMGATE_HTTP:-127.0.0.1:9501}"
port="${addr##*:}"
host="${addr%:*}"
case "$host" in
  "" | 0.0.0.0) host=127.0.0.1 ;;
  "[::]") host="[::1]" ;;
esac

scheme=http
if [ -n "${IMGATE_TLS_CERT:-}" ]; then
  scheme=https
fi

# Docker wants exit status 1 for "unhealthy" (2 is reserved), whatever curl's reason.
curl --fail --silent --show-error --insecure --max-time 3 --output /dev/null \
  "$scheme://$host:$port/health" || exit 1
