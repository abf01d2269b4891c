# syntax=docker/dockerfile:1
# courier: build in the Rust image, run in a slim Debian image as a non-root user.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The workspace's other members (the test kit and the benchmark): cargo reads their manifests,
# though `cargo build` at the root builds courier alone.
COPY tools ./tools
# The cache mounts keep the crate registry and build artifacts between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && cp target/release/courier /usr/local/bin/courier

FROM debian:bookworm-slim
# TLS to partners and to amqps:// brokers is verified against the system CA store.
# curl is for the container health check (GET /readyz on the admin port, docker-compose.yml).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/courier --create-home \
        --shell /usr/sbin/nologin courier
COPY --from=builder /usr/local/bin/courier /usr/local/bin/courier
# Numeric, so that Kubernetes can check runAsNonRoot (deploy/kubernetes).
USER 10001:10001
# The default store path (data/courier) is relative to this directory.
WORKDIR /var/lib/courier
# The admin port of docker/config.toml ([admin] listen = "0.0.0.0:9464"): /healthz, /readyz, /metrics.
EXPOSE 9464
ENTRYPOINT ["courier"]
CMD ["run", "--config", "/etc/courier/config.toml"]
