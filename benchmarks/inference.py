"""Inference throughput: Keras ``predict`` vs SavedModel vs ONNX Runtime (plain, optimised, int8).

For each model: build it with random weights, every BN statistic and affine parameter and
every alpha/beta moved off its initial value as in trained weights (the exporters drop a
multiplication by 1 or an addition of 0, so a fresh model's graph would be smaller), or
with ``--zoo`` its zoo weights; export a SavedModel, an ONNX file, and an ONNX file of
``optimize_for_inference(model)`` into a temporary folder and check that all four agree;
quantize the optimised file to int8 (``keras_newton.export.quantize``, the settings of
``keras-newton export --quantize int8``), calibrated on ``--calibration-images`` noise
images or on the training part of ``--calibration-data``, and print its top-1 agreement
with the optimised file (not checked); then time images/s at each batch size. The
runtimes are timed in turn inside every repeat (side by side, so a change in background
load hits all of them alike); images/s are medians over the repeats, ratios are medians
of the per-repeat ratios. At batch 1 a measurement is ``--batch1-calls`` single-image
calls.

    python benchmarks/inference.py                       # the full table (minutes)
    python benchmarks/inference.py --models newton_cgnet10 --repeats 1   # quick
    python benchmarks/inference.py --models newton_cgnet10,newton_cgnet56 \
        --runtimes onnx_optimized,onnx_int8 --repeats 7     # int8 vs fp32, side by side
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_MODELS = ("newton_cgnet10", "newton_cgnet56", "newton_cgnet82",
                  "resnet20", "resnet110", "resnet164")
RUNTIMES = ("keras", "savedmodel", "onnx", "onnx_optimized", "onnx_int8")
RATIOS = (("onnx", "keras"), ("savedmodel", "keras"), ("onnx_optimized", "onnx"),
          ("onnx_optimized", "keras"), ("onnx_int8", "onnx_optimized"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help="comma-separated model names (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median; default 3)")
    p.add_argument("--batch-sizes", default="1,256", help="default: %(default)s")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="default: %(default)s")
    p.add_argument("--batch1-calls", type=int, default=20,
                   help="single-image calls per batch-1 measurement (default 20)")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads (default: ORT's, one per core)")
    p.add_argument("--spinning", action="store_true",
                   help="let ORT threads spin-wait (off by default: the CPU may be shared)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--calibration-images", type=int, default=512,
                   help="onnx_int8: calibration images (noise, or of --calibration-data; "
                        "default 512)")
    p.add_argument("--calibration-data", metavar="PATH",
                   help="onnx_int8: calibrate on the training part of this folder or tar "
                        "archive instead (normalised with the weights' card)")
    p.add_argument("--zoo", action="store_true",
                   help="use each model's zoo weights (--models newton_cgnet10 -> "
                        "newton_cgnet10.cifar10) instead of random ones")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = set(args.runtimes) - set(RUNTIMES)
    if unknown:
        p.error(f"unknown runtimes {sorted(unknown)}; choose from {list(RUNTIMES)}")
    if args.repeats < 1 or args.batch1_calls < 1:
        p.error("--repeats and --batch1-calls must be >= 1")
    return args


def _zoo_key(name):
    from keras_newton import zoo

    keys = [k for k in zoo.available() if k.split(".", 1)[0] == name]
    if not keys:
        raise SystemExit(f"--zoo: no zoo weights for {name} (registered: {zoo.available()})")
    return keys[0]


def prepare(name, args, folder):
    """``{runtime: callable(x)}`` for one model, after a parity check between them."""
    import tensorflow as tf

    from keras_newton.export import (
        OnnxClassifier,
        export_onnx,
        export_savedmodel,
        optimize_for_inference,
    )
    from keras_newton.models import canonical_name, get_model

    name = canonical_name(name)
    key = _zoo_key(name) if args.zoo else None
    model = get_model(name, weights=key and key.split(".", 1)[1], classifier_activation=None)
    rng = np.random.default_rng(1)
    for weight in [] if key else model.weights:
        if len(weight.shape) <= 1:  # BN, alpha, beta, biases: not 0 or 1 as initialised
            value = np.asarray(weight.numpy())
            weight.assign((value * rng.uniform(0.9, 1.1, value.shape)
                           + rng.uniform(0.01, 0.05, value.shape)).astype(value.dtype))
    runners = {"keras": lambda x: model.predict(x, batch_size=len(x), verbose=0)}
    if "savedmodel" in args.runtimes:
        path = folder / f"{name}_saved_model"
        export_savedmodel(model, path, mean=[0, 0, 0], std=[1, 1, 1])
        serve = tf.saved_model.load(str(path)).signatures["serving_normalized"]
        runners["savedmodel"] = lambda x: serve(images=tf.constant(x))["logits"].numpy()
    if "onnx" in args.runtimes:
        export_onnx(model, folder / f"{name}.onnx", opset=args.opset)
        plain = OnnxClassifier(folder / f"{name}.onnx", args.threads, args.spinning)
        runners["onnx"] = plain.run
    if {"onnx_optimized", "onnx_int8"} & set(args.runtimes):
        export_onnx(optimize_for_inference(model), folder / f"{name}_opt.onnx", opset=args.opset,
                    metadata={"preprocessing": _preprocessing(key)})
        fast = OnnxClassifier(folder / f"{name}_opt.onnx", args.threads, args.spinning)
        runners["onnx_optimized"] = fast.run
    x = np.random.default_rng(0).normal(size=(8, *model.input_shape[1:])).astype("float32")
    ref = runners["keras"](x)
    scale = max(1.0, float(np.abs(ref).max()))
    for runtime, run in runners.items():
        diff = float(np.abs(np.asarray(run(x)) - ref).max())
        if not diff <= 1e-4 * scale:
            raise RuntimeError(f"{name}/{runtime} disagrees with Keras: {diff:.3g} (scale {scale})")
    if "onnx_int8" in args.runtimes:
        runners["onnx_int8"] = _int8(name, key, args, folder, fast)
    return {r: runners[r] for r in args.runtimes}, model.count_params()


def _preprocessing(key):
    """The zoo entry's mean/std; for random weights one that maps the noise pixels of
    `_int8` (N(128, 64), clipped) to about N(0, 1)."""
    from keras_newton import zoo

    if key:
        return zoo.REGISTRY[key]["preprocessing"]
    return {"mean": [128.0, 128.0, 128.0], "std": [64.0, 64.0, 64.0]}


def _int8(name, key, args, folder, fast):
    """The int8 file of the optimised export ``fast``; prints its agreement with it."""
    from keras_newton.export import OnnxClassifier
    from keras_newton.export.quantize import holdout_data, logits, quantize_onnx

    shape = (*fast.image_size, 3)
    if args.calibration_data:
        data = holdout_data(args.calibration_data, calibration_size=args.calibration_images,
                            validation_limit=1000)
        calibration, images, source = data.calibration, data.images, data.source
    else:
        rng = np.random.default_rng(2)
        calibration, images = (
            np.clip(rng.normal(128, 64, (n, *shape)), 0, 255).astype(np.uint8)
            for n in (args.calibration_images, 256))
        source = "noise"
    path = folder / f"{name}_int8.onnx"
    record = quantize_onnx(folder / f"{name}_opt.onnx", path, calibration)
    int8 = OnnxClassifier(path, args.threads, args.spinning)
    agreement = (logits(fast, images).argmax(1) == logits(int8, images).argmax(1)).mean()
    print(f"# {name} int8: calibrated on {len(calibration)} images ({source}); identity taps "
          f"split in {len(record['identity_taps_split'])} convolutions; top-1 agreement with "
          f"onnx_optimized {agreement:.4f} on {len(images)} images ({source})", flush=True)
    return int8.run


def measure(run, x, calls):
    start = time.perf_counter()
    for _ in range(calls):
        run(x)
    return calls * len(x) / (time.perf_counter() - start)


def bench_model(name, args, folder):
    runners, params = prepare(name, args, folder)
    rng = np.random.default_rng(1)
    rows = []
    for batch in args.batch_sizes:
        x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
        calls = args.batch1_calls if batch == 1 else 1
        for run in runners.values():  # warm-up (graph tracing, ORT arenas)
            run(x)
        samples = {r: [] for r in runners}
        for _ in range(args.repeats):
            for runtime, run in runners.items():
                samples[runtime].append(measure(run, x, calls))
        medians = {r: statistics.median(v) for r, v in samples.items()}
        # Ratios are paired: the median over repeats of the ratio within one repeat,
        # whose runtimes ran back to back, so load drift between repeats cancels.
        ratios = {f"{a}/{b}": statistics.median(
                      x / y for x, y in zip(samples[a], samples[b], strict=True))
                  for a, b in RATIOS if a in samples and b in samples}
        rows.append({"model": name, "params": params, "batch": batch,
                     "images_per_s": medians, "samples": samples, "ratios": ratios})
        print(format_row(rows[-1], args.runtimes), flush=True)
    del runners
    gc.collect()
    return rows


def header(runtimes):
    ratios = [f"{a}/{b}" for a, b in RATIOS if a in runtimes and b in runtimes]
    cols = ["model", "batch", *(f"{r} img/s" for r in runtimes), *ratios]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def format_row(row, runtimes):
    cells = [row["model"], str(row["batch"])]
    cells += [f"{row['images_per_s'][r]:.1f}" for r in runtimes]
    cells += [f"{v:.2f}x" for v in row["ratios"].values()]
    return "| " + " | ".join(cells) + " |"


def environment(args):
    import keras
    import onnxruntime
    import tensorflow as tf

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text(
        ).splitlines() if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg(),
            "python": sys.version.split()[0], "tensorflow": tf.__version__,
            "keras": keras.__version__, "onnxruntime": onnxruntime.__version__,
            "ort_threads": args.threads, "ort_spinning": args.spinning,
            "repeats": args.repeats, "batch1_calls": args.batch1_calls, "opset": args.opset}


def main(argv=None):
    args = parse_args(argv)
    env = environment(args)
    print(f"# {env['cpu']} ({env['cpu_count']} CPUs), load average at start "
          f"{env['loadavg_start'][0]:.2f}; TF {env['tensorflow']}, ORT {env['onnxruntime']}; "
          f"median of {args.repeats} repeat(s), batch 1 = {args.batch1_calls} calls",
          flush=True)
    print(header(args.runtimes), flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows += bench_model(name, args, Path(tmp))
    env["loadavg_end"] = os.getloadavg()
    print(f"# load average at end {env['loadavg_end'][0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
