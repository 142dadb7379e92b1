# syntax=docker/dockerfile:1
#
# danmaku-gateway: multi-stage build.
#
#   docker build -t danmaku-gateway .
#   docker run --rm -p 8080:8080 danmaku-gateway
#
# Stage 1 compiles the dependency graph against stub sources first, so editing src/
# rebuilds only the gateway itself (that layer stays cached while Cargo.toml and
# Cargo.lock do not change). Stage 2 is debian:bookworm-slim with the binary, the shipped
# config.toml and a non-root user.

FROM rust:1-bookworm AS builder
WORKDIR /src

# 1. Dependencies only. The workspace has two members (the gateway and loadtest); both
#    manifests must be present for Cargo to resolve it, with stub targets (loadtest keeps
#    its stub: the image does not ship it).
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/Cargo.toml
RUN mkdir -p src loadtest/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs \
    && cargo build --release --locked -p danmaku-gateway \
    && rm -rf src

# 2. The gateway. `include_str!` embeds config.toml and web/*.{html,js,css}, so both are
#    needed at compile time. COPY keeps the context's mtimes, which may be older than the
#    stubs above: touch the crate roots so Cargo rebuilds the real sources.
COPY src src
COPY web web
COPY config.toml config.toml
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p danmaku-gateway \
    && cp target/release/danmaku-gateway /usr/local/bin/danmaku-gateway

FROM debian:bookworm-slim AS runtime

# A fixed numeric uid/gid, so Kubernetes' runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 danmaku \
    && useradd --system --uid 10001 --gid danmaku --home-dir /app --shell /usr/sbin/nologin danmaku \
    && mkdir -p /app/data /etc/danmaku \
    && chown -R danmaku:danmaku /app

COPY --from=builder /usr/local/bin/danmaku-gateway /usr/local/bin/danmaku-gateway
# The shipped defaults. Kubernetes mounts its ConfigMap over /etc/danmaku; docker compose
# overrides single keys with GATEWAY_<SECTION>__<KEY> environment variables.
COPY config.toml /etc/danmaku/config.toml

WORKDIR /app
# data.dir = "data" (relative) is /app/data: the red-packet journal and settlement log of
# backplane = "local". With backplane = "redis" that state lives in Redis instead.
VOLUME ["/app/data"]
USER 10001:10001
ENV RUST_LOG=info
EXPOSE 8080

# SIGTERM starts the drain (server.drain_s, default 10 s: /readyz 503, connections closed
# with 1001 spread over the window) and the process exits 0 after it. Give the container
# more than that before SIGKILL: `docker stop -t 30`, compose `stop_grace_period: 30s`,
# Kubernetes `terminationGracePeriodSeconds: 30`.
STOPSIGNAL SIGTERM

# No curl in the slim image: bash's /dev/tcp speaks just enough HTTP. Assumes the
# default server.listen port 8080.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["/usr/local/bin/danmaku-gateway"]
CMD ["--config", "/etc/danmaku/config.toml"]
