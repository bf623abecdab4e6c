"""Quasi-Newton nets against ResNet-56 and Newton-CGNet-28 at about 0.86M parameters.

One recipe for all (docs/newton_design.md, "Quasi-Newton Blocks of order m"): the paper's
C10+ recipe (SGD Nesterov 0.9, batch 128, lr 0.1 / 10 at 50% and 75%, weight decay 5e-4,
4-pixel shift + flip) for a short schedule of ``--epochs`` (15), no dropout in any model
(``--dropout 0`` for those that have it: dropout only costs accuracy in short runs, see
README "Pretrained weights"), the seeded 45k/5k split of the CIFAR-10 JPEG archive, seed 0.
Each model is one `keras-newton train` run (``--parallel`` of them at once: on a GPU one run
leaves it mostly idle); then every model's forward images/s is timed alone, and the
validation accuracy (best and last epoch) and images/s go to ``OUT/comparison.{md,json,png}``.

    # the comparison (GPU: JAX, bf16, all five runs at once; about 10-15 min on an H200)
    KERAS_BACKEND=jax python benchmarks/quasi_newton.py --data .data/train.tar.xz \\
        --out runs/qn_compare --parallel 5 --mixed-precision
    # parameter counts and forward images/s only (no data, no training)
    python benchmarks/quasi_newton.py --speed-only [--batch-size 128] [--repeats 5]
    # the table and plot again from finished run folders (no training)
    python benchmarks/quasi_newton.py --report-only --out runs/qn_compare

On a lent GPU machine without TensorFlow, prepare and run as in zoo/gpu_train.sh's header
(wheels in ``.whl``, the archive in ``.data``; install with ``pip install --no-index
--no-deps --target /tmp/site .whl/*.whl`` and put /tmp/site and the repository on
PYTHONPATH). ``--limit N`` trains on N images for a smoke test.
"""

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the runs share one GPU

# name -> label; all about 0.86M parameters.
MODELS = {
    "resnet56": "ResNet-56 (eq. 9)",
    "newton_cgnet28": "Newton-CGNet-28 {4,4,5}",
    "quasi_newton56_m1": "QN 56-{1}",
    "quasi_newton56_m2": "QN 56-{2}",
    "quasi_newton46_m3": "QN 46-{3}, blocks (3,3,5)",
}
HAS_DROPOUT = ("newton_cgnet", "quasi_newton")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS), help="default: %(default)s")
    p.add_argument("--data", help="the CIFAR-10 archive (../shared/datasets/cifar10-jpeg/...)")
    p.add_argument("--out", default="runs/qn_compare", help="run folders and the report")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--parallel", type=int, default=1, help="runs at once (GPU: all)")
    p.add_argument("--mixed-precision", action="store_true", help="bf16 (GPU)")
    p.add_argument("--limit", type=int, default=None, help="training images (smoke test)")
    p.add_argument("--extra", default="", help="more `keras-newton train` flags, one string")
    p.add_argument("--batch-size", type=int, default=128, help="forward timing batch")
    p.add_argument("--repeats", type=int, default=5, help="timed forward calls (median)")
    p.add_argument("--speed-only", action="store_true", help="parameters and images/s only")
    p.add_argument("--report-only", action="store_true", help="report finished runs")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if not (args.speed_only or args.report_only or args.data):
        p.error("--data is needed to train (or --speed-only / --report-only)")
    return args


def train_command(model, args):
    cmd = [sys.executable, "-m", "keras_newton", "train", "--model", model,
           "--dataset", "cifar10", "--data", args.data, "--augment", "--epochs",
           str(args.epochs), "--seed", "0", "--no-test", "--distribute", "none",
           "--out", str(Path(args.out) / model), "--verbose", "2"]
    if model.startswith(HAS_DROPOUT):
        cmd += ["--dropout", "0"]
    if args.mixed_precision:
        cmd.append("--mixed-precision")
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    return cmd + args.extra.split()


def train_all(args):
    """Runs the trainings, ``args.parallel`` at a time; returns ``{model: exit code}``."""
    from keras_newton.data import load_dataset

    # Decode the archive into the cache once, before the runs read it side by side.
    print(len(load_dataset("cifar10", data=args.data)), "training images", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pending, running, codes = list(args.models), {}, {}
    while pending or running:
        while pending and len(running) < args.parallel:
            model = pending.pop(0)
            cmd = train_command(model, args)
            print("$", " ".join(cmd), flush=True)
            log = open(out / f"{model}.log", "w")  # noqa: SIM115 (closed below)
            running[model] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT),
                              log, time.perf_counter())
        time.sleep(2)
        for model, (proc, log, start) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                codes[model] = proc.returncode
                print(f"{model}: exit {proc.returncode} after "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
                del running[model]
    return codes


def forward_flops(model):
    """2 x multiply-accumulates of the convolutions and dense layers, per image. Every
    convolution inside a block outputs at the block's resolution."""
    import keras

    total = 0
    for layer in model.layers:
        out = layer.output.shape
        for sub in [layer, *layer._flatten_layers(include_self=False)]:
            if isinstance(sub, keras.layers.Conv2D) and sub.built:
                kh, kw, cin, cout = sub.kernel.shape
                total += 2 * out[1] * out[2] * kh * kw * cin * cout
            elif isinstance(sub, keras.layers.Dense):
                total += 2 * sub.kernel.shape[0] * sub.kernel.shape[1]
    return total


def forward_speed(models, batch_size, repeats, mixed_precision):
    """``{model: (parameters, MFLOPs per image, images/s)}``: ``predict_on_batch`` on random
    images after one compiling call; in each of ``repeats`` rounds every model is timed
    once, in turn (a change of background load hits all alike); the median per model."""
    import keras
    import numpy as np

    from keras_newton.models import get_model

    keras.config.set_dtype_policy("mixed_bfloat16" if mixed_precision else "float32")
    x = np.random.default_rng(0).normal(size=(batch_size, 32, 32, 3)).astype("float32")
    built = {name: get_model(name) for name in models}
    for model in built.values():
        model.predict_on_batch(x)  # compiles
    times = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in built.items():
            start = time.perf_counter()
            model.predict_on_batch(x)
            times[name].append(time.perf_counter() - start)
    result = {}
    for name, model in built.items():
        result[name] = (model.count_params(), forward_flops(model) / 1e6,
                        batch_size / statistics.median(times[name]))
        print(f"{name}: {result[name][0]:,} parameters, {result[name][1]:.0f} MFLOPs/image, "
              f"{result[name][2]:.0f} images/s (batch {batch_size})", flush=True)
    return result


def read_run(folder):
    """Validation accuracy per epoch and the median training epoch time of a run."""
    path = Path(folder) / "history.csv"
    if not path.exists():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    acc = [float(r["val_accuracy"]) for r in rows]
    seconds = [float(r["seconds"]) for r in rows[1:]] or [float(rows[0]["seconds"])]
    return {"val_accuracy": acc, "best": max(acc), "best_epoch": acc.index(max(acc)) + 1,
            "last": acc[-1], "epochs": len(acc), "epoch_seconds": statistics.median(seconds)}


def report(args, speed):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {m: read_run(out / m) for m in args.models}
    rows = []
    for m in args.models:
        params, mflops, ips = speed.get(m, (None, None, None))
        run = runs[m] or {}
        rows.append({"model": m, "label": MODELS.get(m, m), "params": params,
                     "mflops": mflops, "forward_images_per_s": ips, **{k: v for k, v in run.items()
                                                      if k != "val_accuracy"},
                     "val_accuracy": run.get("val_accuracy")})
    recipe = (f"C10+ recipe, {args.epochs} epochs (lr 0.1, /10 at 50% and 75%), batch 128, "
              "SGD Nesterov 0.9, weight decay 5e-4, no dropout, 45k/5k split, seed 0"
              + (", bf16" if args.mixed_precision else "")
              + (f", --limit {args.limit}" if args.limit else ""))
    meta = {"recipe": recipe, "backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
            "forward_batch": args.batch_size, "parallel_runs": args.parallel,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    (out / "comparison.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"Recipe: {recipe}. Backend {meta['backend']}; forward images/s at batch "
             f"{args.batch_size}, each model alone; epoch seconds with {args.parallel} "
             "run(s) side by side.", "",
             "| model | params | MFLOPs/image | best val acc (epoch) | last val acc "
             "| forward images/s | s/epoch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        best = f"{100 * r['best']:.2f}% ({r['best_epoch']})" if "best" in r else "-"
        last = f"{100 * r['last']:.2f}%" if "last" in r else "-"
        ips = f"{r['forward_images_per_s']:.0f}" if r["forward_images_per_s"] else "-"
        sec = f"{r['epoch_seconds']:.1f}" if "epoch_seconds" in r else "-"
        params = f"{r['params']:,}" if r["params"] else "-"
        mflops = f"{r['mflops']:.0f}" if r["mflops"] else "-"
        lines.append(f"| {r['label']} | {params} | {mflops} | {best} | {last} | {ips} "
                     f"| {sec} |")
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, out / "comparison.png", recipe)


def plot(rows, path, recipe):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        if r["val_accuracy"]:
            epochs = range(1, len(r["val_accuracy"]) + 1)
            left.plot(epochs, [100 * a for a in r["val_accuracy"]], marker="o", markersize=3,
                      label=r["label"])
        if r.get("best") is not None and r["forward_images_per_s"]:
            right.scatter(r["forward_images_per_s"], 100 * r["best"])
            right.annotate(r["label"], (r["forward_images_per_s"], 100 * r["best"]),
                           fontsize=8, xytext=(4, 4), textcoords="offset points")
    left.set(xlabel="epoch", ylabel="validation accuracy (%)", title="CIFAR-10, 5k validation")
    left.legend(fontsize=8)
    right.set(xlabel="forward images/s", ylabel="best validation accuracy (%)",
              title="accuracy against speed")
    fig.suptitle(recipe, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("plot:", path)


def main(argv=None):
    args = parse_args(argv)
    if args.speed_only:
        speed = forward_speed(args.models, args.batch_size, args.repeats, args.mixed_precision)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "speed.json").write_text(json.dumps(speed, indent=1))
        return 0
    codes = {} if args.report_only else train_all(args)
    speed_file = Path(args.out) / "speed.json"
    if args.report_only and speed_file.exists():
        speed = {k: tuple(v) for k, v in json.loads(speed_file.read_text()).items()}
    else:
        speed = forward_speed(args.models, args.batch_size, args.repeats, args.mixed_precision)
        speed_file.write_text(json.dumps(speed, indent=1))
    report(args, speed)
    return max(codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
