"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(code, *args, timeout=600):
    """Runs ``code`` in a fresh interpreter (same backend) and returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ), cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
