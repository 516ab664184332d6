# The Quorum Quest service image.
#   docker build -t quorum-quest .
#   docker run -p 5050:5050 quorum-quest            # embedded memory store
FROM python:3.11-slim

WORKDIR /app
RUN pip install --no-cache-dir uv
COPY pyproject.toml uv.lock README.md LICENSE ./
COPY quorum_quest ./quorum_quest
RUN uv sync --locked --no-dev --no-cache

ENV PATH="/app/.venv/bin:${PATH}" \
    QUORUMQUEST_SERVERADDRESS="0.0.0.0:5050"
EXPOSE 5050
USER 65532:65532
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:5050')).Check(h.HealthCheckRequest(), timeout=2); sys.exit(s.status != h.HealthCheckResponse.SERVING)"]
ENTRYPOINT ["quorum-quest-service"]
CMD ["-config=/etc/quorum-quest/config.yaml"]
