#!/usr/bin/env bash
# Checks the deployment files without Docker and without a Kubernetes cluster:
#   - deploy/kubernetes/**: kubernetes-validate --strict (unknown fields, wrong types,
#     missing required fields, unknown kinds fail) against Kubernetes 1.29 and 1.37;
#   - docker-compose.yml: the Compose Specification schema (check-jsonschema);
#   - both, plus the env examples: imgate's own rules (deploy/ci/check_deploy.py);
#   - Dockerfile: hadolint; shell scripts: bash -n / sh -n;
#   - deploy/systemd/imgate.service: systemd-analyze verify, where systemd is installed;
#   - deploy/gen-certs.sh: makes a CA and a certificate, checked with openssl.
# Installs the validators from PyPI into a venv once (deploy/ci/requirements.txt), then
# runs in a few seconds. Used by .ci/run; runs the same by hand.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv="${IMGATE_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/imgate/deploy-venv}"
reqs=deploy/ci/requirements.txt
if ! cmp -s "$reqs" "$venv/imgate-requirements.txt" 2>/dev/null; then
  echo "-- installing validators into $venv"
  python3 -m venv --clear "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
  cp "$reqs" "$venv/imgate-requirements.txt"
fi

echo "-- kubernetes-validate --strict deploy/kubernetes/"
mapfile -t manifests < <(find deploy/kubernetes -type f | sort)
[ "${#manifests[@]}" -gt 0 ] || { echo "no manifests under deploy/kubernetes" >&2; exit 1; }
for f in "${manifests[@]}"; do
  case "$f" in
    *.yaml | *.yml | *.json) ;;
    *) echo "deploy/kubernetes holds $f, which is not a manifest (.yaml/.yml/.json)" >&2; exit 1 ;;
  esac
done
for k8s in 1.29.0 1.37.0; do
  # It only warns (exit 0) on a kind it has no schema for, such as a misspelt kind or a
  # CRD: treat every warning as a failure.
  if ! out="$("$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s" "${manifests[@]}" 2>&1)" \
    || [ -n "$out" ]; then
    printf '%s\n' "$out" >&2
    echo "kubernetes-validate (Kubernetes $k8s): deploy/kubernetes is not valid" >&2
    exit 1
  fi
done
echo "   ${#manifests[@]} files valid for Kubernetes 1.29 and 1.37"

echo "-- check-jsonschema (Compose Specification) docker-compose.yml"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

echo "-- imgate rules (deploy/ci/check_deploy.py)"
"$venv/bin/python" deploy/ci/check_deploy.py

echo "-- hadolint Dockerfile"
"$venv/bin/hadolint" --no-color Dockerfile

echo "-- shell syntax"
bash -n deploy/gen-certs.sh deploy/ci/check.sh
sh -n deploy/docker/healthcheck.sh

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

if command -v systemd-analyze >/dev/null; then
  echo "-- systemd-analyze verify deploy/systemd/imgate.service"
  # A copy whose ExecStart names a binary that exists here; any remark (such as an unknown
  # key, which systemd only warns about) fails.
  sed 's#^ExecStart=/usr/local/bin/imgate #ExecStart=/bin/true #' \
    deploy/systemd/imgate.service > "$tmp/imgate.service"
  out="$(systemd-analyze verify "$tmp/imgate.service" 2>&1)" || { echo "$out" >&2; exit 1; }
  [ -z "$out" ] || { echo "$out" >&2; exit 1; }
else
  echo "-- (no systemd-analyze here: deploy/systemd/imgate.service not verified)"
fi

echo "-- deploy/gen-certs.sh"
deploy/gen-certs.sh -d "$tmp" n1 localhost 127.0.0.1 '*.imgate.ns.svc.cluster.local' 2>/dev/null
openssl verify -CAfile "$tmp/ca.crt" "$tmp/n1.crt" >/dev/null
sans="$(openssl x509 -in "$tmp/n1.crt" -noout -ext subjectAltName)"
for want in 'DNS:localhost' 'IP Address:127.0.0.1' 'DNS:\*.imgate.ns.svc.cluster.local'; do
  grep -q "$want" <<<"$sans" || { echo "gen-certs.sh: no $want in: $sans" >&2; exit 1; }
done
[ "$(stat -c %a "$tmp/n1.key")" = 600 ] || { echo "gen-certs.sh: key not 0600" >&2; exit 1; }
echo "   CA and certificate verify, SANs present, key 0600"
echo "deploy checks: ok"
