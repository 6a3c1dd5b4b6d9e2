"""Fisher blocks: per-layer factor state, damped inverses and preconditioning.

One block per registered layer. The block holds running averages of its
Kronecker factors and the inverses of their damped forms, and implements

    precond(∇Θ) = L̂⁻¹ ∇Θ R̂⁻¹  =  (L̂ ⊗ R̂)⁻¹ vec(∇Θ)      (row-major vec)

for ∇Θ [d_a, d_g]. ``full_fisher()`` returns the undamped approximation as a
dense [d_a·d_g, d_a·d_g] matrix in the same row-major order.

What is averaged (exponential moving average with decay ε, the first update
initialises): TKFAC averages the undamped halves of the seed's damped
factors, L = √δ Φ and R = √δ Ψ, each batch's own √δ times its own Φ, Ψ
(Gao et al. keep the EMA of Φ̂ = √δ Φ + √λ I and Ψ̂ = √δ Ψ + √λ I; adding
√λ I at inversion time gives the same numbers while λ is constant, and lets
a damping change take effect at the next inversion). K-FAC averages A and G.

Damping: by default ('plain') every block uses the optimizer's λ. With
``damping_mode='trace_scaled'`` (offered for conv blocks, our reading of the
conv damping of Gao et al. 2021) a block uses

    λ_l = max(δ_l / n_l, ν)

with δ_l the trace of its approximate Fisher (TKFAC: tr L · tr R, which is
δ for a single batch; K-FAC: tr(A ⊗ G) = tr(A)·tr(G)), n_l = d_a·d_g its parameter count and ν the floor,
i.e. the mean eigenvalue of the block, so the damping scales with the
block's own curvature instead of one global λ dominating small blocks.
"""

import tensorflow as tf

from tkfac_tf import capture
from tkfac_tf import fisher_factors

DAMPING_MODES = ("plain", "trace_scaled")
DAMPING_SPLITS = ("sqrt", "pi")


def _kron(left, right):
    """Dense Kronecker product [p, p] ⊗ [q, q] -> [p·q, p·q]."""
    p, q = tf.shape(left)[0], tf.shape(right)[0]
    return tf.reshape(left[:, None, :, None] * right[None, :, None, :], [p * q, p * q])


def damping_shifts(split, trace_a, trace_g, d_a, d_g, damping):
    """The shifts (s_a, s_g) added to the two factors, P + s_a I and
    Q + s_g I, for damping λ: 'sqrt' gives (√λ, √λ) (the TKFAC paper's
    rule), 'pi' K-FAC's factored Tikhonov shifts (π √λ, √λ / π) with
    π = √((tr P / d_a) / (tr Q / d_g)) (1 while a trace is zero). For TKFAC
    tr L = tr R, so π = √(d_g / d_a). Traces may be batched ([G] for
    grouped blocks)."""
    if split == "sqrt":
        sqrt_damping = tf.sqrt(tf.cast(damping, tf.float32))
        return sqrt_damping, sqrt_damping
    mean_a = trace_a / float(d_a)
    mean_g = trace_g / float(d_g)
    pi = tf.where(
        (mean_a > 0.0) & (mean_g > 0.0),
        tf.sqrt(tf.math.divide_no_nan(mean_a, mean_g)),
        1.0,
    )
    sqrt_damping = tf.sqrt(tf.cast(damping, tf.float32))
    return pi * sqrt_damping, sqrt_damping / pi


def subset_of_examples(uses, grads_per_vector, examples):
    """The uses and their pre-activation gradients restricted to
    ``examples`` (int32 [m] indices of their leading, examples axis), or
    unchanged when ``examples`` is None. Only the restricted inputs' patches
    and samples are formed afterwards."""
    if examples is None:
        return uses, grads_per_vector

    def take(tensor):
        return tf.gather(tensor, examples)

    subset = [capture.LayerUse(take(u.inputs), take(u.preactivation), None) for u in uses]
    grads = [[None if g is None else take(g) for g in grads] for grads in grads_per_vector]
    return subset, grads


class KroneckerFisherBlock:
    """Shared machinery. Subclasses define the factors and their damping.

    The state is created from the sizes alone, so a block can exist (e.g.
    while a saved optimizer is being loaded) before it is bound to its layer.

    Args:
      name: the layer's name (prefix of the variable names).
      input_size, output_size: d_a and d_g.
      add_variable: callable(shape, initializer, name) -> variable, used to
        create the block's state (the optimizer's tracked variables).
      damping_mode: 'plain' (λ_l = the optimizer's λ) or 'trace_scaled'
        (λ_l = max(δ_l / n_l, damping_floor)); see the module docstring.
      damping_floor: ν > 0, the floor of the trace-scaled damping.
    """

    approximation = None
    # Input dtype of the statistics and preconditioning products
    # (``fisher_factors.product``); the estimator sets it per optimizer.
    matmul_dtype = tf.float32

    def __init__(self, name, input_size, output_size, add_variable,
                 damping_mode="plain", damping_floor=1e-6):
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"damping_mode must be one of {DAMPING_MODES}; got {damping_mode!r}."
            )
        if not damping_floor > 0:
            raise ValueError(f"damping_floor must be > 0; got {damping_floor!r}.")
        self.name = name
        self.input_size, self.output_size = input_size, output_size
        self.damping_mode = damping_mode
        self.damping_floor = float(damping_floor)
        self.kind = None
        d_a, d_g = input_size, output_size
        prefix = name.replace("/", "_")  # a layer path (EinsumDense) -> a variable name
        self.left_inverse = add_variable((d_a, d_a), "identity", f"{prefix}_left_inverse")
        self.right_inverse = add_variable((d_g, d_g), "identity", f"{prefix}_right_inverse")
        self._create_factors(add_variable, prefix, d_a, d_g)

    def bind(self, kind):
        """Attaches the layer kind (layout of the layer's samples and grads)."""
        if (kind.input_size, kind.output_size) != (self.input_size, self.output_size):
            raise ValueError(
                f"Layer '{kind.layer.name}' has factor sizes "
                f"({kind.input_size}, {kind.output_size}) but the optimizer's "
                f"block '{self.name}' was built for ({self.input_size}, "
                f"{self.output_size}): the layer collection does not match "
                "the optimizer's saved state."
            )
        self.kind = kind

    @property
    def layer(self):
        return self.kind.layer if self.kind is not None else None

    # --- subclass interface -------------------------------------------------
    def _create_factors(self, add_variable, prefix, d_a, d_g):
        raise NotImplementedError

    def _batch_sums(self, a, gs, num_examples):
        """Sums additive over examples (replicas add theirs), counts included."""
        raise NotImplementedError

    def statistics_from_sums(self, sums):
        """The factor statistics, in the order of ``factor_variables``, from
        ``statistic_sums`` (of one batch, or added over replicas)."""
        raise NotImplementedError

    def _damped_factors(self, damping):
        """(left factor, left shift, right factor, right shift) for inversion."""
        raise NotImplementedError

    def kronecker_factors(self):
        """(P [d_a, d_a], Q [d_g, d_g]) with the undamped approximate Fisher
        block F̂ = P ⊗ Q."""
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------
    @property
    def factor_variables(self):
        return list(self._factors)

    def statistic_sums(self, uses, grads_per_vector, examples=None):
        """This batch's sums (additive over examples, counts included) from
        recorded uses; ``statistics_from_sums`` turns them into statistics.

        Args:
          uses: list of LayerUse of this layer in the trace.
          grads_per_vector: list over K backward vectors of lists over uses of
            d(...)/d(pre-activation) tensors (None where unconnected).
          examples: None (every example) or int32 [m]: the examples (leading
            axis of every use) summed; the count is then m.
        Returns:
          tuple of float32 tensors.
        """
        uses, grads_per_vector = subset_of_examples(uses, grads_per_vector, examples)
        a = tf.concat([self.kind.activations(use) for use in uses], axis=0)
        gs = []
        for grads in grads_per_vector:
            per_use = []
            for use, grad in zip(uses, grads):
                if grad is None:
                    grad = tf.zeros_like(use.preactivation)
                per_use.append(self.kind.preactivation_gradients(use, grad))
            gs.append(tf.concat(per_use, axis=0))
        num_examples = tf.cast(self.kind.num_examples(uses[0]), tf.float32)
        return self._batch_sums(a, tf.stack(gs), num_examples)

    def zero_sums(self):
        """Sums of an empty batch (zeros shaped like ``statistic_sums``)."""
        return self._batch_sums(
            tf.zeros([0, self.input_size]), tf.zeros([1, 0, self.output_size]), tf.zeros([])
        )

    def statistics(self, uses, grads_per_vector):
        """This batch's factor statistics, in the order of ``factor_variables``."""
        return self.statistics_from_sums(self.statistic_sums(uses, grads_per_vector))

    def effective_damping(self, damping):
        """λ_l of this block: ``damping`` (λ) when 'plain', else
        max(trace() / n_l, ν)."""
        if self.damping_mode == "plain":
            return tf.cast(damping, tf.float32)
        mean_eigenvalue = self.trace() / float(self.input_size * self.output_size)
        return tf.maximum(mean_eigenvalue, self.damping_floor)

    @property
    def inverse_variables(self):
        """The variables ``update_inverse`` assigns, in a fixed order."""
        return [self.left_inverse, self.right_inverse]

    def inverse_values(self, damping, method="cholesky"):
        """The damped factors' inverses (in the order of
        ``inverse_variables``) from the averages, with damping
        λ_l = effective_damping(damping), by ``fisher_factors.damped_inverse``
        with ``method`` (warm-started from the current inverses)."""
        damping = self.effective_damping(damping)
        left, left_shift, right, right_shift = self._damped_factors(damping)
        return [
            self._damped_inverse(left, left_shift, self.left_inverse, method),
            self._damped_inverse(right, right_shift, self.right_inverse, method),
        ]

    def _damped_inverse(self, matrix, shift, variable, method):
        """``damped_inverse`` of one factor whose inverse is ``variable``."""
        return fisher_factors.damped_inverse(
            matrix, shift, method=method, previous=self._value(variable)
        )

    def update_inverse(self, damping, method="cholesky"):
        """Recomputes the inverses of the damped factors from the averages."""
        values = self.inverse_values(damping, method=method)
        for variable, value in zip(self.inverse_variables, values):
            variable.assign(value)

    def multiply_inverse(self, matrix):
        """L̂⁻¹ ∇Θ R̂⁻¹ for ∇Θ [..., d_a, d_g] (two ``product``s in
        ``matmul_dtype``)."""
        left = fisher_factors.product("...ab,...bg->...ag", self.left_inverse, matrix, self.matmul_dtype)
        return fisher_factors.product("...ag,...gh->...ah", left, self.right_inverse, self.matmul_dtype)

    def multiply_fisher(self, matrix):
        """P V Q = (P ⊗ Q) vec(V) for V [d_a, d_g] (undamped, row-major vec)."""
        left, right = self.kronecker_factors()
        return tf.matmul(tf.matmul(left, matrix), right)

    def full_fisher(self):
        """P ⊗ Q as a dense [d_a·d_g, d_a·d_g] matrix (row-major order)."""
        return _kron(*self.kronecker_factors())

    def trace(self):
        """tr(P ⊗ Q) = tr P · tr Q, a float32 scalar."""
        left, right = self.kronecker_factors()
        return tf.linalg.trace(left) * tf.linalg.trace(right)

    def _value(self, variable):
        return tf.convert_to_tensor(variable)


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

    def _damped_factors(self, damping):
        left, right = self._value(self.left_factor), self._value(self.right_factor)
        shift_left, shift_right = damping_shifts(
            self.damping_split, tf.linalg.trace(left), tf.linalg.trace(right),
            self.input_size, self.output_size, damping,
        )
        return left, shift_left, right, shift_right

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

    def _damped_factors(self, damping):
        cov_a, cov_g = self._value(self.cov_a), self._value(self.cov_g)
        shift_a, shift_g = damping_shifts(
            self.damping_split, tf.linalg.trace(cov_a), tf.linalg.trace(cov_g),
            self.input_size, self.output_size, damping,
        )
        return cov_a, shift_a, cov_g, shift_g

    def kronecker_factors(self):
        """(A, G): F̂ = A ⊗ G."""
        return self._value(self.cov_a), self._value(self.cov_g)


BLOCK_CLASSES = {"tkfac": TKFACBlock, "kfac": KFACBlock}


# --- grouped (batched) blocks: grouped convolutions, depthwise convolutions -----
def batched_identity(shape, dtype=None):
    """Initializer: identity matrices [G, d, d]."""
    return tf.eye(shape[-1], batch_shape=shape[:-2], dtype=dtype or tf.float32)


def _block_diagonal(matrices):
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

    def __init__(self, name, input_size, output_size, add_variable, groups,
                 damping_mode="plain", damping_floor=1e-6):
        self.groups = int(groups)

        def add_group_variable(shape, initializer, variable_name):
            if initializer == "identity":
                initializer = batched_identity
            return add_variable((self.groups, *shape), initializer, variable_name)

        super().__init__(name, input_size, output_size, add_group_variable,
                         damping_mode=damping_mode, damping_floor=damping_floor)

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
        a = tf.concat([self.kind.activations(use) for use in uses], axis=-2)
        gs = []
        for grads in grads_per_vector:
            per_use = []
            for use, grad in zip(uses, grads):
                if grad is None:
                    grad = tf.zeros_like(use.preactivation)
                per_use.append(self.kind.preactivation_gradients(use, grad))
            gs.append(tf.concat(per_use, axis=-2))
        num_examples = tf.cast(self.kind.num_examples(uses[0]), tf.float32)
        return self._batch_sums(a, tf.stack(gs), num_examples)

    def group_traces(self):
        """tr P_g · tr Q_g per group, [G]."""
        left, right = self.kronecker_factors()
        return tf.linalg.trace(left) * tf.linalg.trace(right)

    def trace(self):
        return tf.reduce_sum(self.group_traces())

    def effective_damping(self, damping):
        """λ ([]) when 'plain'; per group max(tr F̂_g / (d_a·d_g), ν) ([G])."""
        if self.damping_mode == "plain":
            return tf.cast(damping, tf.float32)
        mean = self.group_traces() / float(self.input_size * self.output_size)
        return tf.maximum(mean, self.damping_floor)

    def zero_sums(self):
        return self._batch_sums(
            tf.zeros([self.groups, 0, self.input_size]),
            tf.zeros([1, self.groups, 0, self.output_size]),
            tf.zeros([]),
        )

    def full_fisher(self):
        left, right = self.kronecker_factors()
        return _block_diagonal(
            [_kron(left[g], right[g]) for g in range(self.groups)]
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
class MultiPartBlock:
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

    @property
    def layer(self):
        return self.kind.layer if self.kind is not None else None

    @property
    def matmul_dtype(self):
        return self.parts[0].matmul_dtype

    @matmul_dtype.setter
    def matmul_dtype(self, dtype):
        for block in self.parts:
            block.matmul_dtype = dtype

    @property
    def damping_split(self):
        return self.parts[0].damping_split

    @damping_split.setter
    def damping_split(self, split):
        for block in self.parts:
            block.damping_split = split

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

    def statistics(self, uses, grads_per_vector):
        return self.statistics_from_sums(self.statistic_sums(uses, grads_per_vector))

    def effective_damping(self, damping):
        return [block.effective_damping(damping) for block in self.parts]

    def zero_sums(self):
        return tuple(s for block in self.parts for s in block.zero_sums())

    @property
    def inverse_variables(self):
        return [v for block in self.parts for v in block.inverse_variables]

    def inverse_values(self, damping, method="cholesky"):
        return [v for block in self.parts for v in block.inverse_values(damping, method=method)]

    def update_inverse(self, damping, method="cholesky"):
        for block in self.parts:
            block.update_inverse(damping, method=method)

    def multiply_inverse(self, matrices):
        return tuple(b.multiply_inverse(m) for b, m in zip(self.parts, matrices))

    def multiply_fisher(self, matrices):
        return tuple(b.multiply_fisher(m) for b, m in zip(self.parts, matrices))

    def full_fisher(self):
        return _block_diagonal([block.full_fisher() for block in self.parts])

    def trace(self):
        return tf.add_n([block.trace() for block in self.parts])


TKFACBlock.num_sums = 4  # (δ_sum, Φ_sum, Ψ_sum, N)
KFACBlock.num_sums = 4  # (A_sum, G_sum, M, N)


def make_block(approximation, entry, add_variable, damping_mode="plain", damping_floor=1e-6):
    """The block for one entry of ``LayerCollection.get_config()['layers']``:
    the block of its structure (embedding, scale-and-shift, diagonal), or a
    Kronecker block: plain, grouped (``groups`` > 1) or multi-part
    (``parts``)."""
    name = entry["layer"]

    def single(spec, prefix):
        groups = int(spec.get("groups", 1))
        if groups > 1:
            return GROUPED_BLOCK_CLASSES[approximation](
                prefix, spec["input_size"], spec["output_size"], add_variable, groups,
                damping_mode=damping_mode, damping_floor=damping_floor,
            )
        return BLOCK_CLASSES[approximation](
            prefix, spec["input_size"], spec["output_size"], add_variable,
            damping_mode=damping_mode, damping_floor=damping_floor,
        )

    structure = entry.get("structure", "kronecker")
    if structure != "kronecker":
        return block_class(structure, approximation)(
            name, entry["input_size"], entry["output_size"], add_variable,
            damping_mode=damping_mode, damping_floor=damping_floor,
        )
    if entry.get("parts"):
        return MultiPartBlock(
            name, [single(part, f"{name}_part{i}") for i, part in enumerate(entry["parts"])]
        )
    return single(entry, name)


# --- blocks of the other layer kinds -----------------------------------------
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


class _BlockBase:
    """Shared parts of the non-Kronecker-matrix blocks: construction from the
    saved sizes (as ``KroneckerFisherBlock``), binding, statistics."""

    approximation = None
    matmul_dtype = tf.float32  # as KroneckerFisherBlock's

    def __init__(self, name, input_size, output_size, add_variable,
                 damping_mode="plain", damping_floor=1e-6):
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"damping_mode must be one of {DAMPING_MODES}; got {damping_mode!r}."
            )
        self.name = name
        self.input_size, self.output_size = input_size, output_size
        self.damping_mode = damping_mode
        self.damping_floor = float(damping_floor)
        self.kind = None
        prefix = name.replace("/", "_")
        self._create_state(add_variable, prefix, input_size, output_size)

    bind = KroneckerFisherBlock.bind
    layer = KroneckerFisherBlock.layer
    factor_variables = KroneckerFisherBlock.factor_variables
    effective_damping = KroneckerFisherBlock.effective_damping
    update_inverse = KroneckerFisherBlock.update_inverse
    _damped_inverse = KroneckerFisherBlock._damped_inverse
    _value = KroneckerFisherBlock._value

    def statistics(self, uses, grads_per_vector):
        return self.statistics_from_sums(self.statistic_sums(uses, grads_per_vector))

    @staticmethod
    def _grads(uses, grads):
        return [tf.zeros_like(u.preactivation) if g is None else g for u, g in zip(uses, grads)]


class _DiagonalLeftKroneckerBlock(_BlockBase):
    """F̂ = diag(l) ⊗ R for ∇Θ [d_a, d_g] (Embedding): the left factor is a
    vector l [d_a], the right one a matrix R [d_g, d_g]. Damped inverse:
    (l + s_l)⁻¹ and (R + s_r I)⁻¹ with the shifts of the subclass."""

    def _create_state(self, add_variable, prefix, d_a, d_g):
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

    @property
    def inverse_variables(self):
        return [self.left_inverse, self.right_inverse]

    def inverse_values(self, damping, method="cholesky"):
        damping = self.effective_damping(damping)
        left, left_shift, right, right_shift = self._damped_factors(damping)
        return [
            1.0 / (tf.maximum(left, 0.0) + left_shift),
            self._damped_inverse(right, right_shift, self.right_inverse, method),
        ]

    def multiply_inverse(self, matrix):
        right = fisher_factors.product("vd,de->ve", matrix, self.right_inverse, self.matmul_dtype)
        return self._value(self.left_inverse)[:, None] * right

    def multiply_fisher(self, matrix):
        left, right = self.diagonal_kronecker_factors()
        return left[:, None] * tf.matmul(matrix, right)

    def kronecker_factors(self):
        """(diag(l), R) as dense matrices (tests; F̂ = P ⊗ Q)."""
        left, right = self.diagonal_kronecker_factors()
        return tf.linalg.diag(left), right

    def full_fisher(self):
        return _kron(*self.kronecker_factors())

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
        g_sq = tf.reduce_sum(tf.square(gs), axis=-1)  # [K, M]
        g_sq_per_sample = tf.reduce_sum(g_sq, axis=0)  # [M]
        delta_sum = tf.reduce_sum(g_sq_per_sample)
        phi_sum = _segment_sum(g_sq_per_sample, tokens, self.input_size)
        psi_sum = fisher_factors.product("kmd,kme->de", gs, gs, self.matmul_dtype)
        return delta_sum, phi_sum, psi_sum, num_examples

    def statistics_from_sums(self, sums):
        delta, phi, psi = fisher_factors.tkfac_from_sums(*sums)
        sqrt_delta = tf.sqrt(delta)
        return sqrt_delta * phi, sqrt_delta * psi

    def _damped_factors(self, damping):
        left, right = self._value(self.left_factor), self._value(self.right_factor)
        shift_left, shift_right = damping_shifts(
            self.damping_split, tf.reduce_sum(left), tf.linalg.trace(right),
            self.input_size, self.output_size, damping,
        )
        return left, shift_left, right, shift_right

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
        g_sum = fisher_factors.product("kmd,kme->de", gs, gs, self.matmul_dtype)
        return counts, g_sum, tf.cast(tf.shape(tokens)[0], tf.float32), num_examples

    def statistics_from_sums(self, sums):
        counts, g_sum, num_samples, num_examples = sums
        return (
            tf.math.divide_no_nan(counts, tf.cast(num_examples, tf.float32)),
            tf.math.divide_no_nan(g_sum, num_samples),
        )

    def _damped_factors(self, damping):
        cov_a, cov_g = self._value(self.cov_a), self._value(self.cov_g)
        shift_a, shift_g = damping_shifts(
            self.damping_split, tf.reduce_sum(cov_a), tf.linalg.trace(cov_g),
            self.input_size, self.output_size, damping,
        )
        return cov_a, shift_a, cov_g, shift_g

    def diagonal_kronecker_factors(self):
        return self._value(self.cov_a), self._value(self.cov_g)


class _MomentBlock(_BlockBase):
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


def block_class(structure, approximation):
    """The block class of a non-Kronecker ``structure`` of a layer kind
    ('embedding', 'scale_and_shift', 'diagonal', 'full') for 'tkfac' / 'kfac'."""
    if structure == "embedding":
        return {"tkfac": EmbeddingTKFACBlock, "kfac": EmbeddingKFACBlock}[approximation]
    if structure == "scale_and_shift":
        return ScaleAndShiftBlock
    if structure == "diagonal":
        return DiagonalBlock
    if structure == "full":
        return FullBlock
    raise ValueError(f"Unknown block structure {structure!r}.")
