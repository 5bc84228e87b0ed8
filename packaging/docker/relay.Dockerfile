# syntax=docker/dockerfile:1
# sluice-relay as a container image. Build from the repository root:
#   docker build -f packaging/docker/relay.Dockerfile -t sluice-relay .
# Run (the image's default config is the packaged one, listening on all the container's
# addresses in plain TCP: a trial only; mount your own /etc/sluice/relay.toml with TLS):
#   docker run -p 24224:24224 -p 24231:24231 -v sluice-relay-data:/var/lib/sluice-relay sluice-relay

FROM rust:1.95-bookworm AS build
# What librdkafka's build (rdkafka-sys: cmake, vendored OpenSSL) needs, as scripts/lib/deps.sh
# installs it for development.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake perl zlib1g-dev libssl-dev libsasl2-dev \
      libzstd-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-relay --bin sluice-relay \
 && mkdir -p /out/data /out/lib \
 && cp target/release/sluice-relay /out/ \
 && objcopy --strip-debug /out/sluice-relay \
 && cp -L "/lib/$(gcc -dumpmachine)/libz.so.1" /out/lib/
# The packaged default, listening on every address of the container instead of loopback
# (a container's loopback is its own: nothing outside could reach it).
RUN { echo '# The container image: packaging/config/relay.toml with listen on 0.0.0.0.'; \
      sed 's/^listen = "127\.0\.0\.1:/listen = "0.0.0.0:/' packaging/config/relay.toml; } >/out/relay.toml \
 && grep -q '^listen = "0.0.0.0:24224"' /out/relay.toml

# distroless/cc: glibc and libgcc_s, no shell, no package manager; user nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
# The relay links zlib (librdkafka); taken from the builder's Debian 12, as the image's.
COPY --from=build /out/lib/libz.so.1 /usr/lib/libz.so.1
COPY --from=build /out/sluice-relay /usr/bin/sluice-relay
COPY --from=build /out/relay.toml /etc/sluice/relay.toml
# Spool, cursors, ledger (relay.data_dir): a volume, owned by the user the relay runs as.
COPY --from=build --chown=65532:65532 /out/data /var/lib/sluice-relay
VOLUME ["/var/lib/sluice-relay"]
USER nonroot:nonroot
# Forward v1 (TLS once configured), then /metrics, /health, /ready.
EXPOSE 24224 24231
ENTRYPOINT ["/usr/bin/sluice-relay"]
CMD ["--config", "/etc/sluice/relay.toml"]
