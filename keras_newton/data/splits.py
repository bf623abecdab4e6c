"""Seeded, class-balanced index splits and the seeds of resumed runs (NumPy only: no
Keras, no TensorFlow).

`holdout_split` is the validation hold-out of training (``keras-newton train``), of
``evaluate`` and of the int8 export's calibration (calibrated on the training part only).
`epoch_seed` is the data seed of a call that resumes a run.
"""

import numpy as np


def holdout_split(labels, val_size, seed=0):
    """Splits indices into a training part and a fixed, seeded, class-balanced hold-out.

    Each class gives ``val_size // num_classes`` images; the remainder goes to the
    first classes (one more each). The result depends only on ``labels``, ``val_size``
    and ``seed``.

    Args:
        labels: int array ``(n,)``.
        val_size: number of held-out images, ``0 <= val_size < n``.
        seed: int seed of the split.

    Returns:
        ``(train_indices, val_indices)``, each sorted.
    """
    labels = np.asarray(labels)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not (
        0 <= val_size < len(labels)
    ):
        raise ValueError(
            f"`val_size` must be an int in [0, {len(labels)}) (the training images). "
            f"Received: val_size={val_size!r}"
        )
    return _balanced_take(labels, np.arange(len(labels)), val_size, seed)


def balanced_subset(labels, indices, size, seed=0):
    """Returns ``size`` of ``indices`` (sorted), class-balanced and seeded."""
    return _balanced_take(np.asarray(labels), np.asarray(indices), size, seed)[1]


def _balanced_take(labels, indices, size, seed):
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[indices])
    per_class = [rng.permutation(indices[labels[indices] == c]) for c in classes]
    quota = [size // len(classes) + (i < size % len(classes)) for i in range(len(classes))]
    # A class with too few images gives what it has; the others make up the difference.
    taken = [min(q, len(p)) for q, p in zip(quota, per_class, strict=True)]
    short = size - sum(taken)
    for i, p in enumerate(per_class):
        extra = min(short, len(p) - taken[i])
        taken[i] += extra
        short -= extra
    chosen = np.concatenate([p[:t] for p, t in zip(per_class, taken, strict=True)])
    rest = np.setdiff1d(indices, chosen)
    return np.sort(rest), np.sort(chosen)


def epoch_seed(seed, first_epoch=0):
    """The seed of the shuffles and augmentation of a call that starts after
    ``first_epoch`` finished epochs: ``seed`` for a new run, else one drawn from
    ``(seed, first_epoch)``. A resumed run then draws new batches instead of replaying
    those of its first call (both were drawn from ``seed`` in a fresh process)."""
    if isinstance(first_epoch, bool) or not isinstance(first_epoch, int) or first_epoch < 0:
        raise ValueError("`first_epoch` must be a non-negative integer. "
                         f"Received: first_epoch={first_epoch!r}")
    if first_epoch == 0:
        return seed
    return int(np.random.default_rng([seed, first_epoch]).integers(2**31 - 1))
