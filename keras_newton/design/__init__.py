"""Newton design, Section 3 of the paper: the solvers behind PlainNet, ResNet and Newton-CGNet.

Problem (3), ``min_{x >= 0} F(x) = 1/2 x^T A x - 1^T P(Ax)`` with ``P' = ReLU``, is solved by
members of the Newton family; unrolling one iteration ``x_k -> x_{k+1}`` and making its
matrices learnable gives a network block. NumPy/SciPy only (float64), no Keras.
``D = Diag[ReLU'(A x_k)]`` is the 0/1 mask that Newton-CGNet implements as dropout.

Solver (``solvers.py``) -> iteration -> the block it unrolls into:

- ``QuasiNewton(m=0)``: eq. (16), ``x_{k+1} = ReLU(A x_k)`` -> PlainNet, eq. (1)/(2): one
  convolution and a ReLU.
- ``QuasiNewton(m>=1)``: eq. (15)/(8), ``x_{k+1} = ReLU[(I - H_k A) x_k + H_k A ReLU(A x_k)]``
  with ``H_k A = sum_{n=0}^{m} (D A)^n`` -> ResNet block, eq. (9),
  ``ReLU[W_s x + W_1 ReLU(W_2 x)]`` (W_s, W_1, W_2 learnable in place of I - H_k A, H_k A, A).
- ``NewtonCG(N)``: eq. (10) with Algorithm 1 (N CG iterations on U y = r, y_0 = x_k),
  ``x_{k+1} = ReLU(x_k + y_N)`` -> Newton-CG block, Algorithm 2: N CG blocks, each computing
  ``Q y_t`` of eq. (17) with four convolutions, alpha_t and beta_t learnable scalars.

Beyond the paper (its conclusion names damped Newton and BFGS-type updates as future work):

- ``NewtonCG(N, zero_start=True)``: y_0 = 0 -> Algorithm 2 with y_0 = 0 (line 1).
- ``DampedNewtonCG(N)``: ``x_{k+1} = ReLU(x_k + t_k y_N)``, t_k by exact line search ->
  a Newton-CG block with one more scalar, the step t_k, before the final ReLU.
- ``LBFGS(M)``: eq. (15) with the L-BFGS update of H_0 = A^{-1} -> a block that also takes
  the last M blocks' inputs and outputs (dense connections); not unrolled here.

Modules: ``problem`` (F, gradient (4), Hessian-vector product (6), projection, random
instances, the products with A), ``solvers`` (the solvers, ``solve``, and ``solve_lockstep``,
which advances several settings on one instance together, batching their products with A),
``experiment`` (Section 3.3, Table 2, JSON, plot), ``cli`` (``keras-newton table2``).
Measured results: docs/newton_design.md.
"""
