"""Blocks of per-feature and generic variables: the scale-and-shift block of
LayerNorm / BatchNorm, and the diagonal and full blocks of any variable."""

import tensorflow as tf

from tkfac_tf import fisher_factors
from tkfac_tf.fisher_blocks.base import FisherBlock, inverse_eigenvalues

DAMPING_RULES = ("vector", "mean", "entry", "plain")


def kronecker_consistent_shift(curvature, damping, rule="mean"):
    """The damping a diagonal or per-feature block adds to its curvature.

    A Kronecker block damped TKFAC-style, (L + √λ I) ⊗ (R + √λ I), or with
    K-FAC's factored Tikhonov damping, adds √λ·(l_i + r_j) + λ to the
    eigenvalue l_i·r_j. Seen as a product of two equal factors √c ⊗ √c
    (a 1×1 Kronecker block, or a square block with isotropic factors and
    mean eigenvalue c, where π = 1 makes K-FAC's damping coincide with
    TKFAC's), the same damping gives (√c + √λ)² = c + 2√(λc) + λ, so the
    shift is 2√(λc) + λ. 'mean' / 'entry' pass c = the block's mean
    eigenvalue / each entry's own value; 'plain' returns λ (Tikhonov).
    ('vector', the DiagonalBlock's default, is ``DiagonalBlock.damping_shift``.)"""
    damping = tf.cast(damping, tf.float32)
    if rule == "plain":
        return damping
    if rule not in ("mean", "entry"):  # 'vector' needs the whole diagonal
        raise ValueError(f"damping rule must be one of {DAMPING_RULES}; got {rule!r}.")
    return 2.0 * tf.sqrt(damping * tf.maximum(curvature, 0.0)) + damping


class _MomentBlock(FisherBlock):
    """A block whose one factor is the mean of per-example moments: sums
    (Σ moments [shape of the factor], N), statistic = Σ / N, and one
    inverse variable ``self.inverse`` (or, eigenbasis, one snapshot
    variable ``self.snapshot``)."""

    def statistics_from_sums(self, sums):
        total, num_examples = sums
        return (tf.math.divide_no_nan(total, tf.cast(num_examples, tf.float32)),)

    def zero_sums(self):
        return tf.zeros(self._factors[0].shape), tf.zeros([])

    def _inverse_variables(self):
        return [self.inverse]

    def _create_inverse_state(self, add_variable, name, shape, initializer, snapshot_shapes):
        """``self.inverse`` of ``shape``, or (eigenbasis) ``self.snapshot``:
        one variable per entry of ``snapshot_shapes`` {suffix: (shape, initializer)}."""
        if self.eigenbasis:
            self.snapshot = [add_variable(s, init, f"{name}_{suffix}")
                             for suffix, (s, init) in snapshot_shapes.items()]
        else:
            self.inverse = add_variable(shape, initializer, f"{name}_inverse")

    def _snapshot_variables(self):
        return list(self.snapshot)


def _outer_product_sums(columns):
    """Σ_n v_{n,d} v_{n,d}ᵀ [d, p, p] of the p ≤ 2 ``columns`` [N, d] of the
    vectors v, as reductions over N (2.5–3× faster than an einsum's d
    batched p×p products on CPU)."""
    if len(columns) == 1:
        return tf.reduce_sum(tf.square(columns[0]), axis=0)[:, None, None]
    first, second = columns
    sums = [tf.reduce_sum(x * y, axis=0) for x, y in ((first, first), (first, second), (second, second))]
    return tf.reshape(tf.stack([sums[0], sums[1], sums[1], sums[2]], axis=-1), [-1, 2, 2])


class ScaleAndShiftBlock(_MomentBlock):
    """Per-feature full block for LayerNorm / BatchNorm scale and shift:
    F_c = E_i[v_{i,c} v_{i,c}ᵀ], v = (∂ℓ_i/∂γ_c, ∂ℓ_i/∂β_c) exact per example
    ([d, p, p], p = 2, or 1 without γ or β). The same block serves TKFAC and
    K-FAC (no Kronecker factors to restrict: its trace is the exact trace of
    these variables' Fisher diagonal blocks). Damping: (F_c + λ I)⁻¹ per
    feature (Tikhonov, as kfac-jax's ScaleAndShift blocks) by default
    (``damping_rule = 'plain'``): F_c is exact per example, not a noisy
    estimate, and the Kronecker-consistent shifts ('mean', 'entry') measured
    no better on examples/char_transformer.py (docs/layers.md)."""

    damping_rule = "plain"  # or 'mean' / 'entry': see kronecker_consistent_shift

    def _create_state(self, add_variable, prefix, d, p):
        def identities(shape, dtype=None):
            return tf.eye(p, batch_shape=[d], dtype=dtype or tf.float32)

        self.moments = add_variable((d, p, p), "zeros", f"{prefix}_scale_shift_fisher")
        self._create_inverse_state(add_variable, f"{prefix}_scale_shift", (d, p, p), identities,
                                   {"snapshot": ((d, p, p), "zeros")})
        self._factors = (self.moments,)

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        """(Σ_i v_i v_iᵀ [d, p, p], N) over the batch, or over ``examples``
        (m of them): the per-example gradients are formed on the whole batch
        (BatchNorm's need the batch's moments) and then gathered."""
        normalized = [self.kind.normalized_inputs(use) for use in uses]
        total = 0.0
        for grads in grads_per_vector:
            per_use = [
                self.kind.per_example_gradients(use, g, inputs)
                for use, g, inputs in zip(uses, self._grads(uses, grads), normalized)
            ]
            columns = [tf.add_n(column) for column in zip(*per_use)]  # p × [N, d]
            if examples is not None:
                columns = [tf.gather(column, examples) for column in columns]
            total += _outer_product_sums(columns)
        if examples is not None:
            return total, tf.cast(tf.size(examples), tf.float32)
        num_examples = tf.cast(self.kind.num_examples(uses[0]), tf.float32)
        return total, num_examples

    def damping_shift(self, damping, moments=None):
        """What is added to every F_c's diagonal: ``kronecker_consistent_shift``
        of the per-feature mean eigenvalues tr F_c / p ('entry') or of the
        block's mean eigenvalue ('mean'), or λ ('plain'); F = ``moments``
        [d, p, p] or the running average."""
        if self.damping_rule == "plain":
            return kronecker_consistent_shift(None, damping, "plain")
        m = self._value(self.moments) if moments is None else moments
        p = float(self.output_size)
        if self.damping_rule == "mean":
            curvature = tf.reduce_sum(tf.linalg.trace(m)) / float(self.input_size * self.output_size)
        else:
            curvature = tf.maximum(tf.linalg.trace(m), 0.0) / p  # [d]
        return kronecker_consistent_shift(curvature, damping, self.damping_rule)

    def _damped_inverses(self, m, damping):
        """(F_c + shift I)⁻¹ [d, p, p] in closed form (p ≤ 2,
        ``fisher_factors.closed_form_inverse``); inside
        ``fisher_factors.batched_inverses`` a ``PendingInverse`` for it, so
        the 2×2 inverses of every such block are formed by one closed form."""
        trace = None if self.damping_mode == "plain" else tf.reduce_sum(tf.linalg.trace(m))
        damping = self.effective_damping(damping, trace=trace)
        return fisher_factors.requested_inverse(
            m, self.damping_shift(damping, m), method=fisher_factors.CLOSED_FORM)

    def _inverse_values(self, damping, method):
        del method  # closed forms (p ≤ 2)
        return [self._damped_inverses(self._value(self.moments), damping)]

    def _multiply_inverse(self, matrix):
        return tf.einsum("dpq,dq->dp", self.inverse, matrix)

    def _snapshot_values(self):
        return [self._value(self.moments)]

    def _multiply_snapshot(self, matrix, damping):
        """The closed-form inverses of the snapshot at λ, applied to ∇Θ [d, p]."""
        inverses = self._damped_inverses(self._value(self.snapshot[0]), damping)
        return tf.einsum("dpq,dq->dp", inverses, tf.cast(matrix, tf.float32))

    def multiply_fisher(self, matrix):
        return tf.einsum("dpq,dq->dp", self._value(self.moments), matrix)

    def full_fisher(self):
        m = self._value(self.moments)
        d, p = self.input_size, self.output_size
        eye = tf.eye(d)
        return tf.reshape(eye[:, None, :, None] * m[:, :, None, :], [d * p, d * p])

    def trace(self):
        return tf.reduce_sum(tf.linalg.trace(self._value(self.moments)))


class DiagonalBlock(_MomentBlock):
    """Diagonal block for any other trainable variables (``VariablesKind``):
    F̂ = diag(f), damped as TKFAC damps a Kronecker block (``damping_rule``
    'vector', the default; see ``damping_shift``):

        F̂ = diag(f) = L ⊗ R,  L = diag(f) / √δ [n, n],  R = √δ [1×1],  δ = Σ f
        damped (L + √λ I) ⊗ (R + √λ) = diag(f + √λ (√δ + f/√δ) + λ)

    i.e. the block's n parameters are one layer with a 1-dimensional output,
    trace-split as TKFAC splits every Kronecker block (exactly what
    ``EmbeddingTKFACBlock`` does with d_g = 1). Plain Tikhonov (f + λ)
    damped these variables far less than the Kronecker blocks are
    effectively damped, so on noisy, near-zero f their steps ≈ g/λ took the
    norm constraint's whole budget (docs/layers.md).

    APPROXIMATION (batch-gradient squares, not per-example squares): per
    backward vector k, f = (Σ_i ∇θ ℓ̂_{i,k})² / N, the squared gradient of the
    batch's sampled loss times N. In estimation_mode='gradients' (the default)
    the sampled per-example gradients are independent with zero mean, so
    this is an unbiased (one-sample, noisy) estimate of the Fisher diagonal
    E_i[(∇θ ℓ_i)²]; in 'exact' and 'empirical' modes it also contains the
    cross-example products Σ_{i≠j} (biased). Per-example squares would need a
    per-example backward pass (tf.vectorized_map over the model), which this
    library does not pay for. The same block serves TKFAC and K-FAC.
    """

    damping_rule = "vector"  # or 'mean' / 'entry' / 'plain': see damping_shift

    def _create_state(self, add_variable, prefix, n, _):
        self.diagonal = add_variable((n,), "zeros", f"{prefix}_fisher_diagonal")
        self._create_inverse_state(add_variable, f"{prefix}_fisher_diagonal", (n,), "ones",
                                   {"snapshot": ((n,), "zeros")})
        self._factors = (self.diagonal,)

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        """(f·N [n], N) from the batch's gradient; ``examples`` is ignored:
        f is a square of the whole batch's sampled gradient (see the class
        docstring), which has no per-example terms to subsample and costs one
        square per parameter."""
        del examples
        vectors = _batch_gradient_vectors(self.kind, uses, grads_per_vector, self._grads)
        total = tf.add_n([tf.square(v) for v in vectors])
        return total, tf.cast(self.kind.num_examples(uses[0]), tf.float32)

    def damping_shift(self, damping, diagonal=None):
        """What is added to f: √λ (√δ + f/√δ) + λ with δ = Σ f ('vector',
        the n×1 Kronecker view above; λ while δ = 0), or
        ``kronecker_consistent_shift`` of f itself ('entry'), of mean(f)
        ('mean'), or λ ('plain'); f = ``diagonal`` or the running average."""
        f = tf.maximum(self._value(self.diagonal) if diagonal is None else diagonal, 0.0)
        if self.damping_rule == "vector":
            lam = tf.cast(damping, tf.float32)
            sqrt_delta = tf.sqrt(tf.reduce_sum(f))
            return tf.sqrt(lam) * (sqrt_delta + tf.math.divide_no_nan(f, sqrt_delta)) + lam
        curvature = tf.reduce_mean(f) if self.damping_rule == "mean" else f
        return kronecker_consistent_shift(curvature, damping, self.damping_rule)

    def _damped_inverse_diagonal(self, f, damping):
        """1 / (f + shift) [n] for f ≥ 0 [n] at damping λ."""
        damping = self.effective_damping(damping, trace=tf.reduce_sum(f))
        return 1.0 / (f + self.damping_shift(damping, f))

    def _inverse_values(self, damping, method):
        del method  # a diagonal
        return [self._damped_inverse_diagonal(tf.maximum(self._value(self.diagonal), 0.0), damping)]

    def _multiply_inverse(self, matrix):
        return self._value(self.inverse) * matrix

    def _snapshot_values(self):
        return [tf.maximum(self._value(self.diagonal), 0.0)]

    def _multiply_snapshot(self, matrix, damping):
        return self._damped_inverse_diagonal(self._value(self.snapshot[0]), damping) * tf.cast(matrix, tf.float32)

    def multiply_fisher(self, matrix):
        return self._value(self.diagonal) * matrix

    def full_fisher(self):
        return tf.linalg.diag(self._value(self.diagonal))

    def trace(self):
        return tf.reduce_sum(self._value(self.diagonal))


def _batch_gradient_vectors(kind, uses, grads_per_vector, fill):
    """Per backward vector k: v_k = Σ_i ∇θ ℓ̂_{i,k} [n] (float32), the batch
    gradient of the tapped variables (``kind.variables``, flattened and
    concatenated), summed over the layer's uses; ``fill`` replaces
    unconnected (None) gradients by zeros."""
    vectors = []
    for grads in grads_per_vector:
        grads = fill(uses, grads)
        per_variable = [
            tf.add_n([tf.cast(g, tf.float32) for u, g in zip(uses, grads) if u.index == j])
            for j in range(len(kind.variables))
        ]
        vectors.append(tf.concat([tf.reshape(g, [-1]) for g in per_variable], axis=0))
    return vectors


class FullBlock(_MomentBlock):
    """Full block for small groups of other trainable variables
    (``VariablesKind`` with ``structure='full'``, n ≤ MAX_FULL_BLOCK_SIZE):
    F̂ = Σ_k v_k v_kᵀ / N [n, n] with v_k the batch gradient of backward
    vector k (the DiagonalBlock's estimate without dropping the off-diagonal
    entries; unbiased in estimation_mode='gradients', see DiagonalBlock).
    Damped as TKFAC damps an n×1 Kronecker block, like DiagonalBlock:

        F̂ = L ⊗ R,  L = F̂ / √δ,  R = √δ,  δ = tr F̂
        (L + √λ I) ⊗ (R + √λ) = (1 + √λ/√δ) F̂ + (√(λδ) + λ) I

    (λ I while δ = 0). The same block serves TKFAC and K-FAC."""

    def _create_state(self, add_variable, prefix, n, _):
        self.fisher = add_variable((n, n), "zeros", f"{prefix}_fisher_full")
        self._create_inverse_state(add_variable, f"{prefix}_fisher_full", (n, n), "identity",
                                   {"eigenvectors": ((n, n), "identity"), "eigenvalues": ((n,), "zeros")})
        self._factors = (self.fisher,)

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        """(Σ_k v_k v_kᵀ [n, n], N); ``examples`` is ignored, as by DiagonalBlock."""
        del examples
        vectors = tf.stack(_batch_gradient_vectors(self.kind, uses, grads_per_vector, self._grads))
        total = fisher_factors.product("kn,km->nm", vectors, vectors, self.matmul_dtype)
        return total, tf.cast(self.kind.num_examples(uses[0]), tf.float32)

    def _damped_form(self, trace, damping):
        """(c, s) with damped F̂ = c F̂ + s I: c = 1 + √λ/√δ, s = √(λδ) + λ, δ = ``trace``."""
        lam = tf.cast(self.effective_damping(damping, trace=trace), tf.float32)
        sqrt_delta = tf.sqrt(tf.maximum(trace, 0.0))
        return 1.0 + tf.math.divide_no_nan(tf.sqrt(lam), sqrt_delta), tf.sqrt(lam) * sqrt_delta + lam

    def _inverse_values(self, damping, method):
        fisher = self._value(self.fisher)
        scale, shift = self._damped_form(tf.linalg.trace(fisher), damping)
        return [fisher_factors.damped_inverse(
            scale * fisher, shift, method=method, previous=self._value(self.inverse),
        )]

    def _multiply_inverse(self, vector):
        """(damped F̂)⁻¹ ∇Θ for ∇Θ [n]."""
        return tf.linalg.matvec(self._value(self.inverse), vector)

    def _snapshot_values(self):
        return list(fisher_factors.eigenpairs(self._value(self.fisher)))

    def _multiply_snapshot(self, vector, damping):
        """V diag(1 / (c e + s)) Vᵀ ∇Θ of the snapshot F̂ = V diag(e) Vᵀ."""
        vectors, values = (self._value(v) for v in self.snapshot)
        scale, shift = self._damped_form(tf.reduce_sum(values), damping)
        rotated = tf.linalg.matvec(vectors, tf.cast(vector, tf.float32), transpose_a=True)
        return tf.linalg.matvec(vectors, inverse_eigenvalues(scale * values, shift) * rotated)

    def multiply_fisher(self, vector):
        return tf.linalg.matvec(self._value(self.fisher), vector)

    def full_fisher(self):
        return self._value(self.fisher)

    def trace(self):
        return tf.linalg.trace(self._value(self.fisher))
