# syntax=docker/dockerfile:1
# One image with the three binaries: gateway-plugin, queue-worker and faas-async (the default
# command: the all-in-one server). The Helm chart picks the binary with `command`.
#
#   docker build -t faas-async:0.1.0 .
#
# Runtime: distroless (glibc, CA certificates, no shell, no package manager), numeric non-root
# USER, and no file the process writes outside two volumes: /var/lib/faas-async (state) and
# /tmp. Any UID works (OpenShift's arbitrary UIDs): both directories are group 0 and group
# writable, and nothing depends on the user having a home or a passwd entry.
# scripts/deploy/runtime-test.sh runs the binaries with this file's ENV, WORKDIR and USER on a
# read-only root as an arbitrary UID.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p faas-async -p gateway-plugin -p queue-worker --bins \
 && install -D -m 0755 -t /out/usr/local/bin \
      target/release/faas-async target/release/gateway-plugin target/release/queue-worker \
 && install -d -m 0775 /out/var/lib/faas-async /out/tmp \
 && chmod 1777 /out/tmp

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="faas-async" \
      org.opencontainers.image.description="Asynchronous function invocation for OpenFaaS-style platforms: gateway plugin, queue worker, all-in-one server" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=build --chown=0:0 /out/usr/local/bin/ /usr/local/bin/
COPY --from=build --chown=65532:0 /out/var/lib/faas-async /var/lib/faas-async
COPY --from=build --chown=0:0 /out/tmp /tmp
ENV TMPDIR=/tmp
ENV HOME=/tmp
ENV LOG_FORMAT=json
ENV FAAS_ASYNC_LISTEN=0.0.0.0:8080
ENV FAAS_ASYNC_QUEUE_DIR=/var/lib/faas-async/queue
ENV QUEUE_WORKER_STATE_DIR=/var/lib/faas-async/queue-worker
WORKDIR /var/lib/faas-async
USER 65532:0
EXPOSE 8080 8091
ENTRYPOINT ["/usr/local/bin/faas-async"]
