"""The experiment of Section 3.3 (the paper's Table 2), with the extra methods beside it.

n = 2048, A = gamma C^T C / ||C^T C||_2 with gamma = 0.9999, C and x_0 i.i.d. N(0, 1); stop
when |F(x_k) - F(0)| < 1e-20; the median number of iterations over 10 runs. Run ``r`` of
seed ``s`` draws its instance from ``numpy.random.default_rng([s, r])``; every setting of a
run solves the same instance, all settings together in lock-step
(:func:`~keras_newton.design.solvers.solve_lockstep`: their products with A batched).
"""

import json
import time
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from keras_newton.design.problem import (
    BATCH_MIN,
    SymmetricOperator,
    check_instance,
    check_param,
    is_int,
    random_problem,
)
from keras_newton.design.solvers import METHODS, check_stopping, make_solver, solve_lockstep

# (method, setting) -> median iterations reported in the paper's Table 2.
PAPER_TABLE2 = {
    ("quasi-newton", 0): 72,
    ("quasi-newton", 1): 36,
    ("quasi-newton", 2): 24,
    ("newton-cg", 3): 157,
    ("newton-cg", 4): 36,
    ("newton-cg", 6): 14.5,
    ("newton-cg", 8): 9,
    ("newton-cg", 10): 7,
}
PAPER_SETTINGS = list(PAPER_TABLE2)
EXTRA_SETTINGS = [
    ("newton-cg-y0-zero", 3),
    ("newton-cg-y0-zero", 4),
    ("newton-cg-y0-zero", 6),
    ("damped-newton-cg", 3),
    ("damped-newton-cg", 4),
    ("damped-newton-cg", 6),
    ("l-bfgs", 1),
    ("l-bfgs", 5),
]
DEFAULT_SETTINGS = PAPER_SETTINGS + EXTRA_SETTINGS
TOLERANCE = 0.2  # a row matches the paper when within 20% of its value


def setting_label(method, setting):
    """``'N=3'`` and the like."""
    return f"{METHODS[method][1]}={setting}"


@dataclass
class SettingResult:
    """One row of the table: a method and setting over all runs.

    Attributes:
        method, setting: as for :func:`~keras_newton.design.solvers.solve`.
        iterations, converged, matvecs: one entry per run.
        history: ``|F(x_k) - F(0)|`` along the first run.
    """

    method: str
    setting: int
    iterations: list = field(default_factory=list)
    converged: list = field(default_factory=list)
    matvecs: list = field(default_factory=list)
    history: list = field(default_factory=list, repr=False)

    @property
    def paper(self):
        """The paper's value, or None for settings the paper does not report."""
        return PAPER_TABLE2.get((self.method, self.setting))

    @property
    def median_iterations(self):
        """The median over runs; a run that did not converge counts as infinitely many."""
        its = [k if ok else np.inf for k, ok in zip(self.iterations, self.converged, strict=True)]
        return float(np.median(its))

    @property
    def median_matvecs(self):
        return float(np.median(self.matvecs))

    @property
    def matches_paper(self):
        """Whether the median is within 20% of the paper's value (None without one)."""
        if self.paper is None:
            return None
        return abs(self.median_iterations - self.paper) <= TOLERANCE * self.paper


@dataclass
class Table2:
    """The result of :func:`run_table2`: its configuration, rows, timings and BLAS calls
    (``passes`` over A: products batched in lock-step take one pass)."""

    config: dict
    rows: list
    matrix_seconds: float = 0.0
    solve_seconds: float = 0.0
    passes: int = 0


def check_settings(settings):
    """Validates a list of (method, setting) pairs (ValueError on the first bad one)."""
    settings = list(settings)
    check_param("settings", settings, len(settings) > 0, "a non-empty list of (method, setting)")
    for method, setting in settings:
        make_solver(method, setting)
    return settings


def solve_run(run, n=2048, gamma=0.9999, seed=0, eps=1e-20, max_iter=1000,
              settings=DEFAULT_SETTINGS, batch_min=BATCH_MIN):
    """Generates instance ``run`` and solves it for every setting in lock-step.

    ``batch_min`` is :class:`~keras_newton.design.problem.SymmetricOperator`'s (None: no
    GEMM batching). The other arguments are :func:`run_table2`'s.

    Returns:
        ``(results, matrix_seconds, solve_seconds, passes)``, one
        :class:`~keras_newton.design.solvers.SolveResult` per setting.
    """
    start = time.perf_counter()
    A, x0 = random_problem(n, gamma, np.random.default_rng([seed, run]))
    matrix_seconds = time.perf_counter() - start
    start = time.perf_counter()
    op = SymmetricOperator(A, batch_min=batch_min)
    results = solve_lockstep(op, x0, list(settings), eps=eps, max_iter=max_iter)
    return results, matrix_seconds, time.perf_counter() - start, op.passes


def run_table2(runs=10, n=2048, gamma=0.9999, seed=0, eps=1e-20, max_iter=1000,
               settings=DEFAULT_SETTINGS, progress=None, threads=1):
    """Runs the experiment of Section 3.3 for each (method, setting).

    Args:
        runs: the number of random instances, >= 1.
        n: the dimension, >= 1.
        gamma: ||A||_2, in (0, 1).
        seed: an integer >= 0; run r uses ``default_rng([seed, r])``.
        eps: the tolerance on |F(x_k) - F(0)|.
        max_iter: the cap on iterations; a run that reaches it has not converged.
        settings: (method, setting) pairs, e.g. ``[("newton-cg", 3)]``.
        progress: called with one line of text after each run, if given.
        threads: BLAS threads for the run, >= 1. With 1, products of 7 or more settings
            share one GEMM (lock-step batching); with more, every product is a threaded
            dsymv (faster on an otherwise idle machine, far slower when another process
            holds a core). The instances do not depend on it, the iteration counts did
            not in any run we checked (products round differently).

    Returns:
        A :class:`Table2`.
    """
    check_param("runs", runs, is_int(runs) and runs >= 1, "an integer >= 1")
    check_instance(n, gamma)
    check_param("seed", seed, is_int(seed) and seed >= 0, "an integer >= 0")
    check_stopping(eps, max_iter)
    check_param("threads", threads, is_int(threads) and threads >= 1, "an integer >= 1")
    rows = [SettingResult(m, s) for m, s in check_settings(settings)]
    table = Table2(dict(runs=runs, n=n, gamma=gamma, seed=seed, eps=eps, max_iter=max_iter),
                   rows)
    keys = [(row.method, row.setting) for row in rows]
    batch_min = BATCH_MIN if threads == 1 else None
    with threadpool_limits(limits=threads, user_api="blas"):
        for run in range(runs):
            results, matrix_seconds, solve_seconds, passes = solve_run(
                run, n, gamma, seed, eps, max_iter, keys, batch_min)
            table.matrix_seconds += matrix_seconds
            table.solve_seconds += solve_seconds
            table.passes += passes
            for row, result in zip(rows, results, strict=True):
                row.iterations.append(result.iterations)
                row.converged.append(result.converged)
                row.matvecs.append(result.matvecs)
                if run == 0:
                    row.history = result.history
            if progress is not None:
                counts = " ".join(
                    f"{r.iterations[-1]}{'' if r.converged[-1] else '(failed)'}" for r in rows
                )
                progress(f"run {run + 1}/{runs}: iterations {counts}")
    return table


def format_table(table):
    """The table as text: the measured medians and the paper's values side by side."""
    cfg = table.config
    head = ("Method", "Setting", "Median it.", "Paper", "Within 20%", "Range",
            "Median matvecs", "Converged")
    lines = []
    for row in table.rows:
        median = row.median_iterations
        lines.append((
            row.method,
            setting_label(row.method, row.setting),
            f"{median:g}" if np.isfinite(median) else f">{cfg['max_iter']}",
            "-" if row.paper is None else f"{row.paper:g}",
            {None: "-", True: "yes", False: "NO"}[row.matches_paper],
            f"{min(row.iterations)}-{max(row.iterations)}",
            f"{row.median_matvecs:g}",
            f"{sum(row.converged)}/{len(row.converged)}",
        ))
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    title = (f"Table 2: iterations to |F(x_k) - F(0)| < {cfg['eps']:g}, median of {cfg['runs']} "
             f"runs (n={cfg['n']}, gamma={cfg['gamma']:g}, seed={cfg['seed']}, "
             f"cap {cfg['max_iter']})")
    rule = "-" * len(fmt.format(*head))
    body = [fmt.format(*r) for r in lines]
    timing = (f"matrix generation {table.matrix_seconds:.1f} s, solvers "
              f"{table.solve_seconds:.1f} s ({table.passes} passes over A)")
    return "\n".join([title, rule, fmt.format(*head), rule, *body, rule, timing])


def to_dict(table):
    """The table as JSON-ready data (per-run numbers included)."""
    rows = []
    for row in table.rows:
        median = row.median_iterations
        rows.append(dict(
            method=row.method,
            setting=setting_label(row.method, row.setting),
            median_iterations=median if np.isfinite(median) else None,
            paper=row.paper,
            within_20_percent=row.matches_paper,
            median_matvecs=row.median_matvecs,
            iterations=row.iterations,
            converged=row.converged,
            matvecs=row.matvecs,
            history_run0=row.history,
        ))
    return dict(config=table.config, matrix_seconds=table.matrix_seconds,
                solve_seconds=table.solve_seconds, passes=table.passes, rows=rows)


def save_json(table, path):
    """Writes :func:`to_dict` to ``path``."""
    with open(path, "w") as f:
        json.dump(to_dict(table), f, indent=1)


def plot_histories(table, path):
    """|F(x_k) - F(0)| against k (log scale), one curve per setting, first run; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour map and line style per method; darker = larger setting
    styles = {"quasi-newton": ("Blues", "-"), "newton-cg": ("Reds", "-"),
              "newton-cg-y0-zero": ("Greens", "--"), "damped-newton-cg": ("Purples", "-."),
              "l-bfgs": ("Oranges", ":")}
    fig, ax = plt.subplots(figsize=(11, 6.5), layout="constrained")
    for method in dict.fromkeys(row.method for row in table.rows):
        group = [row for row in table.rows if row.method == method]
        cmap, line = styles[method]
        for i, row in enumerate(group):
            f = np.asarray(row.history)
            k = np.flatnonzero(f > 0)  # log scale: F = 0 exactly cannot be drawn
            color = plt.get_cmap(cmap)(0.45 + 0.5 * i / max(len(group) - 1, 1))
            label = f"{method} {setting_label(method, row.setting)} ({len(f) - 1} it.)"
            ax.semilogy(k, f[k], line, color=color, lw=1.8, label=label)
    eps = table.config["eps"]
    ax.axhline(eps, color="k", lw=0.8, ls="-.", label=f"eps = {eps:g}")
    ax.set_xlabel("iteration k")
    ax.set_ylabel("|F(x_k) - F(0)|")
    ax.set_title(f"Problem (3), n={table.config['n']}, gamma={table.config['gamma']:g} "
                 f"(first run, seed {table.config['seed']})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
