"""Training throughput and step memory: Newton-CGNet vs the equal-parameter ResNet.

Each repeat runs one fresh child process that builds both models of a pair and times
their training steps alternately (A B, then B A, ...), so both see the same machine
state: per-process differences (the same model read 22 and 26 images/s in two
processes on this CPU) cancel in the ratio. Steady state: after compilation and two
warm-up steps, on synthetic 32x32x3 data, the same ``train_on_batch`` for both; the
parent prints medians and ratios.

    python benchmarks/train_speed.py                          # TF, CPU, all pairs
    python benchmarks/train_speed.py --pairs 56:110 --jit     # XLA on
    KERAS_BACKEND=jax python benchmarks/train_speed.py --mixed-precision   # on a GPU

``--paths`` compares instead the two JAX input paths of `keras-newton train` on one model:
``Model.fit`` over the NumPy host pipeline (`keras_newton.data.ArrayBatches`: augmentation
and normalisation per batch on the host) against `training.on_device.fit_on_device`
(uint8 data on the device, augmentation in the compiled step) with one step per call and,
on an accelerator, with ``--steps-per-execution`` steps per call in a loop; all with the
recipe's compile (`compile_for_recipe`), on synthetic uint8 images; ms per step of the
epochs after the first (which compiles), and the host pipeline's own time per batch:

    python benchmarks/train_speed.py --paths --model newton_cgnet10 --steps 8 --epochs 3
    python benchmarks/train_speed.py --paths --model newton_cgnet82 --steps 351 \
        --epochs 2 --repeats 1 --steps-per-execution 64 --mixed-precision   # on a GPU
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

PAIRS = {"10:20": ("newton_cgnet10", "resnet20"), "56:110": ("newton_cgnet56", "resnet110"),
         "82:164": ("newton_cgnet82", "resnet164"),
         # the fused CG Block against the plain one (same weights, same outputs)
         "56fused:56plain": ("newton_cgnet56", "newton_cgnet56:plain"),
         # what the three dropouts of every CG Block cost (dropout_rate 0.2 against 0)
         "56:56nodropout": ("newton_cgnet56", "newton_cgnet56:nodropout"),
         # the CG Block's dropout branches recomputed in the backward pass (default)
         # against plain autodiff, which stores the dropped tensors and masks
         "82:82noremat": ("newton_cgnet82", "newton_cgnet82:noremat"),
         "56:56noremat": ("newton_cgnet56", "newton_cgnet56:noremat")}


def forward_flops(model):
    """2 x multiply-accumulates of every convolution and dense layer, one image."""
    import keras

    from keras_newton.layers import CGBlock, NewtonCGBlock

    def layer_flops(layer, out_shape):
        if isinstance(layer, keras.layers.Conv2D):
            k = layer.kernel.shape
            return 2 * out_shape[1] * out_shape[2] * k[0] * k[1] * k[2] * k[3]
        if isinstance(layer, keras.layers.Dense):
            return 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
        return 0

    total = 0
    for layer in model.layers:
        if isinstance(layer, NewtonCGBlock):
            out = layer.output.shape
            subs = [b for b in layer.cg_blocks] + ([layer.proj_conv] if layer.use_projection
                                                   else [])
            for sub in subs:
                convs = ([sub.conv1, sub.conv2, sub.conv3, sub.conv4]
                         + ([sub.proj_g_conv, sub.proj_y_conv] if getattr(
                             sub, "use_projection", False) else [])
                         if isinstance(sub, CGBlock) else [sub])
                total += sum(layer_flops(c, out) for c in convs)
        else:
            total += layer_flops(layer, layer.output.shape)
    return total


def build(name, args):
    """Compiled model for a pair entry ``arch[:variant]``."""
    import keras

    from keras_newton import models

    name, _, variant = name.partition(":")
    model = models.get_model(name, weight_decay=5e-4,
                             **({"dropout_rate": 0.0} if variant == "nodropout" else {}))
    if variant == "plain":
        config = model.get_config()
        for layer in config["layers"]:
            if layer["class_name"] == "NewtonCGBlock":
                layer["config"]["fused"] = False
        model = keras.Model.from_config(config)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
                  "sparse_categorical_crossentropy",
                  jit_compile="auto" if args.jit is None else args.jit)
    return model


def child(args):
    """Both models of a pair in one process: step memory each, then alternating steps."""
    import time

    import keras
    import numpy as np

    if args.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, len(x))
    names = args.child.split(",")
    models, result = {}, {}
    remat = keras.remat
    for name in names:
        if name.endswith(":noremat"):  # keras.remat is read when the model is traced
            keras.remat = lambda f: f
        models[name] = model = build(name, args)
        result[name] = {"step_peak_mb": step_peak_mb(model, x, y),  # traces; 2 warm-up steps
                        "gflop_per_image": 3 * forward_flops(model) / 1e9, "seconds": []}
        keras.remat = remat
    for step in range(args.steps):
        for name in names if step % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            models[name].train_on_batch(x, y)
            result[name]["seconds"].append(time.perf_counter() - start)
    print(json.dumps(result))


def step_peak_mb(model, x, y):
    """MB that one training step (``train_on_batch``, after a first, tracing one) adds
    to the framework allocator's holdings at its peak: the activations kept for the
    backward pass, gradients, workspace. Unlike peak RSS, this does not depend on how
    ``malloc`` reuses freed memory (RSS varied by 300 MB for one model). TensorFlow
    needs ``TF_CPU_ALLOCATOR_USE_BFC=true`` for CPU stats (``measure`` sets it); JAX
    reports device stats on GPUs only, and only the process's peak (for a pair's second
    model it includes the first)."""
    import keras

    model.train_on_batch(x, y)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        device = "GPU:0" if tf.config.list_logical_devices("GPU") else "CPU:0"
        held = tf.config.experimental.get_memory_info(device)["current"]
        tf.config.experimental.reset_memory_stats(device)
        model.train_on_batch(x, y)
        return (tf.config.experimental.get_memory_info(device)["peak"] - held) / 2**20
    import jax

    stats = jax.devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / 2**20 if stats else None


def measure(pair, args):
    cmd = [sys.executable, __file__, "--child", ",".join(PAIRS[pair]), "--batch",
           str(args.batch), "--steps", str(args.steps)] + (
           [] if args.jit is None else ["--jit" if args.jit else "--no-jit"]) + (
           ["--mixed-precision"] if args.mixed_precision else [])
    env = {**os.environ, "TF_CPU_ALLOCATOR_USE_BFC": "true"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_peak_gflops():
    """Nominal fp32 peak: cores x GHz x 32 FLOP/cycle (2 AVX2 FMA units)."""
    with open("/proc/cpuinfo") as f:
        mhz = next(float(line.split(":")[1]) for line in f if line.startswith("cpu MHz"))
    return os.cpu_count() * mhz / 1000 * 32


def paths_child(args):
    """``--paths`` in a JAX child: per-epoch seconds of each path, host time per batch."""
    import time

    import keras
    import numpy as np

    from keras_newton import models
    from keras_newton.data.pipeline import ArrayBatches
    from keras_newton.training.on_device import fit_on_device
    from keras_newton.training.recipes import get_recipe
    from keras_newton.training.trainer import compile_for_recipe

    rng = np.random.default_rng(0)
    n = args.batch * args.steps
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    mean, std = [125.2, 122.9, 113.8], [62.6, 61.9, 66.5]
    recipe = get_recipe("cifar10", True, epochs=args.epochs)

    class Times(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)
            print(f"{self.path} epoch {epoch + 1}: {self.seconds[-1]:.1f} s", file=sys.stderr,
                  flush=True)

    import jax

    if args.mixed_precision:
        keras.config.set_dtype_policy("mixed_bfloat16")
    result = {}
    paths = ["host", "device1"] + ([] if jax.default_backend() == "cpu" else ["deviceN"])
    for repeat in range(args.repeats):
        for path in paths if repeat % 2 == 0 else paths[::-1]:
            model = models.get_model(args.model, weight_decay=5e-4)
            compile_for_recipe(model, recipe, steps_per_epoch=args.steps)
            times = Times()
            times.path = path
            if path == "host":
                data = ArrayBatches(x, y, args.batch, mean, std, training=True, augment=True)
                model.fit(data, epochs=args.epochs, callbacks=[times], verbose=0,
                          shuffle=False)
            else:
                fit_on_device(model, (x, y), None, mean, std, epochs=args.epochs,
                              batch_size=args.batch, callbacks=[times], verbose=0,
                              steps_per_execution=1 if path == "device1" else
                              args.steps_per_execution)
            result.setdefault(path, []).append(times.seconds)
    data = ArrayBatches(x, y, args.batch, mean, std, training=True, augment=True)
    start = time.perf_counter()
    for i in range(len(data)):
        data[i]
    result["host_batch_seconds"] = (time.perf_counter() - start) / len(data)
    result["device_kind"] = jax.devices()[0].device_kind
    print(json.dumps(result))


def paths_main(args):
    cmd = [sys.executable, __file__, "--paths-child", "--model", args.model, "--batch",
           str(args.batch), "--steps", str(args.steps), "--epochs", str(args.epochs),
           "--repeats", str(args.repeats), "--steps-per-execution",
           str(args.steps_per_execution)] + (["--mixed-precision"] if args.mixed_precision
                                             else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env={**os.environ, "KERAS_BACKEND": "jax"})
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"JAX on {result['device_kind']}: {args.model}, batch {args.batch}, "
          f"{args.steps} steps per epoch, {args.epochs} epochs per path and repeat, "
          f"{args.repeats} repeats{', bf16' if args.mixed_precision else ''}; "
          "ms per step of the epochs after the first (median, then each repeat's median)")
    labels = {"host": "Model.fit + ArrayBatches (host)",
              "device1": "fit_on_device, 1 step per call",
              "deviceN": f"fit_on_device, {args.steps_per_execution} steps per call (loop)"}
    medians = {}
    for path, label in labels.items():
        if path not in result:
            continue
        per_repeat = [statistics.median(e[1:]) * 1000 / args.steps for e in result[path]]
        medians[path] = statistics.median(per_repeat)
        print(f"  {label:48s} {medians[path]:8.1f} ms/step  ("
              + ", ".join(f"{v:.1f}" for v in per_repeat) + f"), "
              f"{medians['host'] / medians[path]:.2f}x the host path")
    print(f"  host pipeline alone (augment + normalise one batch): "
          f"{result['host_batch_seconds'] * 1000:.1f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default="10:20,56:110,82:164", help=f"of {list(PAIRS)}")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model and repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jit", action=argparse.BooleanOptionalAction,
                        help="jit_compile on/off (default: Keras' 'auto', i.e. off for "
                        "TensorFlow on CPU, XLA for JAX)")
    parser.add_argument("--mixed-precision", action="store_true", help="bf16 compute")
    parser.add_argument("--paths", action="store_true",
                        help="JAX: host pipeline + Model.fit vs data on the device (one model)")
    parser.add_argument("--model", default="newton_cgnet10", help="--paths: the model")
    parser.add_argument("--epochs", type=int, default=3, help="--paths: epochs per path")
    parser.add_argument("--steps-per-execution", type=int, default=8,
                        help="--paths: steps per compiled call on the device path")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--paths-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.paths_child:
        return paths_child(args)
    if args.paths:
        return paths_main(args)
    import keras

    jit = "auto" if args.jit is None else args.jit
    print(f"backend={keras.backend.backend()} jit={jit} batch={args.batch} "
          f"steps={args.steps} repeats={args.repeats} cpus={os.cpu_count()} "
          f"nominal peak ~{cpu_peak_gflops():.0f} GFLOP/s")
    print(f"{'model':24s} {'img/s':>8s} {'GFLOP/s':>8s} {'%peak':>6s} {'step MB':>8s}")
    for pair in args.pairs.split(","):
        a, b = PAIRS[pair]
        runs = [measure(pair, args) for _ in range(args.repeats)]
        med = {}
        for name in (a, b):
            seconds = statistics.median(s for r in runs for s in r[name]["seconds"])
            mems = [r[name]["step_peak_mb"] for r in runs]
            mem = statistics.median(mems) if None not in mems else float("nan")
            ips, gflops = args.batch / seconds, args.batch / seconds * runs[0][name][
                "gflop_per_image"]
            med[name] = (ips, mem)
            print(f"{name:24s} {ips:8.1f} {gflops:8.1f} {100 * gflops / cpu_peak_gflops():5.1f}%"
                  f" {mem:8.0f}")  # nan: no allocator statistics (JAX on CPU)
        per_repeat = [statistics.median(r[b]["seconds"]) / statistics.median(r[a]["seconds"])
                      for r in runs]
        print(f"  ratio {a}/{b}: throughput {statistics.median(per_repeat):.2f}x (median of "
              "the repeats' paired ratios: " + ", ".join(f"{q:.2f}x" for q in per_repeat)
              + f"), step memory {med[a][1] / med[b][1]:.2f}x".replace("nanx", "n/a"),
              flush=True)


if __name__ == "__main__":
    main()
