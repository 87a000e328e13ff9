# imgate node image: `docker build -t imgate:local .`
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below.
# Configure the node by environment (IMGATE_NODE_ID, IMGATE_HTTP, IMGATE_GOSSIP, ...);
# see docs/DEPLOY.md. The image holds no cluster file and no secret.
#
# Written on a machine without a Docker engine: linted (hadolint, in .ci/run), its cargo
# step run by hand on the same build context, but the image itself never built there.
# docs/DEPLOY.md says what was and was not verified.

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS build
WORKDIR /src
# vendor/ holds the patched chitchat ([patch.crates-io] in Cargo.toml).
COPY Cargo.toml Cargo.lock ./
COPY vendor ./vendor
COPY src ./src
# The release profile keeps debug info (debug = 1) for profiling; the image drops it
# (symbols stay, so panics still name functions). target/ is a cache mount, so the binary
# is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin imgate \
    && install -D -m 0755 target/release/imgate /out/imgate \
    && strip --strip-debug /out/imgate

FROM debian:${DEBIAN_RELEASE}-slim
# curl only for the HEALTHCHECK (the node itself needs libc and libgcc_s, both in the base).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 imgate \
    && useradd --system --uid 10001 --gid imgate --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin imgate \
    && mkdir -p /etc/imgate/tls
COPY --from=build /out/imgate /usr/local/bin/imgate
COPY deploy/docker/healthcheck.sh /usr/local/bin/imgate-healthcheck

# The working directory is empty: without IMGATE_CONFIG (or --config) and without a mounted
# /etc/imgate/cluster.toml the node starts from its defaults plus the environment.
WORKDIR /etc/imgate
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 10001:10001
ENV IMGATE_LOG=info

# http (TCP; HTTPS + WSS when IMGATE_TLS_CERT/KEY are set), gossip (UDP), quic (UDP).
EXPOSE 9501/tcp 7001/udp 7101/udp

# Liveness only (GET /health). Readiness is GET /ready: Kubernetes uses its own probes.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/imgate-healthcheck"]

# SIGTERM drains the node (bounded by http.shutdown_timeout_ms, default 10 s): give it
# 30 s (docker stop -t 30, compose stop_grace_period, terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/imgate", "node"]
