#!/usr/bin/env bash
# Make a private CA (once) and a server certificate signed by it, for imgate's HTTPS + WSS
# (IMGATE_TLS_CERT / IMGATE_TLS_KEY). Needs only openssl.
#
#   deploy/gen-certs.sh [-d DIR] [-n DAYS] [-w] NAME SAN [SAN...]
#
#   NAME   file name of the certificate: DIR/NAME.crt and DIR/NAME.key (also its CN)
#   SAN    a name clients use to reach the node: a DNS name (wildcards such as
#          *.imgate.chat.svc.cluster.local allowed) or an IPv4/IPv6 address
#   -d DIR where to write (default deploy/certs, git-ignored); DIR/ca.crt and DIR/ca.key are
#          made on the first run and reused after, so every certificate made into DIR shares
#          one CA. A DIR this script creates gets a .gitignore of `*`, so no key is committed.
#   -n DAYS validity of the server certificate (default 397; the CA gets 3650)
#   -w     make the key files readable by everyone (0644) instead of 0600: only for a local
#          docker compose test, where the container's user (uid 10001) reads a bind mount
#
# Examples (docs/DEPLOY.md):
#   deploy/gen-certs.sh -d deploy/compose/certs -w n1 localhost 127.0.0.1 n1
#   deploy/gen-certs.sh imgate '*.imgate.chat.svc.cluster.local' chat.example.com
#
# Clients must trust DIR/ca.crt (curl --cacert, the OS or browser trust store). Keep
# DIR/ca.key offline once the certificates are made. For a public service use a real CA
# (ACME, cert-manager) instead: imgate only needs a PEM chain and a PEM key.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

dir="$(dirname "$0")/certs"
days=397
key_mode=600
while getopts 'd:n:wh' opt; do
  case "$opt" in
    d) dir="$OPTARG" ;;
    n) days="$OPTARG" ;;
    w) key_mode=644 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] || usage
name="$1"
shift
case "$name" in
  "" | */* | .*) echo "gen-certs: bad NAME '$name'" >&2; exit 2 ;;
esac
case "$days" in
  '' | *[!0-9]*) echo "gen-certs: -n wants a number of days" >&2; exit 2 ;;
esac

command -v openssl >/dev/null || { echo "gen-certs: openssl not found" >&2; exit 1; }
if [ ! -d "$dir" ]; then
  mkdir -p "$dir"
  printf '# made by deploy/gen-certs.sh: private keys, never commit\n*\n' > "$dir/.gitignore"
fi
umask 077
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# subjectAltName: each argument is an IP if it parses as one, else a DNS name.
sans=""
for san in "$@"; do
  if [[ "$san" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ || "$san" == *:* ]]; then
    entry="IP:$san"
  elif [[ "$san" =~ ^(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
    entry="DNS:$san"
  else
    echo "gen-certs: '$san' is neither an IP address nor a DNS name" >&2
    exit 2
  fi
  sans="${sans:+$sans,}$entry"
done

if [ ! -f "$dir/ca.crt" ] || [ ! -f "$dir/ca.key" ]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key" 2>/dev/null
  cat > "$tmp/ca.ext" <<'EOF'
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
  openssl req -new -sha256 -key "$dir/ca.key" \
    -subj "/CN=imgate private CA $(date -u +%Y%m%dT%H%M%SZ)" -out "$tmp/ca.csr"
  openssl x509 -req -sha256 -days 3650 -in "$tmp/ca.csr" -signkey "$dir/ca.key" \
    -extfile "$tmp/ca.ext" -out "$dir/ca.crt" 2>/dev/null
  chmod 600 "$dir/ca.key"
  chmod 644 "$dir/ca.crt"
  echo "gen-certs: new CA $dir/ca.crt (keep $dir/ca.key secret)" >&2
fi

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tmp/$name.key" 2>/dev/null
openssl req -new -sha256 -key "$tmp/$name.key" -subj "/CN=$name" -out "$tmp/$name.csr"
cat > "$tmp/leaf.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = $sans
EOF
openssl x509 -req -sha256 -days "$days" -in "$tmp/$name.csr" \
  -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial -CAserial "$tmp/ca.srl" \
  -extfile "$tmp/leaf.ext" -out "$tmp/$name.crt" 2>/dev/null
openssl verify -CAfile "$dir/ca.crt" "$tmp/$name.crt" >/dev/null

install -m "$key_mode" "$tmp/$name.key" "$dir/$name.key"
install -m 644 "$tmp/$name.crt" "$dir/$name.crt"
echo "gen-certs: $dir/$name.crt and $dir/$name.key for $sans" >&2
