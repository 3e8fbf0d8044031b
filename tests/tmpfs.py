"""A fresh small tmpfs for a test's script, in a user and mount namespace (no root needed): a full disk or a
read-only folder that even root cannot write."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO


def in_small_tmpfs(script: str, size: str = "256k") -> subprocess.CompletedProcess:
    """Run ``script`` (bash, with ``$M`` a fresh tmpfs of ``size``) in a user and mount namespace, which
    needs no root. Skips where unprivileged namespaces are off."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged mount namespaces unavailable: {probe.stderr.decode().strip()}")
    body = f"set -e; M=$(mktemp -d); mount -t tmpfs -o size={size} tmpfs $M; {script}"
    return subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "bash", "-c", body],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
