"""Newton design solvers (keras_newton.design), checked on small problems with known answers."""

import argparse
import json
import re

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from keras_newton.design import cli as design_cli
from keras_newton.design.experiment import (
    PAPER_SETTINGS,
    PAPER_TABLE2,
    format_table,
    run_table2,
    save_json,
)
from keras_newton.design.problem import (
    BATCH_MIN,
    SymmetricOperator,
    gradient,
    hessian_vector,
    objective,
    random_problem,
)
from keras_newton.design.solvers import (
    METHODS,
    QuasiNewton,
    drive,
    exact_line_search,
    lbfgs_direction,
    make_solver,
    newton_cg_direction,
    solve,
    solve_lockstep,
)


def well_conditioned(n, rng, gamma=0.9):
    """A = V diag(lambda) V^T with eigenvalues evenly in [0.2, 1] * gamma, and an x0."""
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (V * (gamma * np.linspace(0.2, 1.0, n))) @ V.T
    return 0.5 * (A + A.T), rng.standard_normal(n)


def U_and_r(A, x):
    """U = I - Diag[ReLU'(Ax)] A and r = ReLU(Ax) - x, as dense arrays."""
    z = A @ x
    return np.eye(len(x)) - (z > 0)[:, None] * A, np.maximum(z, 0) - x


# --- problem (3) ---------------------------------------------------------------------------


def test_objective_is_nonnegative_with_minimum_zero_at_origin(rng):
    A, _ = random_problem(20, 0.99, rng)
    assert objective(A, np.zeros(20)) == 0.0
    for _ in range(20):
        assert objective(A, rng.standard_normal(20)) > 0.0


def test_gradient_matches_finite_differences(rng):
    A, x = random_problem(7, 0.9, rng)
    h = 1e-6
    fd = [(objective(A, x + h * e) - objective(A, x - h * e)) / (2 * h) for e in np.eye(7)]
    np.testing.assert_allclose(gradient(A, x), fd, rtol=1e-6, atol=1e-8)


def test_hessian_vector_matches_finite_differences_of_the_gradient(rng):
    A, x = random_problem(7, 0.9, rng)
    v = rng.standard_normal(7)
    h = 1e-7
    # the gradient is piecewise linear: no sign of Ax may change within x +- h v
    assert np.min(np.abs(A @ x)) > 100 * h * np.max(np.abs(A @ v))
    fd = (gradient(A, x + h * v) - gradient(A, x - h * v)) / (2 * h)
    np.testing.assert_allclose(hessian_vector(A, x, v), fd, rtol=1e-6, atol=1e-9)
    # and eq. (6) as a dense matrix
    H = A - A @ np.diag((A @ x > 0).astype(float)) @ A
    np.testing.assert_allclose(hessian_vector(A, x, v), H @ v, rtol=1e-12, atol=1e-14)


def test_symmetric_operator_matches_matmul_and_counts(rng):
    A, x = random_problem(9, 0.5, rng)
    op = SymmetricOperator(A)
    np.testing.assert_allclose(op @ x, A @ x, rtol=1e-13, atol=1e-15)
    op @ x
    assert op.matvecs == 2 and op.passes == 2


@pytest.mark.parametrize("k", [1, BATCH_MIN - 1, BATCH_MIN, 2 * BATCH_MIN])
def test_symmetric_operator_products_in_one_pass_when_batched(rng, k):
    A, _ = random_problem(30, 0.5, rng)
    vectors = list(rng.standard_normal((k, 30)))
    op = SymmetricOperator(A)
    products = op.products(vectors)
    assert len(products) == k
    for v, Av in zip(vectors, products, strict=True):
        np.testing.assert_allclose(Av, A @ v, rtol=1e-12, atol=1e-14)
    assert op.matvecs == k
    assert op.passes == (1 if k >= BATCH_MIN else k)


@pytest.mark.parametrize("n", [50, 300])  # dense eigenvalues, and Lanczos
def test_random_problem_is_symmetric_with_norm_gamma(n):
    A, x0 = random_problem(n, 0.9999, np.random.default_rng(7))
    assert A.shape == (n, n) and x0.shape == (n,)
    assert np.array_equal(A, A.T)
    assert np.linalg.norm(A, 2) == pytest.approx(0.9999, rel=1e-10)
    assert np.linalg.eigvalsh(A)[0] > 0
    A2, x2 = random_problem(n, 0.9999, np.random.default_rng(7))
    assert np.array_equal(A, A2) and np.array_equal(x0, x2)


# --- the solvers -------------------------------------------------------------------------


@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_quasi_newton_step_is_relu_of_DA_to_the_m_plus_1(rng, m):
    # x + sum_{n<=m} (DA)^n (DAx - x) telescopes to (DA)^{m+1} x; m = 0 is ReLU(Ax), eq. (16)
    A, x = random_problem(12, 0.9, rng)
    z = A @ x
    DA = (z > 0)[:, None] * A
    expected = np.maximum(np.linalg.matrix_power(DA, m + 1) @ x, 0)
    step = drive(QuasiNewton(m).step(x, z), SymmetricOperator(A))
    np.testing.assert_allclose(step, expected, rtol=1e-12, atol=1e-13)
    if m == 0:
        np.testing.assert_allclose(step, np.maximum(A @ x, 0), rtol=1e-14)


@pytest.mark.parametrize("zero_start", [False, True])
@pytest.mark.parametrize("N", [1, 2, 3, 5])
def test_newton_cg_direction_is_algorithm_1_as_written(rng, N, zero_start):
    A, x = random_problem(15, 0.99, rng)
    U, r = U_and_r(A, x)
    Q, b = U.T @ U, U.T @ r
    y = np.zeros(15) if zero_start else x.copy()  # line 1
    g = Q @ y - b  # line 2
    d = -g
    for _ in range(N):
        alpha = -(g @ d) / (d @ Q @ d)
        y = y + alpha * d
        g = Q @ y - b  # recomputed, not by recurrence
        beta = (g @ Q @ d) / (d @ Q @ d)
        d = -g + beta * d
    got = drive(newton_cg_direction(x, A @ x, N, zero_start=zero_start), SymmetricOperator(A))
    np.testing.assert_allclose(got, y, rtol=1e-8, atol=1e-10 * np.abs(y).max())


def test_newton_cg_with_N_equal_n_is_exact_newton(rng):
    n = 8
    A, x = well_conditioned(n, rng)
    U, r = U_and_r(A, x)
    newton = np.linalg.solve(U, r)  # eq. (10)-(11) by a direct solve
    y = drive(newton_cg_direction(x, A @ x, N=n), A)
    np.testing.assert_allclose(y, newton, rtol=1e-8, atol=1e-10)
    # F is positively homogeneous of degree 2, so r = -U x and the Newton point is 0:
    np.testing.assert_allclose(newton, -x, rtol=1e-10, atol=1e-12)
    result = solve(A, x, "newton-cg", n)
    assert result.converged and result.iterations == 1


def test_zero_start_is_the_paper_iteration_scaled_by_half_each_step(rng):
    # CG is scale-invariant and U^{-1} r = -x_k: y_0 = 0 halves the CG error of y_0 = x_k,
    # and every map is positively homogeneous, so x_k(y_0 = 0) = 2^{-k} x_k(y_0 = x_k).
    A, x0 = well_conditioned(20, rng)
    paper = solve(A, x0, "newton-cg", 2, eps=1e-300, max_iter=6)
    zero = solve(A, x0, "newton-cg-y0-zero", 2, eps=1e-300, max_iter=6)
    k = np.arange(7)
    np.testing.assert_allclose(zero.history, 4.0**-k * np.array(paper.history), rtol=1e-8)
    np.testing.assert_allclose(zero.x, paper.x / 64, rtol=1e-8, atol=1e-14)


def test_exact_line_search_matches_scalar_minimisation(rng):
    A, x = random_problem(30, 0.99, rng)
    for _ in range(5):
        p = rng.standard_normal(30)
        t = exact_line_search(p, A @ x, A @ p)
        best = minimize_scalar(lambda s, p=p: objective(A, x + s * p), bracket=(-5, 5),
                               options=dict(xtol=1e-12))
        assert t == pytest.approx(best.x, rel=1e-5, abs=1e-7)
        assert objective(A, x + t * p) <= best.fun * (1 + 1e-12) + 1e-15


def test_lbfgs_direction_matches_explicit_bfgs_updates(rng):
    n = 10
    A, _ = well_conditioned(n, rng)
    B = well_conditioned(n, rng)[0] + 0.5 * np.eye(n)  # SPD: y = B s gives y^T s > 0
    pairs = []
    for _ in range(3):
        s = rng.standard_normal(n)
        y = B @ s
        pairs.append((s, y, np.linalg.solve(A, y), 1.0 / (y @ s)))
    H = np.linalg.inv(A)  # H_0 = A^{-1}
    for s, y, _, rho in pairs:  # the BFGS update of the inverse Hessian, oldest first
        V = np.eye(n) - rho * np.outer(y, s)
        H = V.T @ H @ V + rho * np.outer(s, s)
    g = rng.standard_normal(n)
    h = lbfgs_direction(g, np.linalg.solve(A, g), pairs)
    np.testing.assert_allclose(h, H @ g, rtol=1e-9, atol=1e-12)
    s, y, y_inv, _ = pairs[-1]  # the secant equation H y = s
    np.testing.assert_allclose(lbfgs_direction(y, y_inv, pairs), s, rtol=1e-9, atol=1e-12)


# With the paper's y_0 = x_k, Newton-CG needs N >= 3 here (N = 1, 2 diverge, and damped
# Newton-CG stalls; see docs/newton_design.md); with y_0 = 0 any N converges.
ALL_SETTINGS = [("quasi-newton", 0), ("quasi-newton", 1), ("quasi-newton", 2),
                ("newton-cg", 3), ("newton-cg", 6), ("newton-cg-y0-zero", 1),
                ("newton-cg-y0-zero", 3), ("damped-newton-cg", 3), ("l-bfgs", 1), ("l-bfgs", 4)]


def test_every_method_is_tested():
    assert {m for m, _ in ALL_SETTINGS} == set(METHODS)


@pytest.mark.parametrize("method,setting", ALL_SETTINGS)
def test_each_solver_drives_F_to_its_minimum(rng, method, setting):
    A, x0 = well_conditioned(30, rng)
    result = solve(A, x0, method, setting, eps=1e-20, max_iter=300)
    assert result.converged
    assert objective(A, result.x) < 1e-20  # F(0) = 0 is the minimum
    assert np.linalg.norm(result.x) < 1e-8 * np.linalg.norm(x0)  # ... attained only at 0
    assert np.all(result.x >= 0)
    assert result.history[0] == pytest.approx(objective(A, x0))
    assert len(result.history) == result.iterations + 1
    assert all(f >= 1e-20 for f in result.history[:-1])


@pytest.mark.parametrize("method,setting,per_iteration", [
    ("quasi-newton", 2, 3),  # A x_k and m terms
    ("newton-cg", 3, 7),  # A x_k, g_0, and 2 per CG iteration but the last
    ("damped-newton-cg", 3, 8),  # ... and A p for the line search
    ("l-bfgs", 3, 2),  # A x_k and the gradient
])
def test_matvec_counts(rng, method, setting, per_iteration):
    A, x0 = random_problem(40, 0.99, rng)
    result = solve(A, x0, method, setting)
    assert result.matvecs == per_iteration * result.iterations + 1  # + the last A x_k


def test_lockstep_is_each_setting_on_its_own(rng):
    # ALL_SETTINGS has more than BATCH_MIN settings: the first rounds take one GEMM each
    A, x0 = well_conditioned(30, rng)
    op = SymmetricOperator(A)
    together = solve_lockstep(op, x0, ALL_SETTINGS, max_iter=300)
    for (method, setting), result in zip(ALL_SETTINGS, together, strict=True):
        alone = solve(A, x0, method, setting, max_iter=300)
        assert result.converged and result.iterations == alone.iterations
        assert result.matvecs == alone.matvecs
        np.testing.assert_allclose(result.history, alone.history, rtol=1e-6, atol=1e-30)
        np.testing.assert_allclose(result.x, alone.x, rtol=1e-6, atol=1e-30)
    # one round per product of the longest setting: a pass over A if batched, else one each
    counts = [r.matvecs for r in together]
    active = [sum(c > j for c in counts) for j in range(max(counts))]
    assert active[0] == len(ALL_SETTINGS) >= BATCH_MIN
    assert op.passes == sum(1 if k >= BATCH_MIN else k for k in active)
    assert op.matvecs == sum(counts)


def test_non_convergence_is_reported():
    # N = n: exact Newton, one iteration; PlainNet needs many more than 3
    table = run_table2(runs=3, n=30, settings=[("quasi-newton", 0), ("newton-cg", 30)],
                       max_iter=3)
    plain, newton = table.rows
    assert plain.converged == [False] * 3 and plain.iterations == [3] * 3
    assert plain.median_iterations == np.inf
    assert newton.converged == [True] * 3 and newton.median_iterations == 1
    text = format_table(table)
    assert ">3" in text and "0/3" in text and "3/3" in text


# --- the experiment and the command line ---------------------------------------------------


def test_run_table2_small(tmp_path):
    settings = [*PAPER_SETTINGS, ("l-bfgs", 2)]
    lines = []
    table = run_table2(runs=3, n=48, seed=5, settings=settings, max_iter=200,
                       progress=lines.append)
    assert len(lines) == 3
    assert [(r.method, r.setting) for r in table.rows] == settings
    for row in table.rows:
        assert len(row.iterations) == 3 and len(row.history) == row.iterations[0] + 1
        its = [k if ok else np.inf for k, ok in zip(row.iterations, row.converged, strict=True)]
        assert row.median_iterations == np.median(its)
        assert row.paper == PAPER_TABLE2.get((row.method, row.setting))
    assert all(table.rows[0].converged) and all(table.rows[-1].converged)
    # every setting of a run solves the same instance
    A, x0 = random_problem(48, 0.9999, np.random.default_rng([5, 1]))
    assert solve(A, x0, "newton-cg", 4).iterations == table.rows[4].iterations[1]
    text = format_table(table)
    assert "Paper" in text and "157" in text and "14.5" in text
    save_json(table, tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["passes"] == table.passes > 0  # lock-step: fewer than the products
    assert table.passes < sum(sum(row.matvecs) for row in table.rows)
    assert data["rows"][3]["setting"] == "N=3" and data["rows"][3]["paper"] == 157
    assert data["rows"][-1]["paper"] is None


def test_threads_give_the_same_table():
    """Two BLAS threads (no GEMM batching): the same iterations and products, in order."""
    settings = [("quasi-newton", 1), ("newton-cg", 4), ("l-bfgs", 2)]
    one = run_table2(runs=3, n=300, seed=2, settings=settings, max_iter=200)
    lines = []
    two = run_table2(runs=3, n=300, seed=2, settings=settings, max_iter=200, threads=2,
                     progress=lines.append)
    assert [line.split(":")[0] for line in lines] == ["run 1/3", "run 2/3", "run 3/3"]
    for a, b in zip(one.rows, two.rows, strict=True):
        assert (a.iterations, a.matvecs) == (b.iterations, b.matvecs)
        np.testing.assert_allclose(a.history, b.history, rtol=1e-6, atol=1e-30)
    assert two.passes == sum(sum(row.matvecs) for row in two.rows)


def test_instance_does_not_depend_on_blas_threads():
    from threadpoolctl import threadpool_limits

    instances = []
    for threads in (1, 2):
        with threadpool_limits(limits=threads, user_api="blas"):
            instances.append(random_problem(512, 0.9, np.random.default_rng(7)))
    (A1, x1), (A2, x2) = instances
    assert np.array_equal(A1, A2) and np.array_equal(x1, x2)
    assert abs(np.linalg.eigvalsh(A1)[-1] - 0.9) < 1e-12


@pytest.mark.parametrize("threads", [0, 1.5, None])
def test_bad_threads(threads):
    with raises("threads", threads):
        run_table2(runs=1, n=8, threads=threads)


def parse_cli(argv):
    parser = argparse.ArgumentParser()
    design_cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_runs_and_writes_files(tmp_path, capsys):
    json_path, png_path = tmp_path / "t.json", tmp_path / "t.png"
    args = parse_cli(["--runs", "2", "--n", "32", "--paper-only", "--json", str(json_path),
                      "--plot", str(png_path)])
    assert design_cli.run(args) == 0
    out, err = capsys.readouterr()
    assert "Median it." in out and "newton-cg" in out and "damped" not in out
    assert err.count("run ") == 2
    assert json.loads(json_path.read_text())["config"]["n"] == 32
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad input ---------------------------------------------------------------------------


def raises(name, value):
    """pytest.raises for a ValueError whose message ends with 'Received: name=value'."""
    return pytest.raises(ValueError, match=re.escape(f"Received: {name}={value!r}") + "$")


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(n):
    with raises("n", n) as info:
        random_problem(n, 0.5)
    assert "`n` must be an integer >= 1" in str(info.value)
    with raises("n", n):
        run_table2(n=n)


@pytest.mark.parametrize("gamma", [0, 0.0, 1, 1.0, 1.5, -0.2, float("nan")])
def test_bad_gamma(gamma):
    with raises("gamma", gamma) as info:
        random_problem(4, gamma)
    assert "open interval (0, 1)" in str(info.value)
    with raises("gamma", gamma):
        run_table2(gamma=gamma)


@pytest.mark.parametrize("runs", [0, -1, 1.5])
def test_bad_runs(runs):
    with raises("runs", runs) as info:
        run_table2(runs=runs)
    assert "`runs` must be an integer >= 1" in str(info.value)


@pytest.mark.parametrize("method", ["newton", "Newton-CG", "bfgs", None])
def test_unknown_method(method):
    with raises("method", method) as info:
        make_solver(method, 3)
    assert all(name in str(info.value) for name in METHODS)
    with raises("method", method):
        run_table2(settings=[(method, 3)])


@pytest.mark.parametrize("method,setting", [
    ("quasi-newton", -1), ("quasi-newton", 1.0), ("newton-cg", 0), ("newton-cg", "4"),
    ("damped-newton-cg", 0), ("newton-cg-y0-zero", -2), ("l-bfgs", 0),
])
def test_bad_setting(method, setting):
    with raises("setting", setting) as info:
        make_solver(method, setting)
    assert method in str(info.value) and "integer" in str(info.value)
    with raises("setting", setting):
        run_table2(settings=[(method, setting)])


def test_bad_stopping_rule_and_seed():
    A, x0 = random_problem(5, 0.5, np.random.default_rng(0))
    with raises("eps", 0.0):
        solve(A, x0, "newton-cg", 2, eps=0.0)
    with raises("max_iter", 0):
        solve(A, x0, "newton-cg", 2, max_iter=0)
    with raises("settings", []):
        solve_lockstep(A, x0, [])
    with raises("seed", -1):
        run_table2(seed=-1)


@pytest.mark.parametrize("argv,name,value", [
    (["--runs", "0"], "runs", 0),
    (["--n", "0"], "n", 0),
    (["--gamma", "1"], "gamma", 1.0),
    (["--gamma", "0"], "gamma", 0.0),
    (["--json", "/no/such/folder/t.json"], "json", "/no/such/folder/t.json"),
])
def test_cli_bad_input(argv, name, value):
    with raises(name, value):
        design_cli.run(parse_cli(argv))
