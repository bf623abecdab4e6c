"""Training with the data on the accelerator (JAX): no per-batch work on the host.

``Model.fit`` with a host pipeline (`keras_newton.data.ArrayBatches`) augments every
batch in NumPy, copies it to the device and dispatches one compiled step per batch: on
an H200, Newton-CGNet-82 at batch 128 was bound by that host work (17-24 s per epoch,
the GPU mostly idle). `fit_on_device` instead puts the uint8 training and validation
images on the device once, and one compiled call runs ``steps_per_execution`` training
steps in a ``lax.fori_loop``: each step takes its batch from an on-device permutation,
augments it (the "+" augmentation: 4-pixel zero-pad-and-crop shift, horizontal flip, as
`keras_newton.data.pipeline` does), normalises it (`keras_newton.preprocessing.normalize`)
and runs the model's own ``train_step`` (loss, regularisation, optimizer, metrics).
Validation runs the same way with ``test_step``.

On the CPU backend the calls run one step each by default (``loop``): XLA:CPU ran
Newton-CGNet-10's step 10x slower inside a loop (7.4 s against 0.76 s per step at batch
32, 2026-12-03; convolutions in a loop body are not its fast library calls); GPUs run
loop bodies with the same kernels.

The callbacks of ``fit`` run as usual (``CallbackList``): per epoch, and per call of
``steps_per_execution`` steps for the batch hooks (the logs hold the running means).
The model's variables are read at each epoch's start (after ``on_epoch_begin``) and
written back at its end, so callbacks see and set them between epochs. The shuffling
and augmentation keys are ``fold_in(key(seed), epoch)``: a resumed run draws the same
batches as an uninterrupted one. JAX backend, one device.
"""

import keras
import numpy as np

from keras_newton.preprocessing import normalize


def execution_length(steps, requested):
    """Steps per compiled call: the largest divisor of ``steps`` in ``[requested / 2,
    requested]`` (every call of an epoch the same length: one compilation), else
    ``requested`` (the epoch's last call takes the rest, compiled once more)."""
    requested = max(1, min(int(requested), steps))
    for length in range(requested, (requested + 1) // 2 - 1, -1):
        if length >= 1 and steps % length == 0:
            return length
    return requested


def shift_and_flip(images, key, shift=4):
    """The "+" augmentation of a uint8 batch ``(n, h, w, c)`` on the device (JAX).

    Each image is zero-padded by ``shift`` pixels on every side and cropped back at a
    random offset in ``[0, 2 * shift]`` per axis (a shift of ``-shift..shift`` pixels),
    then mirrored left-right with probability 1/2, as `pipeline._shift_and_flip` does.
    """
    import jax
    import jax.numpy as jnp

    n, height, width, channels = images.shape
    k_rows, k_cols, k_flip = jax.random.split(key, 3)
    rows = jax.random.randint(k_rows, (n,), 0, 2 * shift + 1)
    cols = jax.random.randint(k_cols, (n,), 0, 2 * shift + 1)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))

    def crop(image, row, col):
        return jax.lax.dynamic_slice(image, (row, col, 0), (height, width, channels))

    cropped = jax.vmap(crop)(padded, rows, cols)
    return jnp.where(flips[:, None, None, None], cropped[:, :, ::-1], cropped)


def _state(model, optimizer=True):
    parts = [[v.value for v in model.trainable_variables],
             [v.value for v in model.non_trainable_variables]]
    if optimizer:
        parts.append([v.value for v in model.optimizer.variables])
    parts.append([v.value for v in model.metrics_variables])
    return tuple(parts)


def _write_back(model, state):
    trainable, non_trainable, optimizer_vars, metrics_vars = state
    for group, values in ((model.trainable_variables, trainable),
                          (model.non_trainable_variables, non_trainable),
                          (model.optimizer.variables, optimizer_vars),
                          (model.metrics_variables, metrics_vars)):
        for variable, value in zip(group, values, strict=True):
            variable.assign(value)


def _metric_logs(model, metrics_vars):
    with keras.StatelessScope(state_mapping=list(zip(model.metrics_variables, metrics_vars,
                                                     strict=True))):
        return model.get_metrics_result()


def _logs(logs):
    return {k: float(np.asarray(v)) for k, v in logs.items()}


def fit_on_device(model, train, validation, mean, std, *, epochs, batch_size, augment=True,
                  seed=0, callbacks=(), verbose="auto", initial_epoch=0,
                  steps_per_execution=1, shift=4, loop=None):
    """Trains a compiled model with its data on the device; ``Model.fit``'s contract.

    Args:
        model: a compiled Keras model (JAX backend).
        train: ``(images, labels)``, uint8 ``(n, h, w, c)`` and int ``(n,)``.
        validation: the same for validation, or None.
        mean, std: per-channel normalisation (pixel units).
        epochs: the last epoch (as ``fit``'s ``epochs``).
        batch_size: the batch; each epoch runs ``n // batch_size`` steps over a fresh
            permutation (the rest of the images is skipped, as in the host pipelines).
        augment: the "+" augmentation.
        seed: seed of the permutations and augmentation.
        callbacks: Keras callbacks (a ``BackupAndRestore`` may set the first epoch).
        verbose: progress output, as ``fit``'s.
        initial_epoch: the first epoch (0-based), as ``fit``'s.
        steps_per_execution: training steps per compiled call (see `execution_length`).
        shift: the augmentation's maximal shift in pixels.
        loop: run ``steps_per_execution`` steps per call in a ``lax.fori_loop``; default
            on accelerators, off on the CPU (then every call runs one step).

    Returns:
        The ``History`` callback.
    """
    import jax

    if keras.backend.backend() != "jax":
        raise ValueError("Training with the data on the device needs the JAX backend. "
                         f"Received: backend={keras.backend.backend()!r}")
    x_train, y_train = train
    steps = len(y_train) // batch_size
    if steps < 1:
        raise ValueError(f"`batch_size` is larger than the {len(y_train)} training images. "
                         f"Received: batch_size={batch_size}")
    if loop is None:
        loop = jax.default_backend() != "cpu"
    length = execution_length(steps, steps_per_execution if loop else 1)
    calls = [length] * (steps // length) + ([steps % length] if steps % length else [])
    images = jax.device_put(np.asarray(x_train, np.uint8))
    labels = jax.device_put(np.asarray(y_train, np.int32))
    n = len(y_train)
    base_key = jax.random.key(seed)

    def prepare(x):
        return normalize(x, mean, std, "channels_last")

    # The data are arguments, not closed over: JAX would embed closed-over arrays in the
    # compiled program as constants (45,000 CIFAR images: 138 MB).
    def train_call(state, images, labels, order, first, key, count):
        def body(i, carry):
            state, key = carry
            key, step_key = jax.random.split(key)
            take = jax.lax.dynamic_slice(order, ((first + i) * batch_size,), (batch_size,))
            x = images[take]
            if augment:
                x = shift_and_flip(x, step_key, shift)
            _, state = model.train_step(state, (prepare(x), labels[take]))
            return state, key

        if count == 1:
            state, _ = body(0, (state, key))
        else:
            state, _ = jax.lax.fori_loop(0, count, body, (state, key))
        return _metric_logs(model, state[3]), state

    compiled_train = jax.jit(train_call, static_argnames="count")

    val_calls = []
    if validation is not None:
        x_val = jax.device_put(np.asarray(validation[0], np.uint8))
        y_val = jax.device_put(np.asarray(validation[1], np.int32))
        full = len(validation[1]) // batch_size
        if loop:
            val_calls = [(0, full, batch_size)] if full else []
        else:
            val_calls = [(i * batch_size, 1, batch_size) for i in range(full)]
        if len(validation[1]) % batch_size:
            val_calls.append((full * batch_size, 1, len(validation[1]) % batch_size))

    def eval_call(state, x_val, y_val, first, count, size):
        def body(i, state):
            start = first + i * size
            x = jax.lax.dynamic_slice_in_dim(x_val, start, size)
            y = jax.lax.dynamic_slice_in_dim(y_val, start, size)
            _, state = model.test_step(state, (prepare(x), y))
            return state

        state = body(0, state) if count == 1 else jax.lax.fori_loop(0, count, body, state)
        return _metric_logs(model, state[2]), state

    compiled_eval = jax.jit(eval_call, static_argnames=("count", "size"))

    sample = prepare(np.asarray(x_train[:batch_size], np.uint8))
    model._symbolic_build(data_batch=(sample, np.asarray(y_train[:batch_size], np.int32)))
    if not isinstance(callbacks, keras.callbacks.CallbackList):
        callbacks = keras.callbacks.CallbackList(
            list(callbacks), add_history=True, add_progbar=verbose != 0, verbose=verbose,
            epochs=epochs, steps=len(calls), model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    initial_epoch = getattr(model, "_initial_epoch", None) or initial_epoch
    logs = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        state = _state(model)
        epoch_key = jax.random.fold_in(base_key, epoch)
        order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), n)
        first = 0
        for call, count in enumerate(calls):
            callbacks.on_train_batch_begin(call)
            batch_logs, state = compiled_train(
                state, images, labels, order, first, jax.random.fold_in(epoch_key, call + 1),
                count=count)
            first += count
            callbacks.on_train_batch_end(call, _logs(batch_logs))
            if model.stop_training:
                break
        _write_back(model, state)
        logs = _logs(model.get_metrics_result())
        if val_calls:
            model.reset_metrics()
            eval_state = _state(model, optimizer=False)
            for start, count, size in val_calls:
                val_logs, eval_state = compiled_eval(eval_state, x_val, y_val, start,
                                                     count=count, size=size)
            logs.update({f"val_{k}": v for k, v in _logs(val_logs).items()})
        callbacks.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    callbacks.on_train_end(logs=logs)
    return next((c for c in callbacks.callbacks if isinstance(c, keras.callbacks.History)),
                None)
