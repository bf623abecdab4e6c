"""Solvers for problem (3): the paper's quasi-Newton and Newton-CG methods, and more.

Every solver is a class whose ``step(x, z)`` computes ``x_{k+1}`` from ``x_k`` and
``z = A x_k`` as a generator: whenever it needs a product with A it yields the vector ``v``
and is sent ``A v`` back (``Av = yield v``). The solvers never touch A, so whoever runs them
decides how the products are computed (:func:`drive` runs one step with any ``op @ v``).
``D = Diag[ReLU'(A x_k)]`` is the mask ``z > 0``.

Lock-step batching. :func:`solve_lockstep` runs several settings on one instance together
(the eight settings of a run of Table 2 share A and x_0): every unfinished setting waits for
exactly one product at a time, so each round gathers the vectors they wait for, computes all
the products together (:meth:`~keras_newton.design.problem.SymmetricOperator.products`: one
GEMM pass over A for ``BATCH_MIN`` or more vectors, else dsymv for each) and sends each
setting its own. The rounds number the longest setting's products, not the sum; each
setting does the arithmetic of a run on its own, up to the rounding of the products.
:func:`solve` is the same with one setting (dsymv only). :func:`iterate` is the outer loop
shared by both: ``A x_k`` serves both the stopping test and the next step.

Paper (Section 3):
    QuasiNewton    eqs. (15), (8); m = 0 is the PlainNet iteration (16) = (2).
    NewtonCG       eq. (10), U y = r solved by Algorithm 1 (CG on eq. 14), y_0 = x_k.
Beyond the paper (its conclusion lists them as future work):
    NewtonCG(zero_start=True)   the usual inexact-Newton start y_0 = 0.
    DampedNewtonCG              damped Newton: the Newton-CG direction and a line search.
    LBFGS                       limited-memory BFGS updates of the paper's H_0 = A^{-1}.
"""

import numbers
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from keras_newton.design.problem import (
    SymmetricOperator,
    check_param,
    is_int,
    objective_from,
    project,
    relu,
)


class QuasiNewton:
    """Quasi-Newton iteration (15): ``x_{k+1} = P_C[x_k - H_k grad F(x_k)]``.

    ``H_k = sum_{n=0}^{m} (D A)^n A^{-1}`` truncates the Neumann series (7) of the inverse
    Hessian. Since ``grad F = -A r`` with ``r = ReLU(A x_k) - x_k``, the step is eq. (8),
    ``x_{k+1} = ReLU[x_k + sum_{n=0}^{m} (D A)^n r]``: no inverse is needed. m = 0 is eq. (16),
    ``x_{k+1} = ReLU(A x_k)`` (PlainNet); m >= 1 unrolls into a ResNet block (eq. 9).
    Costs m products with A per iteration (plus ``A x_k``).
    """

    def __init__(self, m):
        self.m = m

    def step(self, x, z):
        active = z > 0
        r = np.where(active, z, 0.0) - x  # ReLU(A x_k) - x_k = -A^{-1} grad F(x_k)
        term, total = r, r.copy()
        for _ in range(self.m):
            term = np.where(active, (yield term), 0.0)  # (D A)^n r
            total += term
        return project(x + total)


def newton_cg_direction(x, z, N, zero_start=False):
    """Algorithm 1: N CG iterations on problem (14), approximating ``y = U^{-1} r`` (11).

    ``U = I - D A``, ``r = ReLU(A x_k) - x_k``, ``Q = U^T U``, ``b = U^T r``. alpha_t and beta_t
    are Algorithm 1's exact formulas; the gradient ``g_{t+1} = Q y_{t+1} - b`` (line 7) is
    updated by the recurrence ``g_{t+1} = g_t + alpha_t Q d_t`` (equal in exact arithmetic),
    and ``d^T Q d = ||U d||^2``. A generator (see the module docstring) that costs 2N
    products with A.

    Args:
        x: x_k.
        z: ``A x_k``.
        N: the number of CG iterations, >= 1.
        zero_start: start from y_0 = 0 instead of the paper's y_0 = x_k.

    Returns:
        y_N.
    """
    active = z > 0

    def U(v):  # (I - D A) v
        return v - np.where(active, (yield v), 0.0)

    def Ut(w):  # (I - A D) w
        return w - (yield np.where(active, w, 0.0))

    r = np.where(active, z, 0.0) - x
    if zero_start:
        y, Uy = np.zeros_like(x), np.zeros_like(x)
    else:
        y, Uy = x.copy(), x - np.where(active, z, 0.0)  # y_0 = x_k; U x_k = x_k - D z is free
    g = yield from Ut(Uy - r)  # line 2: g_0 = Q y_0 - b = U^T (U y_0 - r)
    d = -g  # line 3
    for t in range(N):  # line 4
        Ud = yield from U(d)
        dQd = Ud @ Ud
        if dQd == 0.0:  # g_t = 0: y_t already solves (14)
            break
        alpha = -(g @ d) / dQd  # line 5
        y += alpha * d  # line 6
        if t == N - 1:  # g_N and d_N are never used
            break
        Qd = yield from Ut(Ud)
        g += alpha * Qd  # line 7
        beta = (g @ Qd) / dQd  # line 8
        d = -g + beta * d  # line 9
    return y


class NewtonCG:
    """Newton-CG method, eq. (10): ``x_{k+1} = ReLU(x_k + y_N)``, y_N from Algorithm 1.

    With y_0 = x_k (the paper's choice, Section 3.3) each iteration unrolls into a Newton-CG
    block (Algorithm 2). Exact Newton (N large enough) reaches x = 0 in one step: F is
    positively homogeneous of degree 2, so ``r = -U x_k`` and ``U^{-1} r = -x_k``.
    Costs 2N products with A per iteration (plus ``A x_k``).
    """

    def __init__(self, N, zero_start=False):
        self.N = N
        self.zero_start = zero_start

    def step(self, x, z):
        y = yield from newton_cg_direction(x, z, self.N, self.zero_start)
        return project(x + y)


def exact_line_search(p, z, Ap, max_iter=50):
    """The minimiser t of ``phi(t) = F(x + t p)``, given ``z = A x`` and ``A p``.

    phi is strictly convex and piecewise quadratic: ``phi'(t) = p^T A (x + t p) -
    (A p)^T ReLU(z + t A p)``. Safeguarded Newton steps on phi' from t = 1 (the undamped
    step); a Newton step that keeps the sign pattern of ``z + t A p`` lands on the exact root.
    """
    pz, pAp = p @ z, p @ Ap
    if not pAp > 0:  # p = 0: nothing to search
        return 1.0
    lo, hi, t = -np.inf, np.inf, 1.0
    pattern = None
    for _ in range(max_iter):
        zt = z + t * Ap
        on = zt > 0
        if pattern is not None and np.array_equal(on, pattern):
            return t  # phi' is linear between the last two points: t is its root
        slope = pz + t * pAp - Ap[on] @ zt[on]  # phi'(t)
        if slope == 0.0:
            return t
        lo, hi = (t, hi) if slope < 0 else (lo, t)
        curvature = pAp - Ap[on] @ Ap[on]  # phi''(t) >= (1 - ||A||) p^T A p > 0
        t_next = t - slope / curvature
        pattern = on
        if not lo < t_next < hi:  # Newton left the bracket: bisect
            t_next, pattern = 0.5 * (lo + hi), None
        t = t_next
    return t


class DampedNewtonCG:
    """Damped Newton-CG (beyond the paper): ``x_{k+1} = ReLU(x_k + t_k y_N)``.

    y_N is the Newton-CG direction (Algorithm 1, y_0 = x_k) and t_k minimises F along it
    (:func:`exact_line_search`; t_k = 1 is the paper's undamped step). Costs 2N + 1
    products with A per iteration (plus ``A x_k``).
    """

    def __init__(self, N):
        self.N = N

    def step(self, x, z):
        p = yield from newton_cg_direction(x, z, self.N)
        Ap = yield p
        return project(x + exact_line_search(p, z, Ap) * p)


def lbfgs_direction(g, u, pairs):
    """``H g`` by the L-BFGS two-loop recursion with H_0 = A^{-1}, never inverting A.

    Args:
        g: the vector to multiply (a gradient).
        u: ``A^{-1} g``.
        pairs: ``(s, y, A^{-1} y, 1 / y^T s)`` for each stored pair, oldest first.
    """
    q, q_inv = g.copy(), u.copy()  # q_inv = A^{-1} q throughout
    alphas = []
    for s, y, y_inv, rho in reversed(pairs):
        alpha = rho * (s @ q)
        q -= alpha * y
        q_inv -= alpha * y_inv
        alphas.append(alpha)
    h = q_inv  # H_0 q
    for (s, y, _, rho), alpha in zip(pairs, reversed(alphas), strict=True):
        h += (alpha - rho * (y @ h)) * s
    return h


class LBFGS:
    """Projected L-BFGS (beyond the paper): ``x_{k+1} = P_C[x_k - H_k grad F(x_k)]`` (15).

    H_k is the BFGS update, from the last ``memory`` pairs ``s = x_{i+1} - x_i``,
    ``y = grad F(x_{i+1}) - grad F(x_i)``, of the paper's H_0 = A^{-1} (the PlainNet's
    approximation, eq. 16). No inverse of A is needed: ``A^{-1} grad F(x) = x - ReLU(A x)``
    (eq. 4), see :func:`lbfgs_direction`. Costs 1 product with A per iteration (the
    gradient, plus ``A x_k``).
    """

    def __init__(self, memory):
        self.pairs = deque(maxlen=memory)  # (s, y, A^{-1} y, 1 / y^T s), oldest first
        self.previous = None

    def step(self, x, z):
        u = x - relu(z)  # A^{-1} grad F(x_k)
        g = yield u  # grad F(x_k) = A u, eq. (4)
        if self.previous is not None:
            x_old, u_old, g_old = self.previous
            s, y = x - x_old, g - g_old
            ys = y @ s
            if ys > 0:  # always, in exact arithmetic: F is strictly convex
                self.pairs.append((s, y, u - u_old, 1.0 / ys))
        self.previous = (x, u, g)
        return project(x - lbfgs_direction(g, u, self.pairs))


# method -> (constructor, name of its setting, smallest setting, what the setting is)
METHODS = {
    "quasi-newton": (QuasiNewton, "m", 0, "Neumann terms of H_k"),
    "newton-cg": (NewtonCG, "N", 1, "CG iterations"),
    "newton-cg-y0-zero": (lambda N: NewtonCG(N, zero_start=True), "N", 1, "CG iterations"),
    "damped-newton-cg": (DampedNewtonCG, "N", 1, "CG iterations"),
    "l-bfgs": (LBFGS, "M", 1, "stored pairs"),
}


def make_solver(method, setting):
    """A fresh solver for ``method`` (a key of :data:`METHODS`) and its integer setting."""
    check_param("method", method, method in METHODS, f"one of {sorted(METHODS)}")
    build, name, smallest, meaning = METHODS[method]
    check_param("setting", setting, is_int(setting) and setting >= smallest,
                f"an integer {name} >= {smallest} ({meaning}) for method {method!r}")
    return build(int(setting))


def check_stopping(eps, max_iter):
    """Validates the stopping rule of :func:`solve` (ValueError if bad)."""
    check_param("eps", eps, isinstance(eps, numbers.Real) and eps > 0, "a number > 0")
    check_param("max_iter", max_iter, is_int(max_iter) and max_iter >= 1, "an integer >= 1")


@dataclass
class SolveResult:
    """The outcome of :func:`solve`.

    Attributes:
        iterations: k at the stop (the number of steps taken).
        converged: whether ``|F(x_k) - F(0)| < eps`` at the stop.
        matvecs: products with A, the stopping tests' included.
        history: ``|F(x_j) - F(0)|`` for j = 0..k.
        x: the last iterate x_k.
    """

    iterations: int
    converged: bool
    matvecs: int
    history: list = field(repr=False)
    x: np.ndarray = field(repr=False)


def drive(generator, op):
    """Runs a generator of this module to its end, answering each yielded ``v`` with ``op @ v``.

    For example ``drive(QuasiNewton(1).step(x, A @ x), A)`` is one quasi-Newton step.

    Returns:
        The generator's return value.
    """
    try:
        v = next(generator)
        while True:
            v = generator.send(op @ v)
    except StopIteration as stop:
        return stop.value


def iterate(solver, x0, eps, max_iter):
    """The outer loop of :func:`solve` as a generator: x0, x1, ... until the stopping test.

    Yields x0 first (for ``A x0``), then whatever ``solver.step`` yields, then x_{k+1}: the
    product ``A x_{k+1}`` serves both the stopping test and the next step.

    Returns:
        ``(history, x_k)``, history being ``|F(x_j) - F(0)|`` for j = 0..k.
    """
    x = x0
    z = yield x
    history = [abs(objective_from(x, z))]
    while history[-1] >= eps and len(history) <= max_iter:
        x = yield from solver.step(x, z)
        z = yield x  # for the stopping test and for the next step
        history.append(abs(objective_from(x, z)))
    return history, x


def solve_lockstep(A, x0, settings, eps=1e-20, max_iter=1000):
    """Runs each (method, setting) from x0 as :func:`solve` does, all together in lock-step.

    Each round computes, in one :meth:`SymmetricOperator.products` call, the one product
    with A that every unfinished setting is waiting for (see the module docstring).

    Args:
        A: the symmetric matrix of problem (3), or a :class:`SymmetricOperator` for it (whose
            counters then show the products and the passes over A).
        x0: the initial point (it need not be >= 0).
        settings: (method, setting) pairs, e.g. ``[("newton-cg", 3), ("quasi-newton", 0)]``.
        eps: the tolerance, > 0.
        max_iter: the cap on k, >= 1.

    Returns:
        A list of :class:`SolveResult`, one per setting, in order.
    """
    settings = list(settings)
    check_param("settings", settings, len(settings) > 0, "a non-empty list of (method, setting)")
    solvers = [make_solver(method, setting) for method, setting in settings]
    check_stopping(eps, max_iter)
    op = A if isinstance(A, SymmetricOperator) else SymmetricOperator(A)
    x = np.asarray(x0, dtype=np.float64)
    check_param("x0.shape", x.shape, x.shape == (len(op.matrix),), f"({len(op.matrix)},)")
    runs = [iterate(solver, x, eps, max_iter) for solver in solvers]
    waiting = {i: next(run) for i, run in enumerate(runs)}  # setting -> v it needs A v for
    matvecs = [0] * len(runs)
    results = [None] * len(runs)
    while waiting:
        for i, Av in zip(list(waiting), op.products(list(waiting.values())), strict=True):
            matvecs[i] += 1
            try:
                waiting[i] = runs[i].send(Av)
            except StopIteration as stop:
                history, x_last = stop.value
                results[i] = SolveResult(len(history) - 1, history[-1] < eps, matvecs[i],
                                         history, x_last)
                del waiting[i]
    return results


def solve(A, x0, method, setting, eps=1e-20, max_iter=1000):
    """Runs a solver from x0 until ``|F(x_k) - F(0)| < eps`` (F(0) = 0) or k = max_iter.

    One product with A at a time (BLAS ``dsymv``).

    Args:
        A: the symmetric matrix of problem (3).
        x0: the initial point (it need not be >= 0).
        method: a key of :data:`METHODS`.
        setting: the method's integer setting (m, N or M).
        eps: the tolerance, > 0.
        max_iter: the cap on k, >= 1.

    Returns:
        A :class:`SolveResult`.
    """
    return solve_lockstep(A, x0, [(method, setting)], eps=eps, max_iter=max_iter)[0]
