# syntax=docker/dockerfile:1
# The weir-operator image. Build from the repository root:
#
#   docker build -f docker/operator.Dockerfile -t ghcr.io/weir-dev/weir-operator:0.1.0 .
#
# A release build on Debian 12 (bookworm), run on distroless cc-debian12 (glibc, libgcc_s,
# libstdc++, libssl3 and CA certificates; no shell, no package manager). The binary links
# libz (librdkafka's compression), which distroless lacks: it is copied from the build
# stage. operator/tests/integration/images.rs checks this file against the code and `ldd` of the binary.

FROM docker.io/library/rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p weir-operator --bin weir-operator \
 && mkdir -p /out/rootfs/usr/local/bin \
 && cp target/release/weir-operator /out/rootfs/usr/local/bin/weir-operator
# The shared libraries the runtime image lacks, at the path the loader searches.
RUN libdir="/usr/lib/$(gcc -print-multiarch)" \
 && mkdir -p "/out/rootfs$libdir" \
 && cp -L "$libdir/libz.so.1" "/out/rootfs$libdir/libz.so.1"

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="weir-operator" \
      org.opencontainers.image.description="Weir's Kubernetes operator: KafkaTopics, KafkaConnections and EventPipelines" \
      org.opencontainers.image.source="https://github.com/weir-dev/weir" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/rootfs/ /
# The non-root user and group of distroless' nonroot, by number (runAsNonRoot needs one).
USER 65532:65532
# /metrics, /healthz and /readyz (WEIR_METRICS_ADDR, default 0.0.0.0:8080; the chart's metrics.port)
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/weir-operator"]
