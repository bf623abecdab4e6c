"""Independent NumPy (float64) re-implementation of Algorithm 2 for the tests.

Written from the paper, not from the library: TF/Keras ``"same"`` padding, BN in
inference mode, dropout as the identity (inference).
"""

import numpy as np


def conv2d(x, w, stride=1):
    """NHWC convolution with Keras/TF ``padding="same"``; ``w`` is (kh, kw, cin, cout)."""
    kh, kw = w.shape[:2]
    pads = []
    for size, k in ((x.shape[1], kh), (x.shape[2], kw)):
        out = -(-size // stride)
        total = max((out - 1) * stride + k - size, 0)
        pads.append((total // 2, total - total // 2))
    x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # (n, oh, ow, cin, kh, kw)
    return np.einsum("nhwcij,ijcd->nhwd", windows, w)


def batch_norm(x, gamma, beta, mean, var, eps=1e-5):
    return gamma * (x - mean) / np.sqrt(var + eps) + beta


def relu(x):
    return np.maximum(x, 0.0)


def cg_block(y, d_prev, p, stride, concat=False):
    """One CG Block; ``p`` maps names to arrays (see `cg_block_params`).

    ``concat``: eq. 18, ``g = y + [g1, g2, g3]`` (channel concatenation) instead of the sum.
    """
    def conv_bn(name, inp, s):
        return batch_norm(conv2d(inp, p[name + "_w"], s), *p[name + "_bn"])

    g1 = conv_bn("w1", y, stride)
    g2 = conv_bn("w2", y, stride)
    g3 = conv_bn("w4", relu(conv_bn("w3", y, stride)), 1)
    y_g = conv_bn("proj_g", y, stride) if "proj_g_w" in p else y
    y_y = conv_bn("proj_y", y, stride) if "proj_y_w" in p else y
    g = y_g + (np.concatenate([g1, g2, g3], axis=-1) if concat else g1 + g2 + g3)
    d = -g if d_prev is None else -g + p["beta"] * d_prev
    return y_y + p["alpha"] * d, d


def newton_cg_block(x, blocks, proj, stride, concat=False):
    """Algorithm 2: ``y_0 = x``, N CG Blocks, ``ReLU(x + y_N)`` (projected skip if given)."""
    y, d = x, None
    for t, p in enumerate(blocks):
        y, d = cg_block(y, d, p, stride if t == 0 else 1, concat)
    skip = x if proj is None else batch_norm(conv2d(x, proj[0], stride), *proj[1])
    return relu(skip + y)
