"""The interface every Fisher block implements, and what blocks share.

A block holds one layer's curvature estimate: running averages of its
factors (``factor_variables``), the inverses of their damped forms
(``inverse_variables``), and the products with a gradient matrix ∇Θ of the
layer (``multiply_inverse``: the damped inverse; ``multiply_fisher``: the
undamped estimate F̂). Statistics arrive as sums additive over examples
(``statistic_sums``; replicas add theirs), turned into the factors'
statistics by ``statistics_from_sums``.

Two forms of the inverse state (``inverse_method``):
  * 'cholesky' / 'eigh' / 'newton_schulz': the damped factors' inverses,
    computed with the damping of the inverse update and used as they are
    until the next one;
  * 'eigenbasis': a snapshot of the factors in a form whose damped inverse
    is a few products away (eigenvectors and eigenvalues of every matrix
    factor, the values of every diagonal or 2×2 one), taken at the inverse
    update; ``multiply_inverse`` damps it with the damping it is given, so
    a change of λ applies at the very next step. Until the first snapshot
    the preconditioner is the identity, as the other methods' initial
    inverses.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from tkfac_tf import capture
from tkfac_tf import fisher_factors

DAMPING_MODES = ("plain", "trace_scaled")
DAMPING_SPLITS = ("sqrt", "pi")
CONV_STATISTICS = ("auto", "expand", "reduce")
EIGENBASIS = "eigenbasis"
INVERSE_METHODS = fisher_factors.INVERSE_METHODS + (EIGENBASIS,)
"""The optimizer's ``inverse_method`` choices: ``damped_inverse``'s, and the
eigenbasis snapshot (module docstring)."""


def inverse_eigenvalues(eigenvalues, shift):
    """1 / (e + s) [..., d] for eigenvalues e [..., d] ≥ 0 and shifts s ([]
    or the batch shape [...]): the damped inverse's eigenvalues."""
    return 1.0 / (eigenvalues + tf.convert_to_tensor(shift, tf.float32)[..., None])


def multiply_in_eigenbasis(left_vectors, left_scale, matrix, right_vectors, right_scale,
                           matmul_dtype=tf.float32):
    """Q_l [(Q_lᵀ M Q_r) ∘ (s_l s_rᵀ)] Q_rᵀ for M [..., d_a, d_g], Q_l
    [..., d_a, d_a], Q_r [..., d_g, d_g], s_l [..., d_a], s_r [..., d_g]:
    (P + a I)⁻¹ M (Q + b I)⁻¹ with P = Q_l diag(e_l) Q_lᵀ, s_l = 1/(e_l + a)
    (and the same on the right), four ``product``s."""
    rotated = fisher_factors.product("...ba,...bg->...ag", left_vectors, matrix, matmul_dtype)
    rotated = fisher_factors.product("...ag,...gh->...ah", rotated, right_vectors, matmul_dtype)
    scaled = rotated * left_scale[..., :, None] * right_scale[..., None, :]
    back = fisher_factors.product("...ab,...bg->...ag", left_vectors, scaled, matmul_dtype)
    return fisher_factors.product("...ag,...hg->...ah", back, right_vectors, matmul_dtype)


def kron(left, right):
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

    subset = [capture.LayerUse(take(u.inputs), take(u.preactivation), None, u.training) for u in uses]
    grads = [[None if g is None else take(g) for g in grads] for grads in grads_per_vector]
    return subset, grads


class FisherBlock(abc.ABC):
    """One layer's block. Created from the saved sizes alone, so a block can
    exist (e.g. while a saved optimizer is being loaded) before it is bound
    to its layer (``bind``).

    Args:
      name: the layer's name (prefix of the variable names).
      input_size, output_size: d_a and d_g (the sizes of the layer kind).
      add_variable: callable(shape, initializer, name) -> variable, used to
        create the block's state (the optimizer's tracked variables).
      damping_mode: 'plain' (λ_l = the optimizer's λ) or 'trace_scaled'
        (λ_l = max(δ_l / n_l, damping_floor)); see ``fisher_blocks``.
      damping_floor: ν > 0, the floor of the trace-scaled damping.
      inverse_method: one of ``INVERSE_METHODS``: which inverse state the
        block keeps (module docstring).
    """

    approximation: Optional[str] = None
    # Input dtype of the statistics and preconditioning products
    # (``fisher_factors.product``); the estimator sets it per optimizer.
    matmul_dtype = tf.float32
    # Samples of convolutions ('expand': one per position, 'reduce': one per
    # example, 'auto': 'reduce' for depthwise ones; ``KroneckerFisherBlock.
    # _samples``); the estimator sets it per optimizer.
    conv_statistics = "expand"
    reduces_positions = False
    # κ̄, the mean curvature of the weight regularizers over the block's
    # parameters, added to λ_l (``effective_damping``); the estimator sets
    # it when it binds the block (``FisherEstimator.bind``).
    penalty_damping = 0.0

    def __init__(self, name: str, input_size: int, output_size: int,
                 add_variable: Callable[..., Any], damping_mode: str = "plain",
                 damping_floor: float = 1e-6, inverse_method: str = "cholesky"):
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"damping_mode must be one of {DAMPING_MODES}; got {damping_mode!r}."
            )
        if not damping_floor > 0:
            raise ValueError(f"damping_floor must be > 0; got {damping_floor!r}.")
        if inverse_method not in INVERSE_METHODS:
            raise ValueError(
                f"inverse_method must be one of {INVERSE_METHODS}; got {inverse_method!r}."
            )
        self.inverse_method = inverse_method
        self.name = name
        self.input_size, self.output_size = input_size, output_size
        self.damping_mode = damping_mode
        self.damping_floor = float(damping_floor)
        self.kind = None
        prefix = name.replace("/", "_")  # a layer path (EinsumDense) -> a variable name
        self._create_state(add_variable, prefix, input_size, output_size)
        if self.eigenbasis:
            # 1 once a snapshot was taken (a scalar, [G] for grouped blocks).
            self.snapshot_taken = add_variable((), "zeros", f"{prefix}_snapshot_taken")

    def _create_state(self, add_variable, prefix, d_a, d_g):
        """Creates the factor averages (``self._factors``) and the inverse
        state of ``inverse_method``."""
        raise NotImplementedError

    @property
    def eigenbasis(self) -> bool:
        """Whether the inverse state is the eigenbasis snapshot."""
        return self.inverse_method == EIGENBASIS

    # --- the interface ----------------------------------------------------------
    @abc.abstractmethod
    def statistic_sums(self, uses: Sequence[capture.LayerUse],
                       grads_per_vector: Sequence[Sequence[Optional[tf.Tensor]]],
                       examples: Optional[tf.Tensor] = None) -> tuple:
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

    @abc.abstractmethod
    def zero_sums(self) -> tuple:
        """Sums of an empty batch (zeros shaped like ``statistic_sums``)."""

    @abc.abstractmethod
    def statistics_from_sums(self, sums: Sequence[tf.Tensor]) -> tuple:
        """The factor statistics, in the order of ``factor_variables``, from
        ``statistic_sums`` (of one batch, or added over replicas)."""

    @property
    def inverse_variables(self) -> list:
        """The variables ``update_inverse`` assigns, in a fixed order."""
        if self.eigenbasis:
            return [*self._snapshot_variables(), self.snapshot_taken]
        return self._inverse_variables()

    def inverse_values(self, damping: Any, method: str = "cholesky") -> list:
        """The new values of ``inverse_variables``: the damped factors'
        inverses with damping λ_l = effective_damping(damping) by ``method``,
        or (eigenbasis) the snapshot of the factors, which needs no λ (all
        NaN, so that none is stored, if any part of it is not finite)."""
        if self.eigenbasis:
            values = [*self._snapshot_values(), tf.ones_like(self.snapshot_taken)]
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values])
            return [tf.where(finite, v, float("nan")) for v in values]
        return self._inverse_values(damping, method)

    def multiply_inverse(self, matrix: Any, damping: Any = None) -> Any:
        """(F̂ + damping)⁻¹ applied to the layer's gradient matrix ∇Θ: with
        the inverses of the last inverse update, or (eigenbasis) with the
        snapshot damped by ``damping`` (λ, needed then)."""
        if not self.eigenbasis:
            return self._multiply_inverse(matrix)
        if damping is None:
            raise ValueError(
                f"Block '{self.name}' keeps an eigenbasis snapshot: multiply_inverse needs the damping."
            )
        damped = self._multiply_snapshot(matrix, tf.cast(damping, tf.float32))
        taken = tf.reduce_all(self._value(self.snapshot_taken) > 0.0)
        return tf.nest.map_structure(lambda d, m: tf.where(taken, d, tf.cast(m, tf.float32)),
                                     damped, matrix)

    def _inverse_variables(self) -> list:
        """The inverses of the damped factors (not eigenbasis), in a fixed order."""
        raise NotImplementedError

    def _inverse_values(self, damping: Any, method: str) -> list:
        """The damped factors' inverses (in the order of
        ``_inverse_variables``) from the averages, with damping
        λ_l = effective_damping(damping)."""
        raise NotImplementedError

    def _multiply_inverse(self, matrix: Any) -> Any:
        """The inverse variables applied to ∇Θ."""
        raise NotImplementedError

    def _snapshot_variables(self) -> list:
        """The eigenbasis snapshot's variables (without ``snapshot_taken``)."""
        raise NotImplementedError

    def _snapshot_values(self) -> list:
        """The snapshot of the current averages, in the order of
        ``_snapshot_variables``."""
        raise NotImplementedError

    def _multiply_snapshot(self, matrix: Any, damping: tf.Tensor) -> Any:
        """The snapshot's damped inverse (damping λ) applied to ∇Θ."""
        raise NotImplementedError

    @abc.abstractmethod
    def multiply_fisher(self, matrix: Any) -> Any:
        """F̂ (undamped) applied to a matrix shaped like ∇Θ."""

    @abc.abstractmethod
    def full_fisher(self) -> tf.Tensor:
        """F̂ as a dense [n, n] matrix, n the block's parameter count, in the
        row-major order of ∇Θ."""

    @abc.abstractmethod
    def trace(self) -> tf.Tensor:
        """tr F̂, a float32 scalar."""

    # --- shared -------------------------------------------------------------------
    def bind(self, kind) -> None:
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

    @property
    def factor_variables(self) -> list:
        """The running averages, in a fixed order."""
        return list(self._factors)

    def statistics(self, uses, grads_per_vector) -> tuple:
        """This batch's factor statistics, in the order of ``factor_variables``."""
        return self.statistics_from_sums(self.statistic_sums(uses, grads_per_vector))

    def _shifts(self, trace_left, trace_right, damping):
        """(s_l, s_r) of a block with two factors (its ``damping_split``) of
        traces ``trace_left``, ``trace_right`` ([] or [G]) at damping λ_l
        (``damping_shifts``)."""
        return damping_shifts(self.damping_split, trace_left, trace_right,
                              self.input_size, self.output_size, damping)

    def _factor_shifts(self, left, right, damping):
        """``_shifts`` of the factors ``left``, ``right`` ([..., d, d]); their
        traces are formed only for the 'pi' split, the one that uses them."""
        if self.damping_split != "pi":
            return self._shifts(None, None, damping)
        return self._shifts(tf.linalg.trace(left), tf.linalg.trace(right), damping)

    def effective_damping(self, damping: Any, trace: Optional[tf.Tensor] = None) -> tf.Tensor:
        """λ_l of this block: ``damping`` (λ) when 'plain', else
        max(tr F̂ / n_l, ν), tr F̂ = ``trace`` (the snapshot's) or trace();
        plus ``penalty_damping``."""
        if self.damping_mode == "plain":
            return self._with_penalty(tf.cast(damping, tf.float32))
        trace = self.trace() if trace is None else trace
        mean_eigenvalue = trace / float(self.input_size * self.output_size)
        return self._with_penalty(tf.maximum(mean_eigenvalue, self.damping_floor))

    def _with_penalty(self, damping: tf.Tensor) -> tf.Tensor:
        """``damping`` + κ̄ (``penalty_damping``, where it is not 0)."""
        return damping + self.penalty_damping if self.penalty_damping else damping

    def update_inverse(self, damping: Any, method: str = "cholesky") -> None:
        """Recomputes the inverses of the damped factors from the averages
        (an inverse that is not finite keeps its previous value)."""
        values = self.inverse_values(damping, method=method)
        for variable, value in zip(self.inverse_variables, values):
            fisher_factors.assign_if_finite(variable, value)

    def _damped_inverse(self, matrix, shift, variable, method):
        """``damped_inverse`` of one factor whose inverse is ``variable``
        (warm-started from it; read only where the method uses it); inside
        ``fisher_factors.batched_inverses`` possibly a ``PendingInverse``
        (``requested_inverse``)."""
        return fisher_factors.requested_inverse(matrix, shift, method=method, previous=variable)

    def _value(self, variable):
        return tf.convert_to_tensor(variable)

    @staticmethod
    def _grads(uses, grads):
        return [tf.zeros_like(u.preactivation) if g is None else g for u, g in zip(uses, grads)]
