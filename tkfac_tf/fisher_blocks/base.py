"""The interface every Fisher block implements, and what blocks share.

A block holds one layer's curvature estimate: running averages of its
factors (``factor_variables``), the inverses of their damped forms
(``inverse_variables``), and the products with a gradient matrix ∇Θ of the
layer (``multiply_inverse``: the damped inverse; ``multiply_fisher``: the
undamped estimate F̂). Statistics arrive as sums additive over examples
(``statistic_sums``; replicas add theirs), turned into the factors'
statistics by ``statistics_from_sums``.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Optional, Sequence

import tensorflow as tf

from tkfac_tf import capture
from tkfac_tf import fisher_factors

DAMPING_MODES = ("plain", "trace_scaled")
DAMPING_SPLITS = ("sqrt", "pi")


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

    subset = [capture.LayerUse(take(u.inputs), take(u.preactivation), None) for u in uses]
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
    """

    approximation: Optional[str] = None
    # Input dtype of the statistics and preconditioning products
    # (``fisher_factors.product``); the estimator sets it per optimizer.
    matmul_dtype = tf.float32

    def __init__(self, name: str, input_size: int, output_size: int,
                 add_variable: Callable[..., Any], damping_mode: str = "plain",
                 damping_floor: float = 1e-6):
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
        prefix = name.replace("/", "_")  # a layer path (EinsumDense) -> a variable name
        self._create_state(add_variable, prefix, input_size, output_size)

    def _create_state(self, add_variable, prefix, d_a, d_g):
        """Creates the factor averages (``self._factors``) and the inverses."""
        raise NotImplementedError

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
    @abc.abstractmethod
    def inverse_variables(self) -> list:
        """The variables ``update_inverse`` assigns, in a fixed order."""

    @abc.abstractmethod
    def inverse_values(self, damping: Any, method: str = "cholesky") -> list:
        """The damped factors' inverses (in the order of
        ``inverse_variables``) from the averages, with damping
        λ_l = effective_damping(damping)."""

    @abc.abstractmethod
    def multiply_inverse(self, matrix: Any) -> Any:
        """(F̂ + damping)⁻¹ applied to the layer's gradient matrix ∇Θ."""

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

    def effective_damping(self, damping: Any) -> tf.Tensor:
        """λ_l of this block: ``damping`` (λ) when 'plain', else
        max(trace() / n_l, ν)."""
        if self.damping_mode == "plain":
            return tf.cast(damping, tf.float32)
        mean_eigenvalue = self.trace() / float(self.input_size * self.output_size)
        return tf.maximum(mean_eigenvalue, self.damping_floor)

    def update_inverse(self, damping: Any, method: str = "cholesky") -> None:
        """Recomputes the inverses of the damped factors from the averages."""
        values = self.inverse_values(damping, method=method)
        for variable, value in zip(self.inverse_variables, values):
            variable.assign(value)

    def _damped_inverse(self, matrix, shift, variable, method):
        """``damped_inverse`` of one factor whose inverse is ``variable``
        (warm-started from it)."""
        return fisher_factors.damped_inverse(
            matrix, shift, method=method, previous=self._value(variable)
        )

    def _value(self, variable):
        return tf.convert_to_tensor(variable)

    @staticmethod
    def _grads(uses, grads):
        return [tf.zeros_like(u.preactivation) if g is None else g for u, g in zip(uses, grads)]
