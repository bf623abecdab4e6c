"""``keras-newton table2``: reproduces the paper's Table 2 (Section 3.3), and goes past it."""

import argparse
import sys

HELP = ("Reproduce Table 2 of the paper (quasi-Newton and Newton-CG iterations on problem (3)) "
        "with damped Newton-CG, L-BFGS and y0 = 0 Newton-CG beside it; NumPy, CPU.")


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--runs", type=int, default=10, help="random instances (default 10)")
    parser.add_argument("--n", type=int, default=2048, help="dimension (default 2048)")
    parser.add_argument("--seed", type=int, default=0,
                        help="run r uses numpy.random.default_rng([seed, r]) (default 0)")
    parser.add_argument("--gamma", type=float, default=0.9999,
                        help="||A||_2, in (0, 1) (default 0.9999)")
    parser.add_argument("--eps", type=float, default=1e-20,
                        help="stop when |F(x_k) - F(0)| < eps (default 1e-20)")
    parser.add_argument("--max-iter", type=int, default=1000,
                        help="iteration cap; a run reaching it has not converged (default 1000)")
    parser.add_argument("--threads", type=int, default=None,
                        help="BLAS threads (default: the CPU count; 1 on a machine busy "
                             "with other work, where threaded BLAS stalls)")
    parser.add_argument("--paper-only", action="store_true",
                        help="only the paper's eight settings")
    parser.add_argument("--json", metavar="PATH", help="write all numbers as JSON")
    parser.add_argument("--plot", metavar="PATH",
                        help="write a PNG of |F(x_k) - F(0)| per iteration (first run)")


def run(args) -> int:
    import os

    from keras_newton.design import experiment
    from keras_newton.design.problem import check_param

    for name in ("json", "plot"):  # fail now, not after the run
        path = getattr(args, name)
        if path is not None:
            folder = os.path.dirname(os.path.abspath(path))
            check_param(name, path, os.path.isdir(folder), "a file path in an existing folder")

    def progress(line):
        print(f"table2: {line}", file=sys.stderr, flush=True)

    table = experiment.run_table2(
        runs=args.runs, n=args.n, gamma=args.gamma, seed=args.seed, eps=args.eps,
        max_iter=args.max_iter,
        settings=experiment.PAPER_SETTINGS if args.paper_only else experiment.DEFAULT_SETTINGS,
        progress=progress, threads=args.threads or os.cpu_count() or 1,
    )
    print(experiment.format_table(table))
    if args.json:
        experiment.save_json(table, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        experiment.plot_histories(table, args.plot)
        print(f"wrote {args.plot}")
    return 0
