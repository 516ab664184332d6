# The Quorum Quest service image. With no arguments it serves on the embedded memory
# store at 0.0.0.0:5050 (defaults and QUORUMQUEST_* variables, no config file):
#   docker build -t quorum-quest .
#   docker run -p 5050:5050 -e QUORUMQUEST_SERVER_STATELOSSGRACE=0 quorum-quest
# With a config file: mount the directory that holds it (so that hot reload also sees
# editors' atomic saves) and name it; the environment still wins over the file:
#   docker run -p 5050:5050 -v "$PWD/my-config:/etc/quorum-quest:ro" \
#     quorum-quest -config=/etc/quorum-quest/config.yaml

# Build stage: the locked environment, the project installed into it as a wheel (not
# editable), every store's dependencies, bytecode compiled once.
FROM python:3.11-slim AS build
WORKDIR /app
RUN pip install --no-cache-dir uv==0.13.9
# uv uses the image's Python, never a downloaded one: the run stage has the same.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
COPY pyproject.toml uv.lock README.md LICENSE ./
COPY quorum_quest ./quorum_quest
RUN uv sync --locked --no-dev --all-extras --no-editable --no-cache

# Run stage: the environment alone, no uv, no sources, not root.
FROM python:3.11-slim
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    QUORUMQUEST_SERVERADDRESS="0.0.0.0:5050"
EXPOSE 5050
USER 65532:65532
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:5050')).Check(h.HealthCheckRequest(), timeout=2); sys.exit(s.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["quorum-quest-service"]
