"""Problem (3) of the paper and the random instances of its Section 3.3.

    F(x) = 1/2 x^T A x - 1^T P(A x),   P' = ReLU, i.e. P(z) = 1/2 max(z, 0)^2,

minimised over x >= 0. For symmetric A with 0 < A and ||A||_2 < 1, F is convex,
F >= 0 and F(0) = 0 is the minimum.

Notation used throughout the package: ``z = A x`` and ``D = Diag[ReLU'(A x)]``, the 0/1
mask of the positive entries of ``z`` (with ReLU'(0) = 0, so ``D z = ReLU(z)`` exactly).
"""

import numbers

import numpy as np
from scipy.linalg import blas
from scipy.sparse.linalg import LinearOperator, eigsh
from threadpoolctl import threadpool_limits


def check_param(name, value, ok, allowed):
    """Raises ``ValueError`` for bad user input, naming the parameter and what is allowed.

    Args:
        name: the parameter's name.
        value: the value received.
        ok: whether ``value`` is acceptable.
        allowed: the allowed values, in words (completes "`name` must be ...").
    """
    if not ok:
        raise ValueError(f"`{name}` must be {allowed}. Received: {name}={value!r}")


def is_int(value):
    """True for integers (including NumPy's), False for bools and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def relu(z):
    """ReLU, the paper's activation Phi = P'."""
    return np.maximum(z, 0.0)


def project(x):
    """Projection P_C onto C = {x : x >= 0} (which for this set is ReLU)."""
    return np.maximum(x, 0.0)


def objective_from(x, z):
    """F(x) of eq. (3) given ``z = A x`` (no matrix product)."""
    rz = relu(z)
    return 0.5 * float(x @ z) - 0.5 * float(rz @ rz)


def objective(A, x):
    """F(x) = 1/2 x^T A x - 1^T P(Ax), eq. (3)."""
    return objective_from(x, A @ x)


def gradient(A, x):
    """Gradient of F, eq. (4): A [x - ReLU(A x)]."""
    return A @ (x - relu(A @ x))


def hessian_vector(A, x, v):
    """Hessian-vector product, eq. (6): A v - A Diag[ReLU'(A x)] A v."""
    Av = A @ v
    return Av - A @ np.where(A @ x > 0, Av, 0.0)


# Products with A that one GEMM computes at once, at least: below this, one dsymv each. OpenBLAS
# packs all of A (32 MB at n = 2048) for every GEMM, so on the 2-core development machine
# ``V^T A`` costs 4-5.5 ms for 2-8 vectors against 0.7-0.8 ms for one dsymv (one BLAS
# thread, CPU time; docs/newton_design.md, "Speed").
BATCH_MIN = 7


class SymmetricOperator:
    """The products ``v -> A v`` for a symmetric ``A``, counting them.

    One vector: BLAS ``dsymv``, which reads one triangle of ``A`` (so ``A`` must be
    symmetric): half the memory traffic of ``A @ v``, and the products are memory-bound at
    n = 2048. Several vectors at once (:meth:`products`): one GEMM pass over ``A`` for
    ``batch_min`` or more of them, else dsymv for each.

    Args:
        matrix: the symmetric matrix.
        batch_min: the fewest vectors one GEMM computes (:data:`BATCH_MIN`, measured with
            one BLAS thread); None: never (with two BLAS threads dsymv is faster for up to 8).

    Attributes:
        matrix: ``A`` as a float64 array.
        matvecs: the number of products computed so far.
        passes: the number of BLAS calls (passes over ``A``) they took.
    """

    def __init__(self, matrix, batch_min=BATCH_MIN):
        A = np.asarray(matrix, dtype=np.float64)
        check_param("matrix.shape", A.shape, A.ndim == 2 and A.shape[0] == A.shape[1],
                    "square (n, n)")
        self.matrix = A
        self.batch_min = batch_min
        # A is symmetric, so its transpose is A itself: a Fortran-ordered view, no copy.
        self._fortran = A.T if A.flags.c_contiguous else np.asfortranarray(A)
        self.matvecs = 0
        self.passes = 0

    def __matmul__(self, v):
        self.matvecs += 1
        self.passes += 1
        return blas.dsymv(1.0, self._fortran, v)

    def products(self, vectors):
        """``[A v for v in vectors]``, in one pass over ``A`` if there are enough vectors."""
        if self.batch_min is None or len(vectors) < self.batch_min:
            return [self @ v for v in vectors]
        self.matvecs += len(vectors)
        self.passes += 1
        return list(np.stack(vectors) @ self.matrix)  # row i: v_i^T A = (A v_i)^T


def check_instance(n, gamma):
    """Validates the size and the norm of a random instance (ValueError if bad)."""
    check_param("n", n, is_int(n) and n >= 1, "an integer >= 1")
    check_param("gamma", gamma, isinstance(gamma, numbers.Real) and 0 < gamma < 1,
                "a number in the open interval (0, 1)")


def random_problem(n, gamma=0.9999, rng=None):
    """A random instance of Section 3.3.

    ``A = gamma * C^T C / ||C^T C||_2`` and ``x_0``, with C and x_0 i.i.d. N(0, 1).

    Args:
        n: the dimension, >= 1.
        gamma: ||A||_2, in the open interval (0, 1).
        rng: a ``numpy.random.Generator`` (or a seed for one).

    Returns:
        ``(A, x0)``: an exactly symmetric float64 array of shape (n, n), and x_0 of shape (n,).
    """
    check_instance(n, gamma)
    rng = np.random.default_rng(rng)
    C = rng.standard_normal((n, n))
    x0 = rng.standard_normal(n)
    gram = C.T @ C  # NumPy computes this with syrk: exactly symmetric
    if n >= 200:
        # Lanczos (ARPACK); a fixed start vector keeps the instance reproducible.
        # One BLAS thread: a threaded dsymv rounds differently, and the instance must not
        # depend on the thread count (syrk above gives the same bits with any).
        op = LinearOperator((n, n), matvec=SymmetricOperator(gram).__matmul__, dtype=np.float64)
        with threadpool_limits(limits=1, user_api="blas"):
            top = eigsh(op, k=1, which="LA", v0=np.ones(n), return_eigenvectors=False)[0]
    else:
        top = np.linalg.eigvalsh(gram)[-1]
    gram *= gamma / top
    return gram, x0
