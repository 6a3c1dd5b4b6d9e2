"""Blocks of per-feature and generic variables: the scale-and-shift block of
LayerNorm / BatchNorm, and the diagonal and full blocks of any variable."""

import tensorflow as tf

from tkfac_tf import fisher_factors
from tkfac_tf.fisher_blocks.base import FisherBlock

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
    inverse variable ``self.inverse``."""

    def statistics_from_sums(self, sums):
        total, num_examples = sums
        return (tf.math.divide_no_nan(total, tf.cast(num_examples, tf.float32)),)

    def zero_sums(self):
        return tf.zeros(self._factors[0].shape), tf.zeros([])

    @property
    def inverse_variables(self):
        return [self.inverse]


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
        self.inverse = add_variable((d, p, p), identities, f"{prefix}_scale_shift_inverse")
        self._factors = (self.moments,)

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        """(Σ_i v_i v_iᵀ [d, p, p], N) over the batch, or over ``examples``
        (m of them): the per-example gradients are formed on the whole batch
        (BatchNorm's x̂ needs the batch's moments) and then gathered."""
        x_hats = [self.kind.normalized_inputs(use) for use in uses]
        total = 0.0
        for grads in grads_per_vector:
            per_example = tf.add_n(
                [
                    self.kind.per_example_gradients(use, g, x_hat)
                    for use, g, x_hat in zip(uses, self._grads(uses, grads), x_hats)
                ]
            )  # [N, d, p]
            if examples is not None:
                per_example = tf.gather(per_example, examples)
            total += tf.einsum("ndp,ndq->dpq", per_example, per_example)
        if examples is not None:
            return total, tf.cast(tf.size(examples), tf.float32)
        num_examples = tf.cast(self.kind.num_examples(uses[0]), tf.float32)
        return total, num_examples

    def damping_shift(self, damping):
        """What is added to every F_c's diagonal: ``kronecker_consistent_shift``
        of the per-feature mean eigenvalues tr F_c / p ('entry') or of the
        block's mean eigenvalue ('mean'), or λ ('plain')."""
        m = self._value(self.moments)
        p = float(self.output_size)
        if self.damping_rule == "mean":
            curvature = self.trace() / float(self.input_size * self.output_size)
        else:
            curvature = tf.maximum(tf.linalg.trace(m), 0.0) / p  # [d]
        return kronecker_consistent_shift(curvature, damping, self.damping_rule)

    def inverse_values(self, damping, method="cholesky"):
        del method  # closed forms (p ≤ 2)
        damping = self.effective_damping(damping)
        m = self._value(self.moments)
        shift = self.damping_shift(damping)
        if self.output_size == 1:
            return [1.0 / (tf.maximum(m, 0.0) + shift[..., None, None] * tf.ones_like(m))]
        shift = shift * tf.ones_like(m[:, 0, 0])
        a, b, c = m[:, 0, 0] + shift, m[:, 0, 1], m[:, 1, 1] + shift
        det = a * c - b * b
        return [tf.stack([tf.stack([c, -b], -1), tf.stack([-b, a], -1)], -2) / det[:, None, None]]

    def multiply_inverse(self, matrix):
        return tf.einsum("dpq,dq->dp", self.inverse, matrix)

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
        self.inverse = add_variable((n,), "ones", f"{prefix}_fisher_diagonal_inverse")
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

    def damping_shift(self, damping):
        """What is added to f: √λ (√δ + f/√δ) + λ with δ = Σ f ('vector',
        the n×1 Kronecker view above; λ while δ = 0), or
        ``kronecker_consistent_shift`` of f itself ('entry'), of mean(f)
        ('mean'), or λ ('plain')."""
        f = tf.maximum(self._value(self.diagonal), 0.0)
        if self.damping_rule == "vector":
            lam = tf.cast(damping, tf.float32)
            sqrt_delta = tf.sqrt(tf.reduce_sum(f))
            return tf.sqrt(lam) * (sqrt_delta + tf.math.divide_no_nan(f, sqrt_delta)) + lam
        curvature = tf.reduce_mean(f) if self.damping_rule == "mean" else f
        return kronecker_consistent_shift(curvature, damping, self.damping_rule)

    def inverse_values(self, damping, method="cholesky"):
        del method  # a diagonal
        damping = self.effective_damping(damping)
        f = tf.maximum(self._value(self.diagonal), 0.0)
        return [1.0 / (f + self.damping_shift(damping))]

    def multiply_inverse(self, matrix):
        return self._value(self.inverse) * matrix

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
        self.inverse = add_variable((n, n), "identity", f"{prefix}_fisher_full_inverse")
        self._factors = (self.fisher,)

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        """(Σ_k v_k v_kᵀ [n, n], N); ``examples`` is ignored, as by DiagonalBlock."""
        del examples
        vectors = tf.stack(_batch_gradient_vectors(self.kind, uses, grads_per_vector, self._grads))
        total = fisher_factors.product("kn,km->nm", vectors, vectors, self.matmul_dtype)
        return total, tf.cast(self.kind.num_examples(uses[0]), tf.float32)

    def inverse_values(self, damping, method="cholesky"):
        lam = tf.cast(self.effective_damping(damping), tf.float32)
        fisher = self._value(self.fisher)
        sqrt_delta = tf.sqrt(tf.maximum(tf.linalg.trace(fisher), 0.0))
        scale = 1.0 + tf.math.divide_no_nan(tf.sqrt(lam), sqrt_delta)
        return [fisher_factors.damped_inverse(
            scale * fisher, tf.sqrt(lam) * sqrt_delta + lam, method=method,
            previous=self._value(self.inverse),
        )]

    def multiply_inverse(self, vector):
        """(damped F̂)⁻¹ ∇Θ for ∇Θ [n]."""
        return tf.linalg.matvec(self._value(self.inverse), vector)

    def multiply_fisher(self, vector):
        return tf.linalg.matvec(self._value(self.fisher), vector)

    def full_fisher(self):
        return self._value(self.fisher)

    def trace(self):
        return tf.linalg.trace(self._value(self.fisher))
