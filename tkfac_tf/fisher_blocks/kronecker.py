"""Kronecker-factored blocks: TKFAC (δ Φ ⊗ Ψ) and K-FAC (A ⊗ G), one per
layer, G of them batched for grouped convolutions, and several on one layer
(SeparableConv2D).

    precond(∇Θ) = L̂⁻¹ ∇Θ R̂⁻¹  =  (L̂ ⊗ R̂)⁻¹ vec(∇Θ)      (row-major vec)
"""

import tensorflow as tf

from tkfac_tf import fisher_factors
from tkfac_tf.fisher_blocks.base import (
    FisherBlock,
    inverse_eigenvalues,
    kron,
    multiply_in_eigenbasis,
    subset_of_examples,
)

class KroneckerFisherBlock(FisherBlock):
    """F̂ = P ⊗ Q for ∇Θ [d_a, d_g]: the damped inverse is L̂⁻¹ ∇Θ R̂⁻¹ with
    the damped factors of the subclass (TKFAC, K-FAC), L̂ = P + s_l I and
    R̂ = Q + s_r I. Subclasses define the factors (``_create_factors``,
    ``_batch_sums``, ``statistics_from_sums``, ``_shifts``,
    ``kronecker_factors``). The eigenbasis snapshot is (Q_P, e_P, Q_Q, e_Q)."""

    num_sums = 4  # the length of statistic_sums: three sums and the count

    def _create_state(self, add_variable, prefix, d_a, d_g):
        if self.eigenbasis:
            self.left_eigenvectors = add_variable((d_a, d_a), "identity", f"{prefix}_left_eigenvectors")
            self.left_eigenvalues = add_variable((d_a,), "zeros", f"{prefix}_left_eigenvalues")
            self.right_eigenvectors = add_variable((d_g, d_g), "identity", f"{prefix}_right_eigenvectors")
            self.right_eigenvalues = add_variable((d_g,), "zeros", f"{prefix}_right_eigenvalues")
        else:
            self.left_inverse = add_variable((d_a, d_a), "identity", f"{prefix}_left_inverse")
            self.right_inverse = add_variable((d_g, d_g), "identity", f"{prefix}_right_inverse")
        self._create_factors(add_variable, prefix, d_a, d_g)

    def _create_factors(self, add_variable, prefix, d_a, d_g):
        raise NotImplementedError

    def _batch_sums(self, a, gs, num_examples):
        """Sums additive over examples (replicas add theirs), counts included."""
        raise NotImplementedError

    def kronecker_factors(self):
        """(P [d_a, d_a], Q [d_g, d_g]) with the undamped approximate Fisher
        block F̂ = P ⊗ Q."""
        raise NotImplementedError

    def statistics_from_sums(self, sums):
        raise NotImplementedError

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        uses, grads_per_vector = subset_of_examples(uses, grads_per_vector, examples)
        return self._batch_sums(*self._samples(uses, grads_per_vector, axis=0))

    @property
    def reduces_positions(self) -> bool:
        """Whether the samples are one per example, not one per position: a
        convolution kind (it has ``mean_activations``) with
        ``conv_statistics='reduce'``, or with 'auto' a depthwise one."""
        if self.conv_statistics == "expand" or not hasattr(self.kind, "mean_activations"):
            return False
        return self.conv_statistics == "reduce" or getattr(self.kind, "depthwise", False)

    def _samples(self, uses, grads_per_vector, axis):
        """(a, gs [K, ...], N): the uses' activation and gradient samples,
        concatenated along ``axis`` (the samples axis), and the number of
        examples. One sample per (example, position), or where
        ``reduces_positions`` one per example: the activations averaged and
        the gradients summed over its positions (K-FAC-reduce, Eschenhagen
        et al. 2023), â ĝᵀ = Σ_t a_t g_tᵀ exactly when a or g is the same at
        every position."""
        if self.reduces_positions:
            activations = self.kind.mean_activations
            gradients = self.kind.summed_preactivation_gradients
        else:
            activations, gradients = self.kind.activations, self.kind.preactivation_gradients
        a = tf.concat([activations(use) for use in uses], axis=axis)
        gs = []
        for grads in grads_per_vector:
            per_use = []
            for use, grad in zip(uses, grads):
                if grad is None:
                    grad = tf.zeros_like(use.preactivation)
                per_use.append(gradients(use, grad))
            gs.append(tf.concat(per_use, axis=axis))
        num_examples = tf.cast(self.kind.num_examples(uses[0]), tf.float32)
        gs = tf.stack(gs) if len(gs) > 1 else tf.expand_dims(gs[0], 0)  # one vector: no copy
        return a, gs, num_examples

    def zero_sums(self):
        return self._batch_sums(
            tf.zeros([0, self.input_size]), tf.zeros([1, 0, self.output_size]), tf.zeros([])
        )

    def _inverse_variables(self):
        return [self.left_inverse, self.right_inverse]

    def _inverse_values(self, damping, method):
        """By ``fisher_factors.damped_inverse`` with ``method``."""
        damping = self.effective_damping(damping)
        left, right = self.kronecker_factors()
        left_shift, right_shift = self._factor_shifts(left, right, damping)
        return [
            self._damped_inverse(left, left_shift, self.left_inverse, method),
            self._damped_inverse(right, right_shift, self.right_inverse, method),
        ]

    def _multiply_inverse(self, matrix):
        """L̂⁻¹ ∇Θ R̂⁻¹ for ∇Θ [..., d_a, d_g] (two ``product``s in
        ``matmul_dtype``)."""
        left = fisher_factors.product("...ab,...bg->...ag", self.left_inverse, matrix, self.matmul_dtype)
        return fisher_factors.product("...ag,...gh->...ah", left, self.right_inverse, self.matmul_dtype)

    def _snapshot_variables(self):
        return [self.left_eigenvectors, self.left_eigenvalues,
                self.right_eigenvectors, self.right_eigenvalues]

    def _snapshot_values(self):
        left, right = self.kronecker_factors()
        return [*fisher_factors.eigenpairs(left), *fisher_factors.eigenpairs(right)]

    def _multiply_snapshot(self, matrix, damping):
        """(P + s_l I)⁻¹ ∇Θ (Q + s_r I)⁻¹ of the snapshot, the shifts (and a
        trace-scaled λ_l) from its eigenvalues: four ``product``s."""
        left_values = self._value(self.left_eigenvalues)
        right_values = self._value(self.right_eigenvalues)
        trace_left = tf.reduce_sum(left_values, axis=-1)
        trace_right = tf.reduce_sum(right_values, axis=-1)
        damping = self.effective_damping(damping, trace=trace_left * trace_right)
        left_shift, right_shift = self._shifts(trace_left, trace_right, damping)
        return multiply_in_eigenbasis(
            self._value(self.left_eigenvectors), inverse_eigenvalues(left_values, left_shift),
            matrix,
            self._value(self.right_eigenvectors), inverse_eigenvalues(right_values, right_shift),
            self.matmul_dtype,
        )

    def multiply_fisher(self, matrix):
        """P V Q = (P ⊗ Q) vec(V) for V [d_a, d_g] (undamped, row-major vec)."""
        left, right = self.kronecker_factors()
        return tf.matmul(tf.matmul(left, matrix), right)

    def full_fisher(self):
        """P ⊗ Q as a dense [d_a·d_g, d_a·d_g] matrix (row-major order)."""
        return kron(*self.kronecker_factors())

    def trace(self):
        """tr(P ⊗ Q) = tr P · tr Q, a float32 scalar."""
        left, right = self.kronecker_factors()
        return tf.linalg.trace(left) * tf.linalg.trace(right)


class TKFACBlock(KroneckerFisherBlock):
    """Trace-restricted block: F ≈ δ Φ ⊗ Ψ (Gao et al. 2021, Eq. 4.9).

    State: L = EMA of √δ Φ [d_a, d_a] and R = EMA of √δ Ψ [d_g, d_g].
    Damping: Φ̂ = L + √λ I,  Ψ̂ = R + √λ I (``damping_split`` 'sqrt', the
    paper's rule), or with 'pi' Φ̂ = L + π√λ I, Ψ̂ = R + (√λ/π) I,
    π = √(d_g / d_a) (``damping_shifts``). Approximate Fisher: L ⊗ R, which
    for a single batch is δ Φ ⊗ Ψ (trace δ); ``delta``, ``phi`` and ``psi``
    are read off the averaged state as tr L · tr R, L / tr L and R / tr R.
    """

    approximation = "tkfac"
    damping_split = "sqrt"  # the estimator sets the optimizer's choice

    def _create_factors(self, add_variable, prefix, d_a, d_g):
        self.left_factor = add_variable((d_a, d_a), "zeros", f"{prefix}_sqrt_delta_phi")
        self.right_factor = add_variable((d_g, d_g), "zeros", f"{prefix}_sqrt_delta_psi")
        self._factors = (self.left_factor, self.right_factor)

    def _batch_sums(self, a, gs, num_examples):
        return (*fisher_factors.tkfac_sums(a, gs, self.matmul_dtype), num_examples)

    def statistics_from_sums(self, sums):
        """(√δ Φ, √δ Ψ) from (δ_sum, Φ_sum, Ψ_sum, N)."""
        delta, phi, psi = fisher_factors.tkfac_from_sums(*sums)
        sqrt_delta = tf.sqrt(delta)
        return sqrt_delta * phi, sqrt_delta * psi

    @property
    def delta(self):
        """tr L · tr R: δ after one update, (EMA of √δ)² after several."""
        return self.trace()

    @property
    def phi(self):
        """L / tr L (unit trace; zero while L is)."""
        left = self._value(self.left_factor)
        return tf.math.divide_no_nan(left, tf.linalg.trace(left))

    @property
    def psi(self):
        """R / tr R (unit trace; zero while R is)."""
        right = self._value(self.right_factor)
        return tf.math.divide_no_nan(right, tf.linalg.trace(right))

    def kronecker_factors(self):
        """(L, R): F̂ = L ⊗ R (= δ Φ ⊗ Ψ for a single batch)."""
        return self._value(self.left_factor), self._value(self.right_factor)


class KFACBlock(KroneckerFisherBlock):
    """Classic K-FAC block: F ≈ A ⊗ G, with factored Tikhonov damping

        Â = A + π √λ I,   Ĝ = G + (√λ / π) I,   π = √((tr A / d_a) / (tr G / d_g))

    (Martens & Grosse 2015, §6.3; π = 1 when a trace is zero).
    """

    approximation = "kfac"
    damping_split = "pi"

    def _create_factors(self, add_variable, prefix, d_a, d_g):
        self.cov_a = add_variable((d_a, d_a), "zeros", f"{prefix}_cov_a")
        self.cov_g = add_variable((d_g, d_g), "zeros", f"{prefix}_cov_g")
        self._factors = (self.cov_a, self.cov_g)

    def _batch_sums(self, a, gs, num_examples):
        return (*fisher_factors.kfac_sums(a, gs, self.matmul_dtype), num_examples)

    def statistics_from_sums(self, sums):
        """(A, G) from (A_sum, G_sum, M, N)."""
        return fisher_factors.kfac_from_sums(*sums)

    def kronecker_factors(self):
        """(A, G): F̂ = A ⊗ G."""
        return self._value(self.cov_a), self._value(self.cov_g)


BLOCK_CLASSES = {"tkfac": TKFACBlock, "kfac": KFACBlock}


# --- grouped (batched) blocks: grouped convolutions, depthwise convolutions -----
def batched_identity(shape, dtype=None):
    """Initializer: identity matrices [G, d, d]."""
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype or tf.float32)


def block_diagonal(matrices):
    """Dense block-diagonal matrix of a list of square matrices."""
    operators = [tf.linalg.LinearOperatorFullMatrix(m) for m in matrices]
    return tf.linalg.LinearOperatorBlockDiag(operators).to_dense()


class _GroupedBlockMixin:
    """G independent Kronecker blocks of equal sizes (one per group of a
    grouped / depthwise convolution) stored as batches: every factor and
    inverse is [G, d, d], inverted in one batched ``damped_inverse``. ∇Θ is
    [G, d_a, d_g]; ``full_fisher`` is block-diagonal over groups in the
    row-major order of that array; the trace is the sum over groups. With
    ``damping_mode='trace_scaled'`` every group has its own
    λ_g = max(tr F̂_g / (d_a·d_g), ν).
    """

    def __init__(self, name, input_size, output_size, add_variable, groups, **options):
        self.groups = int(groups)

        def add_group_variable(shape, initializer, variable_name):
            if initializer == "identity":
                initializer = batched_identity
            return add_variable((self.groups, *shape), initializer, variable_name)

        super().__init__(name, input_size, output_size, add_group_variable, **options)

    def bind(self, kind):
        if getattr(kind, "groups", 1) != self.groups:
            raise ValueError(
                f"Layer '{kind.layer.name}' has {getattr(kind, 'groups', 1)} "
                f"groups but the optimizer's block '{self.name}' was built for "
                f"{self.groups}: the layer collection does not match the "
                "optimizer's saved state."
            )
        super().bind(kind)

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        uses, grads_per_vector = subset_of_examples(uses, grads_per_vector, examples)
        return self._batch_sums(*self._samples(uses, grads_per_vector, axis=-2))

    def group_traces(self):
        """tr P_g · tr Q_g per group, [G]."""
        left, right = self.kronecker_factors()
        return tf.linalg.trace(left) * tf.linalg.trace(right)

    def trace(self):
        return tf.reduce_sum(self.group_traces())

    def effective_damping(self, damping, trace=None):
        """λ ([]) when 'plain'; per group max(tr F̂_g / (d_a·d_g), ν) ([G]),
        tr F̂_g = ``trace`` [G] (the snapshot's) or ``group_traces()``; plus
        ``penalty_damping``."""
        if self.damping_mode == "plain":
            return self._with_penalty(tf.cast(damping, tf.float32))
        traces = self.group_traces() if trace is None else trace
        mean = traces / float(self.input_size * self.output_size)
        return self._with_penalty(tf.maximum(mean, self.damping_floor))

    def zero_sums(self):
        return self._batch_sums(
            tf.zeros([self.groups, 0, self.input_size]),
            tf.zeros([1, self.groups, 0, self.output_size]),
            tf.zeros([]),
        )

    def full_fisher(self):
        left, right = self.kronecker_factors()
        return block_diagonal(
            [kron(left[g], right[g]) for g in range(self.groups)]
        )


class GroupedTKFACBlock(_GroupedBlockMixin, TKFACBlock):
    """TKFAC per group: F_g ≈ δ_g Φ_g ⊗ Ψ_g, state L [G, d_a, d_a] = EMA of
    √δ_g Φ_g and R [G, d_g, d_g] = EMA of √δ_g Ψ_g. ``delta`` [G], ``phi``,
    ``psi`` per group."""

    def _batch_sums(self, a, gs, num_examples):
        return (*fisher_factors.grouped_tkfac_sums(a, gs, self.matmul_dtype), num_examples)

    def statistics_from_sums(self, sums):
        delta, phi, psi = fisher_factors.grouped_tkfac_from_sums(*sums)
        sqrt_delta = tf.sqrt(delta)[:, None, None]
        return sqrt_delta * phi, sqrt_delta * psi

    @property
    def delta(self):
        return self.group_traces()

    @property
    def phi(self):
        left = self._value(self.left_factor)
        return tf.math.divide_no_nan(left, tf.linalg.trace(left)[:, None, None])

    @property
    def psi(self):
        right = self._value(self.right_factor)
        return tf.math.divide_no_nan(right, tf.linalg.trace(right)[:, None, None])


class GroupedKFACBlock(_GroupedBlockMixin, KFACBlock):
    """K-FAC per group: F_g ≈ A_g ⊗ G_g with its own π_g."""

    def _batch_sums(self, a, gs, num_examples):
        return (*fisher_factors.grouped_kfac_sums(a, gs, self.matmul_dtype), num_examples)


GROUPED_BLOCK_CLASSES = {"tkfac": GroupedTKFACBlock, "kfac": GroupedKFACBlock}


# --- several Kronecker blocks on one layer (SeparableConv2D) -------------------
def _set_on_every_part(name):
    """A property of a ``MultiPartBlock`` that reads attribute ``name`` of
    its first part and assigns it to every part."""

    def set_all(self, value):
        for block in self.parts:
            setattr(block, name, value)

    return property(lambda self: getattr(self.parts[0], name), set_all)


class MultiPartBlock(FisherBlock):
    """The blocks of a layer with several kernels (SeparableConv2D: depthwise
    and pointwise), one per part of its kind (``kind.parts``), presented as
    one block: ∇Θ is the tuple of the parts' matrices, the factor variables
    and statistic sums are the parts' in order, ``full_fisher`` is
    block-diagonal (no cross terms between the parts)."""

    def __init__(self, name, parts):
        self.name = name
        self.parts = list(parts)
        self.kind = None
        self.approximation = self.parts[0].approximation
        self.damping_mode = self.parts[0].damping_mode
        self.inverse_method = self.parts[0].inverse_method

    # Per-optimizer settings the estimator assigns: read from the first
    # part, written to every part.
    matmul_dtype = _set_on_every_part("matmul_dtype")
    conv_statistics = _set_on_every_part("conv_statistics")
    damping_split = _set_on_every_part("damping_split")

    @property
    def penalty_damping(self):
        """The parts' κ̄ (each part is damped with its own)."""
        return [block.penalty_damping for block in self.parts]

    @property
    def reduces_positions(self):
        """Whether every part takes one sample per example (else the parts
        share the example subset of the expanded ones)."""
        return all(block.reduces_positions for block in self.parts)

    def bind(self, kind):
        parts = getattr(kind, "parts", None)
        if parts is None or len(parts) != len(self.parts):
            raise ValueError(
                f"Layer '{kind.layer.name}' does not have the {len(self.parts)} "
                f"parts the optimizer's block '{self.name}' was built for: the "
                "layer collection does not match the optimizer's saved state."
            )
        for block, part in zip(self.parts, parts):
            block.bind(part)
        self.kind = kind

    @property
    def factor_variables(self):
        return [v for block in self.parts for v in block.factor_variables]

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        """The parts' sums, concatenated (flat tuple), over ``examples``
        (gathered once for all parts)."""
        uses, grads_per_vector = subset_of_examples(uses, grads_per_vector, examples)
        return tuple(
            s for block in self.parts for s in block.statistic_sums(uses, grads_per_vector)
        )

    def statistics_from_sums(self, sums):
        sums, out = tuple(sums), []
        for block in self.parts:
            count = block.num_sums
            out.extend(block.statistics_from_sums(sums[:count]))
            sums = sums[count:]
        return tuple(out)

    def effective_damping(self, damping):
        return [block.effective_damping(damping) for block in self.parts]

    def zero_sums(self):
        return tuple(s for block in self.parts for s in block.zero_sums())

    @property
    def inverse_variables(self):
        return [v for block in self.parts for v in block.inverse_variables]

    def inverse_values(self, damping, method="cholesky"):
        return [v for block in self.parts for v in block.inverse_values(damping, method=method)]

    def multiply_inverse(self, matrices, damping=None):
        return tuple(b.multiply_inverse(m, damping) for b, m in zip(self.parts, matrices))

    def multiply_fisher(self, matrices):
        return tuple(b.multiply_fisher(m) for b, m in zip(self.parts, matrices))

    def full_fisher(self):
        return block_diagonal([block.full_fisher() for block in self.parts])

    def trace(self):
        return tf.add_n([block.trace() for block in self.parts])
