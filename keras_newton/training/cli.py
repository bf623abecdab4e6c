"""``keras-newton train``: train a model with the paper's recipe (resumable, distributed).

Also runs standalone: ``python -m keras_newton.training.cli --model ... --dataset ...``.
"""

import argparse
import shlex
import sys

HELP = ("Train a Newton-CGNet or baseline on CIFAR-10/100, SVHN, ImageNet, your own images or "
        "a text dataset (AG News, ...) with the paper's recipe; rerun the same command to "
        "resume an interrupted run.")

_RECIPE_FLAGS = (
    # flag, recipe key, type, help
    ("--epochs", "epochs", int, "training epochs (recipe: 300 CIFAR, 40 SVHN)"),
    ("--batch-size", "batch_size", int, "global batch size, split across replicas (128)"),
    ("--lr", "lr", float, "initial learning rate (0.1)"),
    ("--lr-factor", "lr_factor", float, "learning-rate factor at each milestone (0.1)"),
    ("--warmup-epochs", "warmup_epochs", int,
     "first epochs at lr * lr-factor, as He et al. started ResNet-110 (0: the paper)"),
    ("--label-smoothing", "label_smoothing", float,
     "label smoothing of the cross-entropy targets (0: the paper)"),
    ("--swa-epochs", "swa_epochs", int,
     "the result is the average of the weights after each of the last N epochs, "
     "BatchNormalization statistics recomputed (SWA, Izmailov et al. 2018; 0: off, the "
     "paper); e.g. with --schedule constant"),
    ("--momentum", "momentum", float, "SGD momentum (0.9)"),
    ("--weight-decay", "weight_decay", float, "L2 weight decay (5e-4 CIFAR, 1e-4 SVHN)"),
    ("--dropout", "dropout", float,
     "Newton-CGNet dropout rate (0.2 C10+/C100+, 0.3 SVHN, 0.4 C10/C100)"),
    ("--val-size", "val_size", int, "held-out validation images (5000 CIFAR, 6000 SVHN)"),
    ("--train-split", "train_split", str,
     "split(s) to train on, e.g. train or train+extra (SVHN: train+extra)"),
)


def add_arguments(parser):
    from keras_newton.training.distribute import DISTRIBUTE_CHOICES
    from keras_newton.training.recipes import SCHEDULES, WARMUPS

    parser.add_argument("--model", default=None,
                        help="model name, e.g. newton_cgnet56, resnet110 (see `keras-newton "
                             "models`)")
    parser.add_argument("--dataset", default=None,
                        help="cifar10, cifar100, svhn, imagenet, folder (your own images, with "
                             "--data), or a text dataset: ag_news, yelp_polarity, dbpedia, ...")
    parser.add_argument("--data", default=None,
                        help="offline source: folder or tar/zip archive of "
                             "split/<class>/<image> files (decoded once, cached under "
                             "$KERAS_NEWTON_HOME, default $KERAS_HOME/keras_newton); without it, "
                             "tensorflow-datasets")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="the '+' augmentation: 4-pixel shift and horizontal flip")
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/<model>_<dataset>[+])")
    parser.add_argument("--distribute", default="auto", choices=DISTRIBUTE_CHOICES,
                        help="auto: MirroredStrategy (TF) / DataParallel (JAX) when several "
                             "devices; multiworker: MultiWorkerMirroredStrategy from TF_CONFIG")
    parser.add_argument("--limit", type=int, default=None,
                        help="use only N training images (and at most N validation images)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the hold-out split, shuffling, augmentation, init (0)")
    for flag, key, kind, help_text in _RECIPE_FLAGS:
        parser.add_argument(flag, dest=key, type=kind, default=None, help=help_text)
    parser.add_argument("--lr-milestones", dest="lr_milestones", type=float, nargs="+",
                        default=None,
                        help="fractions of training at which the lr is multiplied by "
                             "--lr-factor (0.5 0.75)")
    parser.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                        help="Nesterov momentum (on)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None,
                        help="step: lr x lr-factor at each milestone (the paper's, default); "
                             "cosine: from lr after the warm-up to zero at the end, per step; "
                             "constant: lr after the warm-up")
    parser.add_argument("--warmup", choices=WARMUPS, default=None,
                        help="warm-up form: constant (lr x lr-factor, default) or linear "
                             "(per step from lr / warm-up steps up to lr)")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="bf16 compute with float32 variables (mixed_bfloat16), for GPUs")
    parser.add_argument("--sequence-length", type=int, default=None,
                        help="text models: characters per text (1024, the paper's s)")
    parser.add_argument("--hidden-units", type=int, default=None,
                        help="text models: width of the two hidden FC layers (2048)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="fit the run into SECONDS of wall time: the epochs that fit, "
                             "timed from epoch 2 until the first lr milestone (at most --epochs), "
                             "set its length and lr milestones")
    parser.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                        help="pause after the last epoch that fits in SECONDS of this call "
                             "(the run keeps its length and schedule; rerun to continue)")
    parser.add_argument("--on-device", action="store_true",
                        help="JAX: training data on the accelerator, augmentation and "
                             "normalisation inside the compiled step (one device)")
    parser.add_argument("--steps-per-execution", type=int, default=1, metavar="N",
                        help="training steps per compiled call (1)")
    parser.add_argument("--init-weights", default=None, metavar="SOURCE",
                        help="warm start (e.g. an SGDR restart): a new run whose model starts "
                             "from a registered zoo model's weights (e.g. "
                             "newton_cgnet10.cifar10) or a .weights.h5 file (copied into --out "
                             "as init.weights.h5), loaded before epoch 1 and sha256-checked; "
                             "config.json records the name and sha256")
    parser.add_argument("--resume", action="store_true",
                        help="take --model, --dataset, --augment, --limit, --seed, "
                             "--init-weights and the recipe from --out's config.json (a run "
                             "started elsewhere); "
                             "give --data and this machine's flags")
    parser.add_argument("--config-only", action="store_true",
                        help="write the run's config.json into --out and stop (a run to "
                             "start elsewhere with --resume)")
    parser.add_argument("--no-test", dest="evaluate_test", action="store_false",
                        help="skip the final test-split evaluation")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a previous run's files in --out first")
    parser.add_argument("--verbose", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="Keras progress output: auto, 0, 1 (bar), 2 (one line per epoch)")


# config.json keys that are not recipe values (see `trainer.train`).
_RUN_KEYS = ("model", "dataset", "data", "data_key", "limit", "seed", "augment", "recipe",
             "time_budget", "mixed_precision", "sequence_length", "hidden_units", "init_weights")


def from_config(args, overrides):
    """``--resume``: the run's settings from ``--out/config.json``; flags given on the
    command line win (a difference is then refused by name, as for any resume)."""
    import json
    from pathlib import Path

    if args.out is None:
        raise ValueError("--resume needs --out, the run folder. Received: out=None")
    path = Path(args.out) / "config.json"
    if not path.exists():
        raise ValueError(f"--resume needs the run's config.json in --out. Received: "
                         f"out={args.out!r}")
    config = json.loads(path.read_text())
    args.model = args.model or config["model"]
    args.dataset = args.dataset or config["dataset"]
    if args.augment is None:
        args.augment = config.get("augment", False)
    if args.limit is None:
        args.limit = config["limit"]
    if args.seed is None:
        args.seed = config["seed"]
    if args.time_budget is None:
        args.time_budget = config.get("time_budget")
    if args.init_weights is None:  # the record {"zoo" | "file": name, "sha256": ...}
        args.init_weights = config.get("init_weights")
    for key, value in config.items():
        if key not in _RUN_KEYS and overrides.get(key) is None:
            overrides[key] = value


def run(args):
    from keras_newton.training import LossDivergedError, train

    overrides = {key: getattr(args, key) for _, key, _, _ in _RECIPE_FLAGS}
    overrides.update(lr_milestones=args.lr_milestones, nesterov=args.nesterov,
                     schedule=args.schedule, warmup=args.warmup)
    if args.resume:
        from_config(args, overrides)
    args.seed = 0 if args.seed is None else args.seed
    args.augment = bool(args.augment)
    if args.model is None or args.dataset is None:
        raise ValueError("--model and --dataset are required (or --resume with --out). "
                         f"Received: model={args.model!r}, dataset={args.dataset!r}")
    if args.config_only:
        from keras_newton.training.trainer import new_run_config

        if args.out is None:
            raise ValueError("--config-only needs --out. Received: out=None")
        new_run_config(args.out, args.model, args.dataset, data=args.data,
                       augment=args.augment, limit=args.limit, seed=args.seed,
                       time_budget=args.time_budget, init_weights=args.init_weights,
                       **overrides)
        print(f"wrote {args.out}/config.json; start or continue the run with "
              f"`keras-newton train --resume --out <a copy of {args.out}> --data ...`")
        return 0
    argv = getattr(args, "argv", None) or sys.argv[1:]
    command = shlex.join(["keras-newton", *argv])
    from keras_newton.training.text import run_text_cli

    code = run_text_cli(args, overrides, command)  # None: not a text model or dataset
    if code is not None:
        return code
    try:
        summary = train(
            model=args.model, dataset=args.dataset, data=args.data, out=args.out,
            augment=args.augment, distribute=args.distribute, limit=args.limit, seed=args.seed,
            verbose=args.verbose, overwrite=args.overwrite, evaluate_test=args.evaluate_test,
            mixed_precision=args.mixed_precision, time_budget=args.time_budget,
            on_device=args.on_device, steps_per_execution=args.steps_per_execution,
            stop_after=args.stop_after, command=command, init_weights=args.init_weights,
            **overrides,
        )
    except LossDivergedError as e:
        print(f"keras-newton train: error: {e}", file=sys.stderr)
        return 1
    if summary["status"] == "paused":
        print(f"paused after epoch {summary['epochs']} of {summary['planned_epochs']} "
              f"(--stop-after); best validation accuracy {summary['best_val_accuracy']:.4f} "
              f"at epoch {summary['best_epoch']}; rerun the command to continue")
        return 0
    test = summary["test_accuracy"]
    print(
        f"best validation accuracy {summary['best_val_accuracy']:.4f} at epoch "
        f"{summary['best_epoch']}/{summary['epochs']}"
        + (f", test accuracy {test:.4f}" if test is not None else "")
        + f"; {summary['seconds_per_epoch']:.1f} s/epoch"
    )
    return 0


def main(argv=None):
    """Runs ``keras-newton train`` with ``argv`` (the arguments after ``train``)."""
    parser = argparse.ArgumentParser(prog="keras-newton train", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = ["train", *(sys.argv[1:] if argv is None else argv)]
    try:
        return run(args)
    except ValueError as e:
        print(f"keras-newton train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


def command_from_config(config, data, out=None):
    """The ``keras-newton train`` command that starts the run of ``config`` (a run's
    config.json) from the repository: ``--data`` is ``data``, the recipe flags are those
    that differ from the paper's recipe, ``--out`` is ``out`` (if given)."""
    from keras_newton.training.recipes import get_recipe

    defaults = get_recipe(config["dataset"], config.get("augment", False))
    argv = ["keras-newton", "train", "--model", config["model"], "--dataset",
            config["dataset"]]
    if data is not None:
        argv += ["--data", str(data)]
    if config.get("augment"):
        argv.append("--augment")
    if config.get("limit") is not None:
        argv += ["--limit", str(config["limit"])]
    if config.get("seed", 0) != 0:
        argv += ["--seed", str(config["seed"])]
    flags = {key: flag for flag, key, _, _ in _RECIPE_FLAGS}
    for key, value in config.items():
        if key in _RUN_KEYS or value is None or value == defaults.get(key):
            continue
        if key in flags:
            argv += [flags[key], f"{value:g}" if isinstance(value, float) else str(value)]
        elif key == "lr_milestones":
            argv += ["--lr-milestones", *(f"{m:g}" for m in value)]
        elif key == "nesterov":
            argv.append("--nesterov" if value else "--no-nesterov")
        elif key in ("schedule", "warmup"):
            argv += [f"--{key}", value]
        else:  # e.g. "optimizer": no flag; the command would not reproduce the run
            raise ValueError(f"No `keras-newton train` flag sets {key}. Received: {key}={value!r}")
    if config.get("time_budget") is not None:
        argv += ["--time-budget", f"{config['time_budget']:g}"]
    init = config.get("init_weights")
    if init is not None:  # a zoo name, or the file's name (its copy: init.weights.h5)
        argv += ["--init-weights", init.get("zoo") or init["file"]]
    if out is not None:
        argv += ["--out", str(out)]
    return shlex.join(argv)
