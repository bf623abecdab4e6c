"""Shared test helpers (tests/ is on sys.path under pytest's default import mode)."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sha256_hex(path):
    """The file's sha256 with hashlib alone (the reference for the package's hashing)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_python(code, *args, timeout=600):
    """Runs ``code`` in a fresh interpreter (same backend) and returns its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ), cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def arr(v):
    """A Keras tensor or variable as a float64 NumPy array."""
    import keras
    import numpy as np

    return np.asarray(keras.ops.convert_to_numpy(v), dtype="float64")


def bn_params(bn):
    return tuple(arr(v) for v in (bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance))


def reference_params(block, kernel=lambda k: k):
    """Copies a NewtonCGBlock's weights into the plain dicts of tests/reference.py.

    ``kernel`` maps each convolution kernel, e.g. a rank-1 block's ``(k, cin, cout)``
    to the reference's 2-D ``(1, k, cin, cout)``.
    """
    blocks = []
    for cg in block.cg_blocks:
        p = {"alpha": arr(cg.alpha)}
        if cg.beta is not None:
            p["beta"] = arr(cg.beta)
        pairs = [("w1", cg.conv1, cg.bn1), ("w2", cg.conv2, cg.bn2),
                 ("w3", cg.conv3, cg.bn3), ("w4", cg.conv4, cg.bn4)]
        if cg.use_projection:
            pairs += [("proj_g", cg.proj_g_conv, cg.proj_g_bn),
                      ("proj_y", cg.proj_y_conv, cg.proj_y_bn)]
        for key, conv, bn in pairs:
            p[key + "_w"], p[key + "_bn"] = kernel(arr(conv.kernel)), bn_params(bn)
        blocks.append(p)
    proj = (kernel(arr(block.proj_conv.kernel)), bn_params(block.proj_bn)) \
        if block.use_projection else None
    return blocks, proj
