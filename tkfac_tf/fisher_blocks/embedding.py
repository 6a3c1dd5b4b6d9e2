"""Blocks of Embedding layers: F̂ = diag(l) ⊗ R (the one-hot input makes the
left factor diagonal), for TKFAC and K-FAC."""

import tensorflow as tf

from tkfac_tf import fisher_factors
from tkfac_tf.fisher_blocks.base import (
    FisherBlock,
    inverse_eigenvalues,
    kron,
    subset_of_examples,
)


class _DiagonalLeftKroneckerBlock(FisherBlock):
    """F̂ = diag(l) ⊗ R for ∇Θ [d_a, d_g] (Embedding): the left factor is a
    vector l [d_a], the right one a matrix R [d_g, d_g]. Damped inverse:
    (l + s_l)⁻¹ and (R + s_r I)⁻¹ with the shifts of the subclass's
    ``damping_split``. The eigenbasis snapshot is (l, Q_R, e_R)."""

    def _create_state(self, add_variable, prefix, d_a, d_g):
        if self.eigenbasis:
            self.left_snapshot = add_variable((d_a,), "zeros", f"{prefix}_left_diagonal_snapshot")
            self.right_eigenvectors = add_variable((d_g, d_g), "identity", f"{prefix}_right_eigenvectors")
            self.right_eigenvalues = add_variable((d_g,), "zeros", f"{prefix}_right_eigenvalues")
        else:
            self.left_inverse = add_variable((d_a,), "ones", f"{prefix}_left_inverse_diagonal")
            self.right_inverse = add_variable((d_g, d_g), "identity", f"{prefix}_right_inverse")
        self._create_factors(add_variable, prefix, d_a, d_g)

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        uses, grads_per_vector = subset_of_examples(uses, grads_per_vector, examples)
        tokens = tf.concat([self.kind.tokens(use) for use in uses], axis=0)
        gs = tf.stack(
            [
                tf.concat(
                    [
                        self.kind.preactivation_gradients(use, g)
                        for use, g in zip(uses, self._grads(uses, grads))
                    ],
                    axis=0,
                )
                for grads in grads_per_vector
            ]
        )  # [K, M, d_g]
        num_examples = tf.cast(self.kind.num_examples(uses[0]), tf.float32)
        return self._batch_sums(tokens, gs, num_examples)

    def zero_sums(self):
        return self._batch_sums(
            tf.zeros([0], tf.int32), tf.zeros([1, 0, self.output_size]), tf.zeros([])
        )

    def _inverse_variables(self):
        return [self.left_inverse, self.right_inverse]

    def _inverse_values(self, damping, method):
        damping = self.effective_damping(damping)
        left, right = self.diagonal_kronecker_factors()
        left_shift, right_shift = self._shifts(tf.reduce_sum(left), tf.linalg.trace(right), damping)
        return [
            1.0 / (tf.maximum(left, 0.0) + left_shift),
            self._damped_inverse(right, right_shift, self.right_inverse, method),
        ]

    def _multiply_inverse(self, matrix):
        right = fisher_factors.product("vd,de->ve", matrix, self.right_inverse, self.matmul_dtype)
        return self._value(self.left_inverse)[:, None] * right

    def _snapshot_variables(self):
        return [self.left_snapshot, self.right_eigenvectors, self.right_eigenvalues]

    def _snapshot_values(self):
        left, right = self.diagonal_kronecker_factors()
        return [tf.maximum(left, 0.0), *fisher_factors.eigenpairs(right)]

    def _multiply_snapshot(self, matrix, damping):
        """(diag(l) + s_l)⁻¹ ∇Θ (R + s_r I)⁻¹ of the snapshot."""
        left = self._value(self.left_snapshot)
        right_vectors, right_values = self._value(self.right_eigenvectors), self._value(self.right_eigenvalues)
        trace_left, trace_right = tf.reduce_sum(left), tf.reduce_sum(right_values)
        damping = self.effective_damping(damping, trace=trace_left * trace_right)
        left_shift, right_shift = self._shifts(trace_left, trace_right, damping)
        right = fisher_factors.product("vd,de->ve", matrix, right_vectors, self.matmul_dtype)
        right = right * inverse_eigenvalues(right_values, right_shift)
        right = fisher_factors.product("ve,de->vd", right, right_vectors, self.matmul_dtype)
        return inverse_eigenvalues(left, left_shift)[:, None] * right

    def multiply_fisher(self, matrix):
        left, right = self.diagonal_kronecker_factors()
        return left[:, None] * tf.matmul(matrix, right)

    def kronecker_factors(self):
        """(diag(l), R) as dense matrices (tests; F̂ = P ⊗ Q)."""
        left, right = self.diagonal_kronecker_factors()
        return tf.linalg.diag(left), right

    def full_fisher(self):
        return kron(*self.kronecker_factors())

    def trace(self):
        left, right = self.diagonal_kronecker_factors()
        return tf.reduce_sum(left) * tf.linalg.trace(right)


def _segment_sum(values, tokens, size):
    return tf.math.unsorted_segment_sum(values, tokens, size)


class EmbeddingTKFACBlock(_DiagonalLeftKroneckerBlock):
    """TKFAC for an Embedding. With one-hot a (‖a‖ = 1):
    δ = E_i Σ_t ‖g_t‖², Φ = diag(Σ_t ‖g_t‖² onehot(token_t)) / (N δ) (a
    diagonal, unit trace), Ψ = E_i Σ_t g_t g_tᵀ / δ. State: l = EMA of
    √δ diag(Φ) [vocab], R = EMA of √δ Ψ; damped as (l + √λ), (R + √λ I)
    (or π-split, as ``TKFACBlock``)."""

    approximation = "tkfac"
    damping_split = "sqrt"

    def _create_factors(self, add_variable, prefix, d_a, d_g):
        self.left_factor = add_variable((d_a,), "zeros", f"{prefix}_sqrt_delta_phi_diagonal")
        self.right_factor = add_variable((d_g, d_g), "zeros", f"{prefix}_sqrt_delta_psi")
        self._factors = (self.left_factor, self.right_factor)

    def _batch_sums(self, tokens, gs, num_examples):
        g_sq = fisher_factors.squared_norms(gs)  # [K, M]
        g_sq_per_sample = tf.reduce_sum(g_sq, axis=0)  # [M]
        delta_sum = tf.reduce_sum(g_sq_per_sample)
        phi_sum = _segment_sum(g_sq_per_sample, tokens, self.input_size)
        psi_sum = fisher_factors.sample_gram(gs, gs, self.matmul_dtype)
        return delta_sum, phi_sum, psi_sum, num_examples

    def statistics_from_sums(self, sums):
        delta, phi, psi = fisher_factors.tkfac_from_sums(*sums)
        sqrt_delta = tf.sqrt(delta)
        return sqrt_delta * phi, sqrt_delta * psi

    def diagonal_kronecker_factors(self):
        return self._value(self.left_factor), self._value(self.right_factor)

    @property
    def delta(self):
        return self.trace()

    @property
    def phi(self):
        """diag(Φ) [vocab] (unit sum)."""
        left = self._value(self.left_factor)
        return tf.math.divide_no_nan(left, tf.reduce_sum(left))

    @property
    def psi(self):
        right = self._value(self.right_factor)
        return tf.math.divide_no_nan(right, tf.linalg.trace(right))


class EmbeddingKFACBlock(_DiagonalLeftKroneckerBlock):
    """K-FAC for an Embedding: A = diag(token counts) / N (a vector),
    G = Σ_t g gᵀ / M; factored Tikhonov damping with π as ``KFACBlock``."""

    approximation = "kfac"
    damping_split = "pi"

    def _create_factors(self, add_variable, prefix, d_a, d_g):
        self.cov_a = add_variable((d_a,), "zeros", f"{prefix}_cov_a_diagonal")
        self.cov_g = add_variable((d_g, d_g), "zeros", f"{prefix}_cov_g")
        self._factors = (self.cov_a, self.cov_g)

    def _batch_sums(self, tokens, gs, num_examples):
        counts = _segment_sum(tf.ones_like(tokens, tf.float32), tokens, self.input_size)
        g_sum = fisher_factors.sample_gram(gs, gs, self.matmul_dtype)
        return counts, g_sum, tf.cast(tf.shape(tokens)[0], tf.float32), num_examples

    def statistics_from_sums(self, sums):
        counts, g_sum, num_samples, num_examples = sums
        return (
            tf.math.divide_no_nan(counts, tf.cast(num_examples, tf.float32)),
            tf.math.divide_no_nan(g_sum, num_samples),
        )

    def diagonal_kronecker_factors(self):
        return self._value(self.cov_a), self._value(self.cov_g)
