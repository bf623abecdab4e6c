"""Picks the distribution: tf.distribute strategies on TensorFlow, DataParallel on JAX.

- ``"auto"``: ``MirroredStrategy`` over every GPU when there are several (TensorFlow),
  ``keras.distribution.DataParallel`` over every device when there are several (JAX),
  else a single device.
- ``"none"``: one device.
- ``"mirrored"``: ``MirroredStrategy`` over every GPU, or every logical CPU device when
  there is no GPU (TensorFlow); ``DataParallel`` (JAX).
- ``"multiworker"``: ``MultiWorkerMirroredStrategy`` configured by ``TF_CONFIG``
  (TensorFlow only).

The batch size is global: each step splits it evenly across the replicas.

A process creates each tf.distribute strategy once and reuses it: on TF 2.21 a second
``MirroredStrategy`` over the same devices collides with the first one's collective
ops ("Shape mismatch in the collective instance"), e.g. when ``train`` is called twice.
"""

import contextlib
import dataclasses
import json
import os

DISTRIBUTE_CHOICES = ("auto", "none", "mirrored", "multiworker")


@dataclasses.dataclass
class Distribution:
    """The chosen distribution.

    Attributes:
        kind: ``"none"``, ``"mirrored"``, ``"multiworker"`` or ``"data_parallel"``.
        scope: zero-argument callable returning the context manager in which the
            model is built, compiled and trained.
        num_replicas: replicas a global batch is split across.
        is_chief: whether this process writes the run's outputs (multi-worker).
        worker_index: index of this worker (0 unless multi-worker).
        strategy: the ``tf.distribute.Strategy`` (TensorFlow backend), else None.
    """

    kind: str
    scope: object
    num_replicas: int
    is_chief: bool = True
    worker_index: int = 0
    strategy: object = None


_STRATEGIES = {}  # (kind, devices) -> tf.distribute strategy, one per process


def _multiworker(tf):
    if not os.environ.get("TF_CONFIG"):
        raise ValueError(
            "`distribute='multiworker'` needs the TF_CONFIG environment variable "
            '(e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}}). Received: TF_CONFIG=None'
        )
    try:
        cluster = json.loads(os.environ["TF_CONFIG"])
    except json.JSONDecodeError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}). "
                         f"Received: TF_CONFIG={os.environ['TF_CONFIG']!r}") from e
    if "multiworker" not in _STRATEGIES:
        _STRATEGIES["multiworker"] = tf.distribute.MultiWorkerMirroredStrategy()
    strategy = _STRATEGIES["multiworker"]
    task = cluster.get("task", {})
    task_type, index = task.get("type"), int(task.get("index", 0))
    has_chief = "chief" in cluster.get("cluster", {})
    is_chief = task_type == "chief" or (task_type == "worker" and index == 0 and not has_chief)
    return Distribution("multiworker", strategy.scope, strategy.num_replicas_in_sync,
                        is_chief, index, strategy)


def get_distribution(distribute="auto"):
    """Returns the ``Distribution`` for ``distribute`` (see the module docstring).

    Create it before any other TensorFlow work: ``MultiWorkerMirroredStrategy`` must
    exist before the first TensorFlow op runs.
    """
    import keras

    if distribute not in DISTRIBUTE_CHOICES:
        raise ValueError(f"`distribute` must be one of {list(DISTRIBUTE_CHOICES)}. "
                         f"Received: distribute={distribute!r}")
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if distribute == "multiworker":
            return _multiworker(tf)
        gpus = tf.config.list_logical_devices("GPU")
        if distribute == "mirrored" or (distribute == "auto" and len(gpus) > 1):
            devices = tuple(d.name for d in gpus or tf.config.list_logical_devices("CPU"))
            if devices not in _STRATEGIES:
                _STRATEGIES[devices] = tf.distribute.MirroredStrategy(list(devices))
            strategy = _STRATEGIES[devices]
            return Distribution("mirrored", strategy.scope, strategy.num_replicas_in_sync,
                                strategy=strategy)
        return Distribution("none", contextlib.nullcontext, 1)
    if distribute == "multiworker":
        raise ValueError(
            "`distribute='multiworker'` needs the TensorFlow backend (on JAX, see "
            "keras.distribution.initialize). Received: distribute='multiworker', "
            f"backend={backend!r}"
        )
    if backend == "jax":
        devices = keras.distribution.list_devices()
        if distribute == "mirrored" or (distribute == "auto" and len(devices) > 1):
            data_parallel = keras.distribution.DataParallel(devices=devices)
            return Distribution("data_parallel", data_parallel.scope, len(devices))
    elif distribute == "mirrored":
        raise ValueError(f"`distribute='mirrored'` needs the TensorFlow or JAX backend. "
                         f"Received: distribute='mirrored', backend={backend!r}")
    return Distribution("none", contextlib.nullcontext, 1)


def fix_multiworker_build(model):
    """Works around Keras 3.15 ``fit``/``evaluate`` failing under MultiWorkerMirroredStrategy.

    Two instance-level patches, applied only for ``distribute="multiworker"``:

    - Before the first step Keras reduces the whole ``(x, y)`` batch, a nest of
      per-replica values, in one ``strategy.reduce`` call, which TensorFlow cannot do
      across workers ("Attempt to convert a value (PerReplica...) to a Tensor"). The
      batch only gives shapes and dtypes for building the metrics, so this replica's
      part of it is used instead.
    - Keras reduces the per-step logs across workers with ``reduce("MEAN", v,
      axis=0)``, which fails on scalar logs ("Invalid reduction dimension 0 for input
      with 0 dimensions"). ``train_step``/``test_step`` return them as shape ``(1,)``,
      which that reduction turns back into the scalar mean over the replicas.
    """
    import tensorflow as tf

    original_build = model._maybe_symbolic_build

    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                batch = next(it)
                break
            data_batch = tf.nest.map_structure(
                lambda v: model.distribute_strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v,
                batch,
            )
        return original_build(iterator=None, data_batch=data_batch)

    def vector_logs(step):
        def wrapped(data):
            logs = step(data)
            return {k: tf.reshape(v, [1]) if v.shape.rank == 0 else v for k, v in logs.items()}
        return wrapped

    model._maybe_symbolic_build = build
    model.train_step = vector_logs(model.train_step)
    model.test_step = vector_logs(model.test_step)
    return model
