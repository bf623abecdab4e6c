"""MirroredStrategy checks on 2 logical CPU devices, run in a fresh process by test_distribute.

Usage: python tests/distribute_check.py WORKDIR. Prints one JSON line of results.
The logical devices must be configured before TensorFlow initialises its devices,
hence a process of its own.
"""

import json
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_newton.training import compile_for_recipe, get_distribution, get_recipe, train  # noqa: E402


def small_model():
    """Conv + Dropout + Dense with L2 on every kernel (no BatchNorm: its statistics are
    per replica, so a batch-norm model cannot match one device exactly)."""
    l2 = keras.regularizers.L2(5e-4 / 2)
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu", kernel_regularizer=l2),
        keras.layers.Dropout(0.0),  # the layer is there; off for an exact comparison
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4, activation="softmax", kernel_regularizer=l2),
    ])


def fit(strategy, init, x, y):
    with strategy.scope():
        model = small_model()
        model.set_weights(init)
        recipe = get_recipe("cifar10", epochs=3, lr=0.1)  # SGD, Nesterov momentum 0.9
        compile_for_recipe(model, recipe, steps_per_epoch=2)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16, drop_remainder=True)
        history = model.fit(ds, epochs=3, verbose=0, shuffle=False)
        evaluation = model.evaluate(ds, verbose=0)
    return history.history["loss"], evaluation, model.get_weights()


def main(workdir):
    results = {"devices": len(tf.config.list_logical_devices("CPU"))}
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 32).astype("int32")
    keras.utils.set_random_seed(0)
    init = small_model().get_weights()
    one = fit(tf.distribute.get_strategy(), init, x, y)
    # The strategy `train` will reuse: a second MirroredStrategy over the same devices
    # in one process breaks TF 2.21's collectives.
    mirrored = get_distribution("mirrored").strategy
    two = fit(mirrored, init, x, y)
    results["replicas"] = mirrored.num_replicas_in_sync
    results["loss_one"], results["loss_two"] = one[0], two[0]
    results["eval_one"], results["eval_two"] = one[1], two[1]
    results["max_weight_rel_diff"] = max(
        float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))
        for a, b in zip(one[2], two[2], strict=True)
    )
    results["kind"] = get_distribution("mirrored").kind

    # Newton-CGNet-10 (dropout 0.2, L2, Nesterov SGD) trains under the strategy, its last
    # epoch's weights averaged (swa_epochs: BatchNormalization recomputed in the scope).
    summary = train(model="newton_cgnet10", dataset="folder", data=f"{workdir}/images",
                    out=f"{workdir}/run", epochs=2, batch_size=8, val_size=6, verbose=0,
                    distribute="mirrored", swa_epochs=1)
    with open(f"{workdir}/run/best.json") as f:
        results["ncg_best"] = json.load(f)
    results["ncg_replicas"] = summary["replicas"]
    results["ncg_distribute"] = summary["distribute"]
    results["ncg_epochs"] = summary["epochs"]
    with open(f"{workdir}/run/history.csv") as f:
        results["ncg_history"] = f.read()

    try:
        train(model="newton_cgnet10", dataset="folder", data=f"{workdir}/images",
              out=f"{workdir}/run_odd", epochs=1, batch_size=7, val_size=6, verbose=0,
              distribute="mirrored")
        results["odd_batch_error"] = None
    except ValueError as e:
        results["odd_batch_error"] = str(e)
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
