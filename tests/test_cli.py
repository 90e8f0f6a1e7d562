"""``jupyter sandbox`` subcommands, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

JUPYTER_SANDBOX = [sys.executable, "-m", "sandbox_provisioner.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*JUPYTER_SANDBOX, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_kernelspec_install_and_list(tmp_path: Path):
    result = run("kernelspec", "install", f"--prefix={tmp_path}")
    assert result.returncode == 0, result.stderr
    kernels = tmp_path / "share" / "jupyter" / "kernels"
    assert sorted(p.name for p in kernels.iterdir()) == [
        "sandboxed-python",
        "sandboxed-python-bubblewrap",
        "sandboxed-python-gvisor",
    ]
    for spec_dir in kernels.iterdir():
        spec = json.loads((spec_dir / "kernel.json").read_text())
        assert spec["metadata"]["kernel_provisioner"]["provisioner_name"] == "sandbox-provisioner"
        assert (spec_dir / "logo-64x64.png").read_bytes()[:4] == b"\x89PNG"
    listed = run("kernelspec", "list", env={"JUPYTER_PATH": str(tmp_path / "share" / "jupyter")})
    assert listed.returncode == 0
    assert "sandboxed-python-gvisor" in listed.stdout and "runtime=gvisor" in listed.stdout
    assert "runtime=auto" in listed.stdout


def test_doctor_reports_each_runtime():
    result = run("doctor", "--brief")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("ok  bubblewrap") for line in lines), result.stdout
    assert any("gvisor" in line for line in lines)
    assert "'auto' uses:" in result.stdout
    # A cluster runtime is not a local fault.
    assert any(line.startswith("--  kubernetes  for kernels on a Kubernetes cluster")
               for line in lines), result.stdout  # fmt: skip
    assert not any(line.startswith("NO  kubernetes") for line in lines)


def test_doctor_full_check_starts_a_kernel():
    result = run("doctor", "--GVisorRuntime.runsc_path=/nonexistent/runsc")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bubblewrap" in result.stdout and "kernel ran code" in result.stdout
    assert "NO  gvisor      runsc not found at /nonexistent/runsc" in result.stdout


def test_doctor_without_runtimes_says_why_and_fails():
    result = run(
        "doctor",
        "--brief",
        "--BubblewrapRuntime.bwrap_path=/nonexistent/bwrap",
        "--GVisorRuntime.runsc_path=/nonexistent/runsc",
    )
    assert result.returncode == 1
    assert "apt-get install bubblewrap" in result.stdout
    assert "apt-get install runsc" in result.stdout
    assert "sandboxed kernels will not start" in result.stdout
