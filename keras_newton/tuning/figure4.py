"""The paper's Figure 4 as a preset search: learning-rate and weight-decay sweeps.

Figure 4 of the paper plots the test error of Newton-CGNet-56 (a) at learning rate
0.1 against the weight decay and (b) at weight decay 5e-4 against the learning rate;
the text reports good results for wd in [1e-4, 1e-3] and lr in [0.02, 0.2]. The
figure's exact grid is not given in the text: ``FIGURE4_LRS`` and ``FIGURE4_WDS``
bracket those ranges. Here the error is the validation error (1 - best validation
accuracy) of each trial, on the hold-out split, not the test error.
"""

from pathlib import Path

from keras_newton.tuning.search import read_table, search

FIGURE4_LRS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
FIGURE4_WDS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3)
REFERENCE_LR = 0.1
REFERENCE_WD = 5e-4
FIGURE4_CSV = "figure4.csv"
FIGURE4_PNG = "figure4.png"


def figure4_points(lrs=FIGURE4_LRS, weight_decays=FIGURE4_WDS, full_grid=False):
    """Returns the (lr, weight_decay) points: the paper's two sweeps, or the full grid.

    The sweeps cross at ``(REFERENCE_LR, REFERENCE_WD)``, which must be in the lists.
    """
    lrs, wds = [float(v) for v in lrs], [float(v) for v in weight_decays]
    if not lrs or not wds:
        raise ValueError("`lrs` and `weight_decays` must not be empty. "
                         f"Received: lrs={lrs}, weight_decays={wds}")
    if full_grid:
        return [{"lr": lr, "weight_decay": wd} for lr in lrs for wd in wds]
    if REFERENCE_LR not in lrs or REFERENCE_WD not in wds:
        raise ValueError(f"The sweeps cross at lr={REFERENCE_LR}, weight_decay={REFERENCE_WD}: "
                         f"both must be listed. Received: lrs={lrs}, weight_decays={wds}")
    points = [{"lr": REFERENCE_LR, "weight_decay": wd} for wd in wds]
    points += [{"lr": lr, "weight_decay": REFERENCE_WD} for lr in lrs if lr != REFERENCE_LR]
    return points


def _stages(model):
    from keras_newton.models import canonical_name, parse_spec
    from keras_newton.models.newton_cgnet import SPECS

    if isinstance(model, str) and "{" in model:
        return parse_spec(model)[1]
    name = canonical_name(model)
    if not name.startswith("newton_cgnet"):
        raise ValueError("`model` must be a Newton-CGNet (e.g. newton_cgnet56 or "
                         f"'56-{{9,9,9}}'). Received: model={model!r}")
    return SPECS[int(name[len("newton_cgnet"):])]


def figure4(model="newton_cgnet56", dataset="cifar10", data=None, *, lrs=FIGURE4_LRS,
            weight_decays=FIGURE4_WDS, full_grid=False, epochs=300, subset=None,
            directory="runs/figure4", overwrite=False, augment=True, final_epochs=0,
            dropout=None, batch_size=128, **kwargs):
    """Runs (or resumes) the Figure 4 sweeps and plots them like the paper.

    Everything but ``lr`` and ``weight_decay`` is fixed: the model's stages, width 1,
    the recipe's dropout (0.2 on C10+) and batch size 128. Writes ``figure4.csv`` and
    ``figure4.png`` next to the search's own report. ``**kwargs`` go to ``search``.

    Returns:
        The search summary, plus ``figure4_png`` and ``figure4_csv``.
    """
    from keras_newton.data import canonical_dataset
    from keras_newton.training import get_recipe

    stages = _stages(model)
    points = figure4_points(lrs, weight_decays, full_grid)
    if dropout is None:
        dropout = get_recipe(canonical_dataset(dataset), augment)["dropout"]
    space = {
        "width_multiplier": 1.0, "dropout": dropout, "batch_size": batch_size,
        "lr": sorted({p["lr"] for p in points}),
        "weight_decay": sorted({p["weight_decay"] for p in points}),
    }
    summary = search(family="newton_cgnet", dataset=dataset, data=data, tuner="sweep",
                     max_trials=len(points), epochs=epochs, directory=directory,
                     overwrite=overwrite, space=space, subset=subset, augment=augment,
                     final_epochs=final_epochs, stages=stages, points=points,
                     preset="figure4", **kwargs)
    if summary["role"] == "worker":  # the chief draws the figure
        return summary
    directory = Path(directory)
    depth = 2 * sum(stages) + 2
    rows = [{"lr": r["lr"], "weight_decay": r["weight_decay"],
             "val_error_percent": round(100 * (1 - r["val_accuracy"]), 2),
             "val_accuracy": r["val_accuracy"], "seconds": r.get("seconds")}
            for r in summary["rows"] if r.get("val_accuracy") is not None]
    _write_rows(rows, directory / FIGURE4_CSV)
    plot_figure4(rows, directory / FIGURE4_PNG,
                 title=f"Newton-CGNet-{depth} on {dataset}{'+' if augment else ''}, "
                       f"{summary['train_images']} images, {epochs} epoch(s)")
    summary.update(figure4_csv=str(directory / FIGURE4_CSV),
                   figure4_png=str(directory / FIGURE4_PNG))
    return summary


def _write_rows(rows, path):
    import csv

    columns = ["lr", "weight_decay", "val_error_percent", "val_accuracy", "seconds"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_figure4(rows, path, title=""):
    """Plots (a) error vs weight decay at lr 0.1, (b) error vs lr at wd 5e-4.

    ``rows``: dicts with ``lr``, ``weight_decay`` and ``val_error_percent`` (or a
    ``figure4.csv`` path).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(rows, (str, Path)):
        rows = read_table(rows)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    panels = (
        ("weight_decay", "lr", REFERENCE_LR, "(a) lr = 0.1", "weight decay (wd)"),
        ("lr", "weight_decay", REFERENCE_WD, "(b) wd = 5e-4", "learning rate (lr)"),
    )
    for ax, (x, fixed, value, label, xlabel) in zip(axes, panels, strict=True):
        part = sorted((r for r in rows if r[fixed] == value), key=lambda r: r[x])
        ax.plot([r[x] for r in part], [r["val_error_percent"] for r in part], "o-",
                label=label)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation error (%)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
