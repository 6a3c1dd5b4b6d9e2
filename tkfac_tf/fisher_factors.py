"""Batch statistics of the Kronecker factors, running averages, damped inverses.

Conventions: ``a`` is [M, d_a], one row per sample (an example, or an
(example, location) pair for layers applied at several positions), with the
homogeneous 1 appended when the layer has a bias. ``gs`` is [K, M, d_g]: the
pre-activation gradients of the same samples for K backward vectors (K = 1
for sampled / empirical Fisher, K = number of outcomes for 'exact').
``num_examples`` is N, the number of examples in the batch; sums over
samples are divided by N, so a layer applied at T positions per example
accumulates over its positions (spatially-uncorrelated assumption).
"""

import contextlib
import threading

import numpy as np
import tensorflow as tf

# Input dtypes of the large products (factor statistics, preconditioning).
MATMUL_DTYPES = ("float32", "bfloat16")


def product(equation, x, y, matmul_dtype=tf.float32):
    """``tf.einsum(equation, x, y)`` as float32, with x and y cast to
    ``matmul_dtype`` first. bfloat16 halves the inputs' size and, on CPUs
    with AVX512_BF16 (with oneDNN) or on GPUs / TPUs, runs about 1.5–2×
    faster; the result carries bfloat16's 8-bit mantissa (relative error
    ≤ 2⁻⁸ per entry) before it is cast back."""
    if tf.as_dtype(matmul_dtype) == tf.float32:
        return tf.einsum(equation, tf.cast(x, tf.float32), tf.cast(y, tf.float32))
    return tf.cast(tf.einsum(equation, tf.cast(x, matmul_dtype), tf.cast(y, matmul_dtype)), tf.float32)


def sample_gram(x, y, matmul_dtype=tf.float32, batch_dims=0):
    """Σ_s x_s y_sᵀ over the sample axes: x [B..., S..., d], y [B..., S..., e]
    -> [B..., d, e] (B: the first ``batch_dims`` axes), float32, as one
    ``tf.matmul`` with x transposed in ``matmul_dtype`` (see ``product``); on
    CPU 5–35 % faster than the equivalent einsum, most at small d."""
    def samples_by_rows(t):  # [B..., S, d]: several sample axes merged (static B and d)
        t = tf.cast(t, matmul_dtype)
        return t if t.shape.rank == batch_dims + 2 else tf.reshape(t, [*t.shape[:batch_dims], -1, t.shape[-1]])

    return tf.cast(tf.matmul(samples_by_rows(x), samples_by_rows(y), transpose_a=True), tf.float32)


def squared_norms(x):
    """‖x_s‖² over the last axis, x [..., d] -> [...]: one pass of TensorFlow's
    Euclidean-norm reduction, squared (about twice as fast on CPU as summing
    a squared copy of x); under XLA, which has no such kernel and fuses the
    square into the sum, Σ x²."""
    if in_xla_context():
        return tf.reduce_sum(tf.square(x), axis=-1)
    return tf.square(tf.math.reduce_euclidean_norm(x, axis=-1))


def tkfac_sums(a, gs, matmul_dtype=tf.float32):
    """TKFAC sums of one batch, additive over examples (so replicas can add
    theirs): every (k, m) pair is one sample,
      δ_sum = Σ_{k,m} ‖a_m‖² ‖g_{k,m}‖²,
      Φ_sum = Σ_{k,m} ‖g_{k,m}‖² a_m a_mᵀ,
      Ψ_sum = Σ_{k,m} ‖a_m‖² g_{k,m} g_{k,m}ᵀ.

    The two matrix sums are ``sample_gram``s in ``matmul_dtype``.

    Returns:
      (δ_sum [], Φ_sum [d_a, d_a], Ψ_sum [d_g, d_g]), float32.
    """
    a = tf.cast(a, tf.float32)
    gs = tf.cast(gs, tf.float32)
    a_sq = squared_norms(a)  # [M]
    g_sq = squared_norms(gs)  # [K, M]
    g_sq_per_sample = tf.reduce_sum(g_sq, axis=0)  # [M]
    delta_sum = tf.reduce_sum(a_sq * g_sq_per_sample)
    phi_sum = sample_gram(a * g_sq_per_sample[:, None], a, matmul_dtype)
    psi_sum = sample_gram(gs * a_sq[None, :, None], gs, matmul_dtype)
    return delta_sum, phi_sum, psi_sum


def tkfac_from_sums(delta_sum, phi_sum, psi_sum, num_examples):
    """TKFAC statistics (Gao et al. 2021, Eq. 4.9) from the sums of
    ``tkfac_sums`` over N = ``num_examples`` examples:
      δ = δ_sum / N  (= tr of the Fisher block),  Φ = Φ_sum / δ_sum,
      Ψ = Ψ_sum / δ_sum  (tr Φ = tr Ψ = 1).

    Returns:
      (delta [], phi [d_a, d_a], psi [d_g, d_g]), float32. If δ = 0 (all
      gradients zero, or no examples) everything is zero.
    """
    delta = tf.math.divide_no_nan(delta_sum, tf.cast(num_examples, tf.float32))
    return (
        delta,
        tf.math.divide_no_nan(phi_sum, delta_sum),
        tf.math.divide_no_nan(psi_sum, delta_sum),
    )


def kfac_sums(a, gs, matmul_dtype=tf.float32):
    """K-FAC sums of one batch, additive over examples:
      A_sum = Σ_m a_m a_mᵀ,  G_sum = Σ_{k,m} g_{k,m} g_{k,m}ᵀ,  M (samples),
    the matrix sums as ``sample_gram``s in ``matmul_dtype``.

    Returns:
      (A_sum [d_a, d_a], G_sum [d_g, d_g], M []), float32.
    """
    return (
        sample_gram(a, a, matmul_dtype),
        sample_gram(gs, gs, matmul_dtype),
        tf.cast(tf.shape(a)[0], tf.float32),
    )


def kfac_from_sums(a_sum, g_sum, num_samples, num_examples):
    """K-FAC / KFC statistics (Martens & Grosse 2015; Grosse & Martens 2016
    for layers applied at T = M / N positions per example) from the sums of
    ``kfac_sums`` over N examples, M samples:
      A = A_sum / N,   G = G_sum / M,
    so that A ⊗ G ≈ E_i[Σ_t (a aᵀ) ⊗ (g gᵀ)].

    Returns:
      (A [d_a, d_a], G [d_g, d_g]), float32 (zero without examples).
    """
    return (
        tf.math.divide_no_nan(a_sum, tf.cast(num_examples, tf.float32)),
        tf.math.divide_no_nan(g_sum, num_samples),
    )


def update_running_averages(variables, values, decay, first):
    """variable ← value on the first update, else decay·variable +
    (1−decay)·value, for every pair (one decay and weight for all)."""
    decay = tf.where(first, 0.0, tf.cast(decay, tf.float32))
    weight = 1.0 - decay
    for variable, value in zip(variables, values):
        variable.assign(decay * variable + weight * value)


INVERSE_METHODS = ("cholesky", "eigh", "newton_schulz")
"""Ways ``damped_inverse`` inverts a damped factor (docs/performance.md, "Inverses")."""

NEWTON_SCHULZ_ITERATIONS = 2
"""Newton–Schulz steps k from the warm start (each squares the residual)."""

NEWTON_SCHULZ_TOLERANCE = 1e-3
"""Largest accepted ``newton_schulz_bound`` on the result's relative error;
a worse warm start falls back to Cholesky."""


def assign_if_finite(variable, value) -> None:
    """variable ← value if every element of value is finite, else unchanged:
    an inverse that overflowed (λ far too small for its factor) never
    replaces the last finite one."""
    value = tf.convert_to_tensor(value)
    finite = tf.reduce_all(tf.math.is_finite(value))
    variable.assign(tf.where(finite, tf.cast(value, variable.dtype), variable))


def in_xla_context():
    """Whether the op being built is compiled by XLA (inside a
    ``tf.function(jit_compile=True)``, e.g. Keras' ``jit_compile=True``)."""
    try:
        from tensorflow.python.ops import control_flow_util  # private; no public equivalent

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # pragma: no cover - a TF without the helper
        return False


def _batch_shape(matrix):
    """The batch shape of [..., d, d] matrices: a static list where known
    (fewer ops to trace than the dynamic shape), else a tensor."""
    shape = matrix.shape[:-2]
    return shape.as_list() if shape.is_fully_defined() else tf.shape(matrix)[:-2]


def _symmetrized(matrix):
    return 0.5 * (matrix + tf.linalg.matrix_transpose(matrix))


INVERSE_LEAF = 256
"""Largest diagonal block ``lower_inverse_and_gram`` inverts by one
triangular solve and squares by one dense product."""


def _diagonal_halves(matrix, half):
    """The blocks (M₁₁, M₂₁, M₂₂) of [..., n, n] M = [[M₁₁, M₁₂], [M₂₁, M₂₂]]
    split at row and column ``half``: three splits (fewer graph nodes than
    slices)."""
    sizes = [half, matrix.shape[-1] - half]
    top, bottom = tf.split(matrix, sizes, axis=-2)
    top_left = tf.split(top, sizes, axis=-1)[0]
    bottom_left, bottom_right = tf.split(bottom, sizes, axis=-1)
    return top_left, bottom_left, bottom_right


def lower_inverse_and_gram(lower, with_inverse=True):
    """(M, MᵀM) with M = L⁻¹ of lower-triangular L [..., n, n] (n static),
    by the blocked recursions of LAPACK trtri and lauum in one: with
    L = [[L₁₁, 0], [L₂₁, L₂₂]],

        M = [[M₁₁, 0], [M₂₁, M₂₂]],  M₁₁ = L₁₁⁻¹,  M₂₂ = L₂₂⁻¹,  M₂₁ = −M₂₂ L₂₁ M₁₁,
        MᵀM = [[M₁₁ᵀM₁₁ + M₂₁ᵀM₂₁, M₂₁ᵀM₂₂], [M₂₂ᵀM₂₁, M₂₂ᵀM₂₂]],

    down to diagonal blocks of at most ``INVERSE_LEAF`` rows (one
    ``triangular_solve``, one product): everything else is matrix products,
    which run several times faster per FLOP than TensorFlow's triangular
    solve on CPU, and MᵀM takes ≈ 2n³/3 FLOPs against a dense product's
    2n³. M is None unless ``with_inverse`` (only the recursion needs it)."""
    n = lower.shape[-1]
    if n <= INVERSE_LEAF:  # the identity broadcast over the batch: one constant node
        identity = tf.constant(np.eye(n, dtype=lower.dtype.as_numpy_dtype))
        inverse = tf.linalg.triangular_solve(lower, identity, lower=True)
        return inverse, tf.matmul(inverse, inverse, transpose_a=True)
    half = n // 2
    lower_11, lower_21, lower_22 = _diagonal_halves(lower, half)
    inverse_11, gram_11 = lower_inverse_and_gram(lower_11)
    inverse_22, gram_22 = lower_inverse_and_gram(lower_22)
    inverse_21 = -tf.matmul(inverse_22, tf.matmul(lower_21, inverse_11))
    top_right = tf.matmul(inverse_21, inverse_22, transpose_a=True)
    gram = tf.concat([
        tf.concat([gram_11 + tf.matmul(inverse_21, inverse_21, transpose_a=True), top_right], axis=-1),
        tf.concat([tf.linalg.matrix_transpose(top_right), gram_22], axis=-1),
    ], axis=-2)
    if not with_inverse:
        return None, gram
    padding = [[0, 0]] * (lower.shape.rank - 1) + [[0, n - half]]
    inverse = tf.concat([tf.pad(inverse_11, padding), tf.concat([inverse_21, inverse_22], axis=-1)], axis=-2)
    return inverse, gram


def _cholesky_inverse(damped, identity):
    """D⁻¹ = L⁻ᵀ L⁻¹ with D = L Lᵀ (LAPACK potri's formula, by
    ``lower_inverse_and_gram``); 1.4–1.9× faster than
    ``cholesky_solve(L, I)`` at d = 1000–2000 on CPU (about equal at d ≤ 500),
    same accuracy. Shapes not known statically use ``cholesky_solve``."""
    lower = tf.linalg.cholesky(damped)
    if damped.shape[-1] is None:
        return _symmetrized(tf.linalg.cholesky_solve(lower, identity))
    return _symmetrized(lower_inverse_and_gram(lower, with_inverse=False)[1])


def eigenpairs(matrix):
    """(V [..., d, d], max(e, 0) [..., d]) with sym(matrix) = V diag(e) Vᵀ
    (negative round-off eigenvalues clamped): a PSD factor in the form whose
    damped inverse V diag(1 / (e + s)) Vᵀ is cheap for any shift s. A
    matrix with a non-finite entry gets NaN V and e (``tf.linalg.eigh``
    raises on it), which ``assign_if_finite`` then does not store."""
    matrix = _symmetrized(tf.convert_to_tensor(matrix, tf.float32))
    finite = tf.reduce_all(tf.math.is_finite(matrix), axis=[-2, -1])  # [...]
    eigenvalues, eigenvectors = tf.linalg.eigh(tf.where(finite[..., None, None], matrix, 0.0))
    nan = tf.constant(float("nan"))
    return (tf.where(finite[..., None, None], eigenvectors, nan),
            tf.where(finite[..., None], tf.maximum(eigenvalues, 0.0), nan))


def _eigen_inverse(matrix, shift):
    """V diag(1 / (max(e, 0) + s)) Vᵀ of sym(matrix) = V diag(e) Vᵀ."""
    eigenvectors, eigenvalues = eigenpairs(matrix)
    eigenvalues = eigenvalues + shift[..., 0]
    return _symmetrized(tf.matmul(eigenvectors / eigenvalues[..., None, :], eigenvectors, transpose_b=True))


def newton_schulz_bound(residual, iterations):
    """Bound on the residual after ``iterations`` Newton–Schulz steps from
    R_0 = I − D X_0 [..., d, d]: R_0 is similar to the symmetric
    S_0 = I − D^½ X_0 D^½ (real eigenvalues μ_i) and S_k = S_0^(2^k), so

        ‖S_k‖_2 ≤ ‖S_k‖_F ≤ ‖S_0‖_F^(2^k),   ‖S_0‖_F² = Σ μ_i² = tr(R_0²) = Σ R_0 ∘ R_0ᵀ

    (O(d²), no extra product). ‖S_k‖_2 bounds the relative error of X_k in
    every direction (D^½ X_k D^½ = I − S_k). Returns the bound, [...]."""
    trace_square = tf.reduce_sum(residual * tf.linalg.matrix_transpose(residual), axis=[-2, -1])
    return tf.maximum(trace_square, 0.0) ** (0.5 * 2.0 ** iterations)


_FALLBACKS = threading.local()  # the FallbackBatch of shared_fallback, per thread


class FallbackBatch:
    """The eigh fallbacks of several Cholesky inverses under one conditional:
    ``resolve`` returns the inverses unchanged when every one is finite, and
    otherwise each non-finite matrix replaced by its eigh inverse, the same
    values as one ``tf.cond`` per inverse at a fraction of the graph (each
    conditional traces two branch graphs)."""

    def __init__(self):
        self._pending = {}  # id(inverse) -> (ok, fallback)

    def defer(self, inverse, ok, fallback):
        self._pending[id(inverse)] = (ok, fallback)
        return inverse

    def resolve(self, values):
        """``values`` (a list of tensors holding every deferred inverse as it
        was returned) with the fallbacks applied."""
        values = list(values)
        found = [v for v in values if id(v) in self._pending]
        if len(found) != len(self._pending):
            raise RuntimeError("An inverse computed in shared_fallback() was transformed before resolve().")
        if not found:
            return values
        oks = [tf.reduce_all(self._pending[id(v)][0]) for v in found]

        def fix():
            fixed = []
            for value in values:
                if id(value) in self._pending:
                    ok, fallback = self._pending[id(value)]
                    value = tf.where(ok, value, fallback())
                fixed.append(value)
            return fixed

        return tf.cond(tf.reduce_all(oks), lambda: values, fix)


@contextlib.contextmanager
def _installed(local, batch):
    """Sets ``local.batch`` (a per-thread slot) to ``batch`` while inside,
    restoring the previous one after; yields ``batch``."""
    previous = getattr(local, "batch", None)
    local.batch = batch
    try:
        yield batch
    finally:
        local.batch = previous


def shared_fallback():
    """Within it, ``damped_inverse(method='cholesky')`` outside XLA defers
    its eigh fallback to the yielded ``FallbackBatch``; pass every inverse
    computed here through its ``resolve`` before using it."""
    return _installed(_FALLBACKS, FallbackBatch())


def uses_previous(method):
    """Whether ``damped_inverse`` by ``method`` reads ``previous``: the
    Newton–Schulz warm start, and the Cholesky fallback under XLA."""
    return method == "newton_schulz" or (method == "cholesky" and in_xla_context())


def damped_inverse(matrix, shift, method="cholesky", previous=None,
                   iterations=NEWTON_SCHULZ_ITERATIONS, tolerance=NEWTON_SCHULZ_TOLERANCE):
    """D⁻¹ = (sym(matrix) + shift·I)⁻¹ for PSD matrices [..., d, d] (one
    factor, or a batch of G grouped factors) and shift > 0 ([] or the batch
    shape, e.g. [G]). ``previous``: the current inverses [..., d, d] (the
    optimizer's inverse variables, read only where used), or None.

    Methods (``INVERSE_METHODS``):
      'cholesky': D = L Lᵀ, D⁻¹ = L⁻ᵀ L⁻¹ (``_cholesky_inverse``).
      'eigh': sym(matrix) = V diag(e) Vᵀ, D⁻¹ = V diag(1 / (max(e, 0) + s)) Vᵀ
        (negative round-off eigenvalues clamped).
      'newton_schulz': from X_0 = ``previous``, k = ``iterations`` steps
        X ← X + X R, R = I − D X, each squaring the residual; taken only if
        every matrix's ``newton_schulz_bound`` on the result's relative error
        is ≤ ``tolerance``, else (first inversion, a large change of the
        factor or of the damping) 'cholesky'. Needs ``previous``.

    A non-finite Cholesky result (float32 round-off made D indefinite) falls
    back to 'eigh', per matrix of a batch (inside ``shared_fallback``: one
    conditional for all the inverses computed there, ``FallbackBatch``);
    inside XLA-compiled code, when ``previous`` is given, to ``previous``
    instead (per matrix): XLA compiles both sides of a
    ``tf.cond``, and its CPU eigendecomposition takes most of the inverse's
    compile time and seconds to run (docs/performance.md, "XLA on CPU").
    """
    if method not in INVERSE_METHODS:
        raise ValueError(f"inverse method must be one of {INVERSE_METHODS}; got {method!r}.")
    if method == "newton_schulz" and previous is None:
        raise ValueError("inverse method 'newton_schulz' needs the previous inverse.")
    matrix = _symmetrized(tf.convert_to_tensor(matrix, tf.float32))
    batch_shape = _batch_shape(matrix)
    shift = tf.broadcast_to(tf.cast(shift, tf.float32), batch_shape)[..., None, None]
    if matrix.shape[-1] is None:
        identity = tf.eye(tf.shape(matrix)[-1], batch_shape=batch_shape, dtype=tf.float32)
    else:  # broadcast over the batch (the static-size paths only add and subtract it)
        identity = tf.eye(matrix.shape[-1], dtype=tf.float32)
    damped = matrix + shift * identity
    if method == "eigh":
        return _eigen_inverse(matrix, shift)
    if previous is not None and uses_previous(method):
        previous = _symmetrized(tf.convert_to_tensor(previous, tf.float32))
    else:  # unused: not traced
        previous = None

    def cholesky(deferrable=False):
        inverse = _cholesky_inverse(damped, identity)
        if previous is not None and in_xla_context():
            finite = tf.reduce_all(tf.math.is_finite(inverse), axis=[-2, -1], keepdims=True)
            return tf.where(finite, inverse, previous)
        ok = tf.reduce_all(tf.math.is_finite(inverse), axis=[-2, -1], keepdims=True)  # per matrix
        batch = getattr(_FALLBACKS, "batch", None)
        if deferrable and batch is not None:
            return batch.defer(inverse, ok, lambda: _eigen_inverse(matrix, shift))
        return tf.cond(tf.reduce_all(ok), lambda: inverse,
                       lambda: tf.where(ok, inverse, _eigen_inverse(matrix, shift)))

    if method == "cholesky":
        return cholesky(deferrable=True)
    residual = identity - tf.matmul(damped, previous)
    good = tf.reduce_all(newton_schulz_bound(residual, iterations) <= tolerance)  # False if NaN

    def newton_schulz():
        x, r = previous, residual
        for i in range(iterations):
            x = x + tf.matmul(x, r)
            if i + 1 < iterations:
                r = identity - tf.matmul(damped, x)
        return _symmetrized(x)

    return tf.cond(good, newton_schulz, cholesky)


_INVERSE_BATCH = threading.local()  # the InverseBatch of batched_inverses, per thread

CLOSED_FORM = "closed_form"
"""``requested_inverse``'s method for matrices of size 1 or 2
(``closed_form_inverse``)."""

BATCHED_METHODS = ("cholesky", "eigh", CLOSED_FORM)
"""The methods whose inverses ``batched_inverses`` stacks: each matrix's
result does not depend on the others of its batch ('newton_schulz' decides
between its warm start and Cholesky once per call)."""


def closed_form_inverse(matrix, shift):
    """(M + s I)⁻¹ [..., p, p] of symmetric M [..., p, p], p ∈ {1, 2}, PSD,
    and shifts s > 0 ([] or the batch shape): 1 / (max(M, 0) + s) for p = 1;
    for p = 2 with D = M + s I the adjugate over the determinant,
    D⁻¹ = [[D₁₁, −D₀₁], [−D₀₁, D₀₀]] / (D₀₀D₁₁ − D₀₁²)."""
    shift = tf.convert_to_tensor(shift, tf.float32)[..., None, None]
    p = matrix.shape[-1]
    if p == 1:
        return 1.0 / (tf.maximum(matrix, 0.0) + shift)
    if p != 2:
        raise ValueError(f"closed_form_inverse takes 1×1 or 2×2 matrices; got {p}×{p}.")
    damped = matrix + shift * tf.eye(2)
    diagonal = tf.linalg.diag_part(damped)  # [..., 2]
    det = tf.reduce_prod(diagonal, -1) - tf.square(damped[..., 0, 1])
    adjugate = tf.linalg.set_diag(-damped, tf.reverse(diagonal, [-1]))
    return adjugate / det[..., None, None]


def _inverse(matrix, shift, method, previous):
    """The inverse ``requested_inverse`` stands for."""
    if method == CLOSED_FORM:
        return closed_form_inverse(matrix, shift)
    return damped_inverse(matrix, shift, method=method, previous=previous)


class PendingInverse:
    """Stands for a damped inverse requested in ``batched_inverses`` until
    ``InverseBatch.resolve`` replaces it by its value."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index


SMALL_FACTOR = 32
"""Factors of at most this size are inverted together in ``batched_inverses``,
zero-padded to the largest of them."""


def inversion_sizes(sizes):
    """{d: D}: the size D ≥ d at which ``batched_inverses`` inverts the
    factors of size d, zero-padded. Exact: with the pad the damped matrix is
    blockdiag(M + sI, sI), whose inverse's leading d×d block is (M + sI)⁻¹.
    Every d ≤ ``SMALL_FACTOR`` at the largest such size (a few thousand
    flops each), d at d + 1 where d + 1 occurs (a layer's input factor with
    its bias coordinate beside an output factor of the same width, +3 %
    flops at d = 100), the rest at d."""
    sizes = sorted(set(int(d) for d in sizes))
    small = [d for d in sizes if d <= SMALL_FACTOR]
    target = {d: small[-1] for d in small}
    for d in reversed(sizes):
        if d not in target:
            target[d] = d + 1 if target.get(d + 1) == d + 1 else d
    return target


class InverseBatch:
    """Damped inverses of many factors, computed as one ``damped_inverse``
    per (size, method) on the factors of that size stacked ([Σ G_i, D, D],
    each zero-padded to D by ``inversion_sizes``, its inverse sliced back):
    the step's graph, its trace and its op count grow with the number of
    distinct factor sizes, not of factors. Every matrix gets the value it
    would get alone up to round-off (a batched Cholesky / eigh factors each
    matrix on its own, the eigh fallback is per matrix; a padded matrix's
    blocked triangular inverse splits at other rows)."""

    def __init__(self):
        self._requests = []  # (matrix, shift, method, previous)

    def request(self, matrix, shift, method, previous):
        self._requests.append((matrix, shift, method, previous))
        return PendingInverse(len(self._requests) - 1)

    def resolve(self, values):
        """``values`` with every ``PendingInverse`` replaced by its inverse."""
        sizes = inversion_sizes(m.shape[-1] for m, _, method, _ in self._requests if method != CLOSED_FORM)
        groups = {}
        for index, (matrix, _, method, previous) in enumerate(self._requests):
            size = matrix.shape[-1] if method == CLOSED_FORM else sizes[matrix.shape[-1]]
            groups.setdefault((size, method, previous is None), []).append(index)
        inverses = [None] * len(self._requests)
        with shared_fallback() as fallbacks:
            stacked = [self._stacked_inverse(size, indices) for (size, _, _), indices in groups.items()]
        for indices, value in zip(groups.values(), fallbacks.resolve(stacked)):
            shapes = [self._requests[i][0].shape for i in indices]
            if len(indices) == 1:  # inverted as it was requested
                parts = [value]
            elif all(shape.rank == 2 for shape in shapes):
                parts = tf.unstack(value)
            else:
                counts = [int(np.prod(shape[:-2], dtype=np.int64)) for shape in shapes]
                parts = [tf.reshape(part, [*shape[:-2], *part.shape[-2:]])
                         for shape, part in zip(shapes, tf.split(value, counts))]
            for index, shape, part in zip(indices, shapes, parts):
                d = shape[-1]
                inverses[index] = part if part.shape[-1] == d else part[..., :d, :d]
        return [inverses[v.index] if isinstance(v, PendingInverse) else v for v in values]

    def _stacked_inverse(self, size, indices):
        """``damped_inverse`` of the requests ``indices`` (equal method, sizes
        padded to ``size``) stacked along one batch axis, [Σ G_i, size,
        size] (single matrices with their scalar shifts: one ``tf.stack``
        each)."""
        requests = [self._requests[i] for i in indices]

        def padded(tensor):
            tensor = tf.convert_to_tensor(tensor, tf.float32)
            pad = size - tensor.shape[-1]
            if pad == 0:
                return tensor
            return tf.pad(tensor, [[0, 0]] * (tensor.shape.rank - 2) + [[0, pad], [0, pad]])

        method = requests[0][2]
        with_previous = requests[0][3] is not None and uses_previous(method)  # read only if used
        if len(requests) == 1:
            matrix, shift, _, previous = requests[0]
            return _inverse(padded(matrix), shift, method, padded(previous) if with_previous else None)

        def stacked(tensors):
            tensors = [padded(t) for t in tensors]
            if all(t.shape.rank == 2 for t in tensors):
                return tf.stack(tensors)
            return tf.concat([tf.reshape(t, [-1, size, size]) for t in tensors], axis=0)

        matrices = [tf.convert_to_tensor(m, tf.float32) for m, _, _, _ in requests]
        shifts = [tf.cast(s, tf.float32) for _, s, _, _ in requests]
        if all(m.shape.rank == 2 for m in matrices):
            shifts = tf.stack(shifts)
        else:
            shifts = tf.concat([tf.reshape(tf.broadcast_to(s, m.shape[:-2]), [-1])
                                for m, s in zip(matrices, shifts)], axis=0)
        previous = stacked([p for _, _, _, p in requests]) if with_previous else None
        return _inverse(stacked(matrices), shifts, method, previous)


def batched_inverses():
    """Within it, ``requested_inverse`` defers the inverses of the batched
    methods to the yielded ``InverseBatch``; pass every value computed here
    through its ``resolve``."""
    return _installed(_INVERSE_BATCH, InverseBatch())


def requested_inverse(matrix, shift, method="cholesky", previous=None):
    """``damped_inverse(matrix, shift, method, previous)`` (method
    ``CLOSED_FORM``: ``closed_form_inverse(matrix, shift)``), or inside
    ``batched_inverses`` (for ``BATCHED_METHODS`` and matrices of static
    shape) a ``PendingInverse`` for it."""
    batch = getattr(_INVERSE_BATCH, "batch", None)
    matrix = tf.convert_to_tensor(matrix, tf.float32)
    if batch is None or method not in BATCHED_METHODS or not matrix.shape.is_fully_defined():
        return _inverse(matrix, shift, method, previous)
    return batch.request(matrix, shift, method, previous)


# --- batched (grouped) factors: one Kronecker block per group -------------------
def grouped_tkfac_sums(a, gs, matmul_dtype=tf.float32):
    """``tkfac_sums`` of G independent blocks at once: a [G, M, d_a],
    gs [K, G, M, d_g] -> (δ_sum [G], Φ_sum [G, d_a, d_a], Ψ_sum [G, d_g, d_g])."""
    a = tf.cast(a, tf.float32)
    gs = tf.cast(gs, tf.float32)
    a_sq = squared_norms(a)  # [G, M]
    g_sq = tf.reduce_sum(squared_norms(gs), axis=0)  # [G, M]
    delta_sum = tf.reduce_sum(a_sq * g_sq, axis=-1)
    phi_sum = sample_gram(a * g_sq[..., None], a, matmul_dtype, batch_dims=1)
    psi_sum = product("kgmd,kgme->gde", gs * a_sq[None, :, :, None], gs, matmul_dtype)
    return delta_sum, phi_sum, psi_sum


def grouped_tkfac_from_sums(delta_sum, phi_sum, psi_sum, num_examples):
    """``tkfac_from_sums`` per group: (δ [G], Φ [G, d_a, d_a], Ψ [G, d_g, d_g])."""
    delta = tf.math.divide_no_nan(delta_sum, tf.cast(num_examples, tf.float32))
    scale = delta_sum[:, None, None]
    return delta, tf.math.divide_no_nan(phi_sum, scale), tf.math.divide_no_nan(psi_sum, scale)


def grouped_kfac_sums(a, gs, matmul_dtype=tf.float32):
    """``kfac_sums`` of G blocks: (A_sum [G, d_a, d_a], G_sum [G, d_g, d_g],
    M) with M the samples per group."""
    return (
        sample_gram(a, a, matmul_dtype, batch_dims=1),
        product("kgmd,kgme->gde", gs, gs, matmul_dtype),
        tf.cast(tf.shape(a)[-2], tf.float32),
    )
