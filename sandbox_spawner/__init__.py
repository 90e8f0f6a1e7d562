"""JupyterHub spawner for per-user sandboxes (to come; see the project's issues)."""
