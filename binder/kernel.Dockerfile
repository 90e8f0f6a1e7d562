# The kernel sandbox image for the provisioner's kubernetes runtime: Python, ipykernel,
# a scientific stack and this package's kernel agent (the container's main process).
# Build from the repository root:
#
#   docker build -f binder/kernel.Dockerfile -t jupyter-sandbox-kernel:latest .
#
# (Named kernel.Dockerfile so that repo2docker, which reads binder/, does not use it.)
FROM python:3.11-slim

RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin jovyan

COPY pyproject.toml README.md /src/
COPY sandbox_provisioner /src/sandbox_provisioner
COPY agent_sandbox /src/agent_sandbox
COPY sandbox_spawner /src/sandbox_spawner
RUN pip install --no-cache-dir /src \
        numpy pandas scipy matplotlib scikit-learn ipywidgets \
    && rm -rf /src \
    # Build matplotlib's font cache now, not in every sandbox.
    && MPLCONFIGDIR=/usr/local/share/matplotlib python -c "import matplotlib.pyplot"

ENV MPLCONFIGDIR=/usr/local/share/matplotlib \
    PYDEVD_DISABLE_FILE_VALIDATION=1
USER 1000
WORKDIR /home/jovyan
EXPOSE 8900
# The templates in jupyter_config/kubernetes/ give the command and its arguments.
CMD ["python", "-m", "sandbox_provisioner.agent", "serve"]
