"""``keras-newton tune``: a resumable KerasTuner search, or the paper's Figure 4 sweeps.

Also runs standalone: ``python -m keras_newton.tuning.cli --family ... --dataset ...``.
"""

import argparse
import sys

HELP = ("Search Newton-CGNet or ResNet hyperparameters with KerasTuner (bayesian, hyperband, "
        "random), or reproduce the paper's Figure 4 (--preset figure4); rerun to resume. "
        "With KERASTUNER_TUNER_ID, KERASTUNER_ORACLE_IP and KERASTUNER_ORACLE_PORT set, the "
        "same command runs as KerasTuner's chief (tuner id 'chief') or as a worker.")

# flag, space key, help
_SPACE_FLAGS = (
    ("--blocks", "blocks", "CG Blocks per stage (N1, N2, N3 each; ResNet: n, depth 6n+2)"),
    ("--width-multiplier", "width_multiplier", "Newton-CGNet width multiplier"),
    ("--dropout", "dropout", "Newton-CGNet dropout rate"),
    ("--lr", "lr", "initial learning rate (log-sampled range)"),
    ("--weight-decay", "weight_decay", "L2 weight decay (log-sampled range)"),
    ("--batch-size", "batch_size", "global batch size"),
)


def parse_space_value(text):
    """``"0.01:0.3"`` -> range ``(0.01, 0.3)``; ``"64,128"`` -> choices; ``"0.1"`` -> fixed."""
    def number(part):
        part = part.strip()
        try:
            return int(part)
        except ValueError:
            try:
                return float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None

    if ":" in text:
        parts = text.split(":")
        if len(parts) != 2:
            raise argparse.ArgumentTypeError(f"a range is MIN:MAX. Received: {text!r}")
        return tuple(number(p) for p in parts)
    if "," in text:
        return [number(p) for p in text.split(",") if p.strip()]
    return number(text)


# Copies of keras_newton.tuning.FAMILIES / TUNERS (those modules import Keras).
FAMILIES = ("newton_cgnet", "resnet", "both")
TUNERS = ("bayesian", "hyperband", "random")


def add_arguments(parser):
    parser.add_argument("--family", default="newton_cgnet", choices=FAMILIES,
                        help="model family to search; both: the family is a hyperparameter "
                             "(one budget for both)")
    parser.add_argument("--dataset", required=True,
                        help="cifar10, cifar100, svhn, or folder (your own images, with --data)")
    parser.add_argument("--data", default=None,
                        help="offline source: folder or tar/zip archive of "
                             "split/<class>/<image> files; without it, tensorflow-datasets")
    parser.add_argument("--tuner", default=None, choices=TUNERS,
                        help="search algorithm (random)")
    parser.add_argument("--max-trials", type=int, default=None,
                        help="trial budget (10; --preset figure4 runs one trial per point)")
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs per trial (3; hyperband: the maximum)")
    parser.add_argument("--subset", type=int, default=None,
                        help="use only N training images (and at most N validation images)")
    parser.add_argument("--val-size", type=int, default=None,
                        help="held-out validation images (5000 CIFAR, 6000 SVHN)")
    parser.add_argument("--directory", default=None,
                        help="the search's own directory (default runs/tune_<family>_<dataset>"
                             ", runs/figure4_<model>_<dataset> with --preset figure4)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete a previous search in --directory first (without it, a "
                             "rerun resumes the search and skips its finished trials)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                        help="the '+' augmentation (default: off; on with --preset figure4)")
    parser.add_argument("--final-epochs", type=int, default=None,
                        help="epochs to retrain the best hyperparameters for best_model.keras "
                             "(default --epochs; 0 skips; figure4 default 0)")
    parser.add_argument("--distribute", default="auto", choices=("auto", "none", "mirrored"),
                        help="auto: MirroredStrategy when several GPUs (passed to the tuner "
                             "as distribution_strategy)")
    parser.add_argument("--max-retries", type=int, default=0,
                        help="reruns of a trial that crashed or whose worker was lost before "
                             "it is marked FAILED (KerasTuner's max_retries_per_trial; 0)")
    parser.add_argument("--worker-timeout", type=float, default=60,
                        help="distributed search (KERASTUNER_* variables set): seconds without "
                             "news from a worker before the chief gives its trial up (60)")
    parser.add_argument("--seed", type=int, default=0, help="seed (0)")
    parser.add_argument("--verbose", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="Keras progress output: auto, 0, 1, 2")
    space = parser.add_argument_group(
        "search space", "each flag takes MIN:MAX (a range), A,B,C (choices) or one value "
                        "(fixed); unset flags keep the family's default space")
    for flag, key, help_text in _SPACE_FLAGS:
        space.add_argument(flag, dest=key, type=parse_space_value, default=None, help=help_text)
    preset = parser.add_argument_group("Figure 4 preset")
    preset.add_argument("--preset", choices=("figure4",), default=None,
                        help="figure4: the paper's lr sweep (wd 5e-4) and wd sweep (lr 0.1)")
    preset.add_argument("--model", default="newton_cgnet56",
                        help="the Newton-CGNet of --preset figure4 (newton_cgnet56)")
    preset.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="learning rates of the sweep (0.01 0.02 0.05 0.1 0.2 0.5)")
    preset.add_argument("--weight-decays", type=float, nargs="+", default=None,
                        help="weight decays of the sweep (1e-5 5e-5 1e-4 5e-4 1e-3 5e-3)")
    preset.add_argument("--full-grid", action="store_true",
                        help="every lr x wd pair instead of the two sweeps")


def run(args):
    from keras_newton.tuning.search import format_table

    space = {key: getattr(args, key) for _, key, _ in _SPACE_FLAGS
             if getattr(args, key) is not None}
    common = dict(dataset=args.dataset, data=args.data, epochs=args.epochs,
                  subset=args.subset, val_size=args.val_size, overwrite=args.overwrite,
                  distribute=args.distribute, seed=args.seed, verbose=args.verbose,
                  max_retries=args.max_retries, worker_timeout=args.worker_timeout)
    if args.preset == "figure4":
        from keras_newton.tuning.figure4 import FIGURE4_LRS, FIGURE4_WDS, figure4

        if args.tuner is not None or args.max_trials is not None or space:
            raise ValueError("--preset figure4 runs its own lr/wd sweeps: drop --tuner, "
                             "--max-trials and the search-space flags. Received: "
                             + ", ".join(f"{k}={v!r}" for k, v in {
                                 "tuner": args.tuner, "max_trials": args.max_trials, **space
                             }.items() if v is not None))
        summary = figure4(
            args.model, lrs=args.lrs or FIGURE4_LRS,
            weight_decays=args.weight_decays or FIGURE4_WDS, full_grid=args.full_grid,
            directory=args.directory or f"runs/figure4_{args.model}_{args.dataset}",
            augment=True if args.augment is None else args.augment,
            final_epochs=args.final_epochs or 0, **common)
    else:
        from keras_newton.tuning.search import search

        summary = search(
            family=args.family, tuner=args.tuner or "random",
            max_trials=10 if args.max_trials is None else args.max_trials,
            directory=args.directory or f"runs/tune_{args.family}_{args.dataset}",
            space=space or None, augment=bool(args.augment), final_epochs=args.final_epochs,
            **common)
    if summary["role"] == "worker":
        print(f"Worker {summary['tuner_id']} ({summary['distribute']}, {summary['replicas']} "
              f"replica(s)): ran trial(s) {summary['trials_run']}; the chief writes the "
              "results, plot and best model.")
        return 0
    print(format_table(summary["rows"]))
    print(f"best trial {summary['best_trial']}: validation accuracy "
          f"{summary['best_val_accuracy']:.4f} with {summary['best_hyperparameters']}")
    if summary.get("final_val_accuracy") is not None:
        print(f"best model retrained for {summary['final_epochs']} epoch(s): validation "
              f"accuracy {summary['final_val_accuracy']:.4f}, saved to {summary['best_model']}")
    print(f"table {summary['results_csv']}, plot {summary['results_png']}"
          + (f", figure {summary['figure4_png']}" if "figure4_png" in summary else ""))
    return 0


def main(argv=None):
    """Runs ``keras-newton tune`` with ``argv`` (the arguments after ``tune``)."""
    parser = argparse.ArgumentParser(prog="keras-newton tune", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:
        print(f"keras-newton tune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
