"""Benchmark: the paper's Table 2 (runs x 8 settings, n = 2048), optimised vs straightforward.

    python benchmarks/table2.py [--runs 10] [--n 2048] [--seed 0] [--threads 2]

Four timings of the same instances (run r from ``default_rng([seed, r])``), one after the
other in one invocation, generation included in each:

1. optimised, as ``keras-newton table2 --threads 2`` runs it: ``run_table2(threads=2)``,
   products by threaded BLAS dsymv;
2. straightforward, one BLAS thread: Algorithm 1 exactly as written, one vector at a time:
   ``A @ v`` products, the CG gradient recomputed as ``Q y - b`` at every inner iteration,
   ``b = U^T r`` formed, F(x_k) computed by a function of its own;
3. optimised, one BLAS thread (``threads=1``: lock-step GEMM batching);
4. straightforward with ``--threads`` BLAS threads (the same resources as 1).

The optimised solver is ``keras_newton.design.solvers.solve_lockstep``: ``A x_k`` shared
by the stopping test and the step, the CG gradient updated by recurrence, ``g_0`` in one
product, no unused last product (2N + 1 products per Newton-CG iteration instead of
4N + 5, m + 1 instead of m + 2 per quasi-Newton iteration), BLAS ``dsymv`` (one triangle
of A: half the memory traffic of ``A @ v``), and, with one BLAS thread, the eight settings
of a run advanced in lock-step, their products in one GEMM pass over A while ``BATCH_MIN``
or more settings are running. The benchmark fails (exit 1) unless all four give the same
iteration counts in every run and setting.

NumPy starts with one BLAS thread (set before it loads); each timing then sets its own
count with threadpoolctl.
"""

import argparse
import os
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2,
                        help="BLAS threads for timings 1 and 4 (default 2, this machine's cores)")
    return parser.parse_args(argv)


class CountingMatrix:
    """``A @ v`` with NumPy, counting the products."""

    def __init__(self, A):
        self.A = A
        self.matvecs = 0

    def __matmul__(self, v):
        self.matvecs += 1
        return self.A @ v


def F(A, x):
    """Eq. (3), on its own."""
    import numpy as np

    z = A @ x
    return 0.5 * (x @ z) - 0.5 * np.sum(np.maximum(z, 0.0) ** 2)


def straightforward_quasi_newton(A, x, m, eps, max_iter):
    """Eq. (15)/(8), ``H_k A = sum_{n=0}^{m} (D A)^n``, written plainly."""
    import numpy as np

    k = 0
    while abs(F(A, x)) >= eps and k < max_iter:
        z = A @ x
        D = (z > 0).astype(float)
        r = np.maximum(z, 0.0) - x
        term, step = r, r
        for _ in range(m):
            term = D * (A @ term)
            step = step + term
        x = np.maximum(x + step, 0.0)
        k += 1
    return k, abs(F(A, x)) < eps


def Q(A, D, v):
    """``U^T U v`` with ``U = I - D A``."""
    Uv = v - D * (A @ v)
    return Uv - A @ (D * Uv)


def straightforward_newton_cg(A, x, N, eps, max_iter):
    """Eq. (10) with Algorithm 1 exactly as written (y_0 = x_k)."""
    import numpy as np

    k = 0
    while abs(F(A, x)) >= eps and k < max_iter:
        z = A @ x
        D = (z > 0).astype(float)
        r = np.maximum(z, 0.0) - x
        b = r - A @ (D * r)  # U^T r
        y = x.copy()  # line 1
        g = Q(A, D, y) - b  # line 2
        d = -g  # line 3
        for _ in range(N):  # line 4
            Qd = Q(A, D, d)
            alpha = -(g @ d) / (d @ Qd)  # line 5
            y = y + alpha * d  # line 6
            g = Q(A, D, y) - b  # line 7
            beta = (g @ Qd) / (d @ Qd)  # line 8
            d = -g + beta * d  # line 9
        x = np.maximum(x + y, 0.0)
        k += 1
    return k, abs(F(A, x)) < eps


STRAIGHTFORWARD = {"quasi-newton": straightforward_quasi_newton,
                   "newton-cg": straightforward_newton_cg}


def straightforward_table(args, keys, eps, max_iter, threads):
    """Timing 2 or 4: ``(results, matrix_seconds, solve_seconds)``."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from keras_newton.design.problem import random_problem

    plain = {key: dict(iterations=[], matvecs=[]) for key in keys}
    matrix_seconds = solve_seconds = 0.0
    with threadpool_limits(limits=threads, user_api="blas"):
        for run in range(args.runs):
            start = time.perf_counter()
            A, x0 = random_problem(args.n, 0.9999, np.random.default_rng([args.seed, run]))
            matrix_seconds += time.perf_counter() - start
            start = time.perf_counter()
            for method, setting in keys:
                counted = CountingMatrix(A)
                its, converged = STRAIGHTFORWARD[method](counted, x0, setting, eps, max_iter)
                assert converged, (method, setting)
                plain[method, setting]["iterations"].append(its)
                plain[method, setting]["matvecs"].append(counted.matvecs)
            solve_seconds += time.perf_counter() - start
            print(f"straightforward, {threads} BLAS thread(s): run {run + 1}/{args.runs}: "
                  f"{solve_seconds:.1f} s so far", file=sys.stderr, flush=True)
    return plain, matrix_seconds, solve_seconds


def main(argv=None):
    args = parse_args(argv)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import numpy as np

    from keras_newton.design.experiment import (
        PAPER_SETTINGS,
        PAPER_TABLE2,
        run_table2,
        setting_label,
    )
    from keras_newton.design.problem import check_instance

    check_instance(args.n, 0.9999)
    eps, max_iter = 1e-20, 1000
    keys = PAPER_SETTINGS
    load_before = os.getloadavg()[0]
    T = args.threads

    def optimised(threads):
        start = time.perf_counter()
        table = run_table2(
            runs=args.runs, n=args.n, seed=args.seed, eps=eps, max_iter=max_iter,
            settings=keys, threads=threads,
            progress=lambda line: print(f"optimised, {threads} BLAS thread(s): {line}",
                                        file=sys.stderr, flush=True))
        return table, time.perf_counter() - start

    fast_T, fast_T_wall = optimised(T)  # 1
    plain, plain_matrix, plain_solve = straightforward_table(args, keys, eps, max_iter, 1)  # 2
    plain_wall = plain_matrix + plain_solve
    fast_1, fast_1_wall = optimised(1)  # 3
    plain_T, plain_T_matrix, plain_T_solve = straightforward_table(  # 4
        args, keys, eps, max_iter, T)
    plain_T_wall = plain_T_matrix + plain_T_solve

    print(f"Table 2 benchmark: {args.runs} runs x {len(keys)} settings, n={args.n}, "
          f"seed={args.seed}, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    head = ("Method", "Setting", "Median opt.", "Median plain", "Paper", "Within 20%",
            "Matvecs opt.", "Matvecs plain")
    print("{:<13} {:<8} {:>11} {:>12} {:>6} {:>10} {:>12} {:>13}".format(*head))
    mismatches = []
    for key, row, row1 in zip(keys, fast_T.rows, fast_1.rows, strict=True):
        median = row.median_iterations
        paper = PAPER_TABLE2[key]
        print("{:<13} {:<8} {:>11g} {:>12g} {:>6g} {:>10} {:>12g} {:>13g}".format(
            key[0], setting_label(*key), median, float(np.median(plain[key]["iterations"])),
            paper, "yes" if abs(median - paper) <= 0.2 * paper else "NO",
            row.median_matvecs, float(np.median(plain[key]["matvecs"]))))
        mismatches += [(run, key) for run, its in enumerate(zip(
            row.iterations, row1.iterations, plain[key]["iterations"],
            plain_T[key]["iterations"], strict=True)) if len(set(its)) > 1]
    total_fast = sum(sum(row.matvecs) for row in fast_1.rows)
    total_plain = sum(sum(v["matvecs"]) for v in plain.values())
    print(f"products with A: optimised {total_fast}, straightforward {total_plain} "
          f"({total_plain / total_fast:.2f}x); BLAS calls with one thread (lock-step "
          f"batching): {fast_1.passes} ({total_plain / fast_1.passes:.2f}x fewer)")
    print(f"1 BLAS thread each, solvers only: optimised {fast_1.solve_seconds:.2f} s, "
          f"straightforward {plain_solve:.2f} s, ratio {plain_solve / fast_1.solve_seconds:.2f}x")
    print(f"1 BLAS thread each, full table: optimised {fast_1_wall:.2f} s, straightforward "
          f"{plain_wall:.2f} s, ratio {plain_wall / fast_1_wall:.2f}x")
    print(f"{T} BLAS threads each, full table: optimised {fast_T_wall:.2f} s, straightforward "
          f"{plain_T_wall:.2f} s, ratio {plain_T_wall / fast_T_wall:.2f}x")
    print(f"full Table 2 as `keras-newton table2 --threads {T}` runs it: {fast_T_wall:.2f} s "
          f"wall (target <= 30 s); against the straightforward one with one BLAS thread "
          f"{plain_wall / fast_T_wall:.2f}x (target >= 5x)")
    if mismatches:
        print(f"FAIL: iteration counts differ in (run, setting) {mismatches}")
        return 1
    print("iteration counts: identical in every run and setting (all four timings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
