# The ctxmem worker image: CUDA torch from PyPI, ctxmem with the reference model and its data.
FROM python:3.11-slim

WORKDIR /app
# PyPI's Linux build of torch bundles the CUDA runtime; the host provides the driver.
RUN pip install --no-cache-dir torch==2.13.0

COPY pyproject.toml README.md ./
COPY ctxmem ./ctxmem
COPY adapters ./adapters
RUN pip install --no-cache-dir ".[data]"

CMD ["ctxmem", "demo"]
