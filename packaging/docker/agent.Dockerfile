# syntax=docker/dockerfile:1
# sluice-agent as a container image. Build from the repository root:
#   docker build -f packaging/docker/agent.Dockerfile -t sluice-agent .
# Run with the logs to ship mounted read-only and your own config (the default one
# sends to a relay at 127.0.0.1:24224, which in a container is the container itself):
#   docker run -v /var/log/app:/var/log/app:ro -v ./agent.toml:/etc/sluice/agent.toml:ro \
#     -v sluice-agent-data:/var/lib/sluice-agent sluice-agent
# The agent runs as user 65532: the mounted files must be readable by it (or run it with
# --group-add <the logs' group>).

FROM rust:1.95-bookworm AS build
# What librdkafka's build (rdkafka-sys, a dependency of the workspace) needs, as
# scripts/lib/deps.sh installs it for development.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake perl zlib1g-dev libssl-dev libsasl2-dev \
      libzstd-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-agent --bin sluice-agent \
 && mkdir -p /out/data \
 && cp target/release/sluice-agent /out/ \
 && objcopy --strip-debug /out/sluice-agent
# The packaged default, with the metrics endpoint on every address of the container so
# that health checks from outside reach /health and /ready.
RUN { echo '# The container image: packaging/config/agent.toml with metrics on 0.0.0.0.'; \
      sed 's/^listen = "127\.0\.0\.1:24232"/listen = "0.0.0.0:24232"/' packaging/config/agent.toml; } >/out/agent.toml \
 && grep -q '^listen = "0.0.0.0:24232"' /out/agent.toml

# distroless/cc: glibc and libgcc_s, no shell, no package manager; user nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/sluice-agent /usr/bin/sluice-agent
COPY --from=build /out/agent.toml /etc/sluice/agent.toml
# Checkpoints (agent.data_dir): a volume, so a new container goes on where the last stopped.
COPY --from=build --chown=65532:65532 /out/data /var/lib/sluice-agent
VOLUME ["/var/lib/sluice-agent"]
USER nonroot:nonroot
# /metrics, /health, /ready.
EXPOSE 24232
ENTRYPOINT ["/usr/bin/sluice-agent"]
CMD ["--config", "/etc/sluice/agent.toml"]
