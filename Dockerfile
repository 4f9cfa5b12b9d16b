# Multi-stage build of the worker daemon.
FROM rust:1.95-slim-bookworm AS build
# make: jemalloc (the global allocator, src/lib.rs) is built from C by its configure/make.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# `.git` is not in the build context: pass the commit for `worker --version` and /readyz, e.g.
# `docker build --build-arg WORKER_GIT_COMMIT=$(git rev-parse --short=12 HEAD) .` or
# `fly deploy --build-arg WORKER_GIT_COMMIT=…` (without it the commit reads `unknown`).
ARG WORKER_GIT_COMMIT=unknown
ARG SOURCE_DATE_EPOCH
RUN cargo build --release --locked --bin worker

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin worker
WORKDIR /app
COPY --from=build /src/target/release/worker ./worker
COPY scripts/start.sh ./start.sh
COPY migrations ./migrations
COPY config ./config
USER worker
ENV APP_ENV=production \
    WORKER_CONFIG=/app/config/production.toml
EXPOSE 8080
# `worker health` GETs /healthz on health.listen (127.0.0.1 when it listens on 0.0.0.0) within 2 s
# and exits 0 on 200, else 1 with the reason: no curl in the image.
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["/app/worker", "health"]
STOPSIGNAL SIGTERM
CMD ["./start.sh", "worker"]
