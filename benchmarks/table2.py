"""Benchmark: the paper's Table 2 (runs x 8 settings, n = 2048), optimised vs straightforward.

    python benchmarks/table2.py [--runs 10] [--n 2048] [--seed 0] [--blas-threads 1]

Both implementations solve the same instances (generated once per run, timed apart) in
this process, run by run, alternating which goes first. The straightforward one, below,
is Algorithm 1 exactly as written, one vector at a time: ``A @ v`` products, the CG
gradient recomputed as ``Q y - b`` at every inner iteration, ``b = U^T r`` formed, and
F(x_k) computed by a function of its own. The optimised one is
``keras_newton.design.solvers.solve_lockstep``: ``A x_k`` shared by the stopping test and
the step, the CG gradient updated by recurrence, ``g_0`` in one product, no unused last
product (2N + 1 products per Newton-CG iteration instead of 4N + 5, m + 1 instead of m + 2
per quasi-Newton iteration), BLAS ``dsymv`` (one triangle of A: half the memory traffic of
``A @ v``), and the eight settings of a run advanced in lock-step, their products in one
GEMM pass over A while ``BATCH_MIN`` or more settings are running. The benchmark fails
(exit 1) unless both give the same iteration counts in every run and setting.

``--blas-threads`` (default 1) is set before NumPy loads: on a machine shared with other
work, multi-threaded OpenBLAS stalls on every call; both sides get the same setting.
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
    parser.add_argument("--blas-threads", default="1",
                        help="OPENBLAS_NUM_THREADS for this process ('keep': leave it as is)")
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


def main(argv=None):
    args = parse_args(argv)
    if args.blas_threads != "keep":
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = args.blas_threads
    import numpy as np

    from keras_newton.design.experiment import PAPER_SETTINGS, PAPER_TABLE2, setting_label
    from keras_newton.design.problem import SymmetricOperator, check_instance, random_problem
    from keras_newton.design.solvers import solve_lockstep

    check_instance(args.n, 0.9999)
    eps, max_iter = 1e-20, 1000
    keys = PAPER_SETTINGS
    fast = {key: dict(iterations=[], matvecs=[]) for key in keys}
    plain = {key: dict(iterations=[], matvecs=[]) for key in keys}
    seconds = dict(matrix=0.0, fast=0.0, plain=0.0)  # wall clock
    cpu = dict(matrix=0.0, fast=0.0, plain=0.0)  # this process's CPU time
    passes = [0]  # BLAS calls of the optimised side (a batched round is one)
    load_before = os.getloadavg()[0]
    mismatches = []

    def run_fast(A, x0):
        op = SymmetricOperator(A)
        for key, result in zip(keys, solve_lockstep(op, x0, keys, eps=eps, max_iter=max_iter),
                               strict=True):
            assert result.converged, key
            fast[key]["iterations"].append(result.iterations)
            fast[key]["matvecs"].append(result.matvecs)
        passes[0] += op.passes

    def run_plain(A, x0):
        for method, setting in keys:
            counted = CountingMatrix(A)
            its, converged = STRAIGHTFORWARD[method](counted, x0, setting, eps, max_iter)
            assert converged, (method, setting)
            plain[method, setting]["iterations"].append(its)
            plain[method, setting]["matvecs"].append(counted.matvecs)

    for run in range(args.runs):
        start, start_cpu = time.perf_counter(), time.process_time()
        A, x0 = random_problem(args.n, 0.9999, np.random.default_rng([args.seed, run]))
        seconds["matrix"] += time.perf_counter() - start
        cpu["matrix"] += time.process_time() - start_cpu
        order = [("fast", run_fast), ("plain", run_plain)]
        for name, fn in order if run % 2 == 0 else order[::-1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(A, x0)
            seconds[name] += time.perf_counter() - start
            cpu[name] += time.process_time() - start_cpu
        for key in keys:
            if fast[key]["iterations"][-1] != plain[key]["iterations"][-1]:
                mismatches.append((run, key))
        print(f"run {run + 1}/{args.runs}: optimised {seconds['fast']:.1f} s, "
              f"straightforward {seconds['plain']:.1f} s so far; iterations "
              + " ".join(str(fast[key]["iterations"][-1]) for key in keys),
              file=sys.stderr, flush=True)

    print(f"Table 2 benchmark: {args.runs} runs x {len(keys)} settings, n={args.n}, "
          f"seed={args.seed}, OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, "
          f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    head = ("Method", "Setting", "Median opt.", "Median plain", "Paper", "Within 20%",
            "Matvecs opt.", "Matvecs plain")
    print("{:<13} {:<8} {:>11} {:>12} {:>6} {:>10} {:>12} {:>13}".format(*head))
    for key in keys:
        median = float(np.median(fast[key]["iterations"]))
        paper = PAPER_TABLE2[key]
        print("{:<13} {:<8} {:>11g} {:>12g} {:>6g} {:>10} {:>12g} {:>13g}".format(
            key[0], setting_label(*key), median, float(np.median(plain[key]["iterations"])),
            paper, "yes" if abs(median - paper) <= 0.2 * paper else "NO",
            float(np.median(fast[key]["matvecs"])), float(np.median(plain[key]["matvecs"]))))
    total_fast = sum(sum(v["matvecs"]) for v in fast.values())
    total_plain = sum(sum(v["matvecs"]) for v in plain.values())
    wall = seconds["matrix"] + seconds["fast"]
    print(f"products with A: optimised {total_fast}, straightforward {total_plain} "
          f"({total_plain / total_fast:.2f}x); passes over A (BLAS calls): optimised "
          f"{passes[0]}, straightforward {total_plain} ({total_plain / passes[0]:.2f}x)")
    print(f"matrix generation (shared): {seconds['matrix']:.2f} s wall, {cpu['matrix']:.2f} s CPU")
    print(f"solvers, wall: optimised {seconds['fast']:.2f} s, straightforward "
          f"{seconds['plain']:.2f} s, ratio {seconds['plain'] / seconds['fast']:.2f}x "
          f"(target >= 5x); with generation {(seconds['matrix'] + seconds['plain']) / wall:.2f}x")
    print(f"solvers, CPU:  optimised {cpu['fast']:.2f} s, straightforward {cpu['plain']:.2f} s, "
          f"ratio {cpu['plain'] / cpu['fast']:.2f}x")
    print(f"full Table 2, optimised: {wall:.2f} s wall (target <= 30 s), "
          f"{cpu['matrix'] + cpu['fast']:.2f} s CPU")
    if mismatches:
        print(f"FAIL: iteration counts differ in (run, setting) {mismatches}")
        return 1
    print("iteration counts: identical in every run and setting")
    return 0


if __name__ == "__main__":
    sys.exit(main())
