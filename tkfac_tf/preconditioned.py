"""TKFAC's (or K-FAC's) curvature as a preconditioner for any Keras optimizer.

``Preconditioned(keras.optimizers.AdamW(...))`` runs the statistics and
inverse schedule of the TKFAC optimizer and hands the wrapped optimizer the
preconditioned gradient d = precond(∇) instead of ∇:

    θ ← wrapped.update(θ, d),   d = (F̂ + damping)⁻¹ ∇  (registered layers; ∇ elsewhere)

so the wrapped optimizer keeps its own learning rate and schedule, momentum,
clipping (of d), weight decay, EMA and gradient accumulation. With the
identity preconditioner it is the wrapped optimizer exactly. A step whose
gradient, statistics or d is not finite is not handed over: nothing changes
but ``skipped_steps``.
"""

from __future__ import annotations

from typing import Any, Optional

import keras
import tensorflow as tf

from tkfac_tf import distribution
from tkfac_tf import keras_compat
from tkfac_tf import layer_collection as layer_collection_lib
from tkfac_tf import step as step_lib
from tkfac_tf.optimizer import KroneckerFactoredOptimizer
from tkfac_tf.options import Options

APPROXIMATIONS = ("tkfac", "kfac")

PRECONDITIONER_OPTIONS = tuple(
    name for name, group in Options.names().items() if group in ("schedule", "estimation")
)
"""The options ``Preconditioned`` takes: the schedule and estimation groups
(the step rules' options belong to the wrapped optimizer)."""


WRAPPED_OPTIMIZER_ARGUMENTS = frozenset({
    "learning_rate", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
    "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps",
})
"""Keras optimizer arguments that belong to the wrapped optimizer."""


@keras.saving.register_keras_serializable(package="tkfac_tf")
class Preconditioned(KroneckerFactoredOptimizer):
    """Any Keras optimizer fed TKFAC's (or K-FAC's) preconditioned gradient.

    Args:
      optimizer: the wrapped ``keras.optimizers.Optimizer`` (SGD with
        Nesterov, Adam, AdamW, Lion, ...), not yet built; it owns the
        learning rate (``opt.learning_rate`` is its), the update rule, its
        clipping, weight decay, EMA and loss scale (``loss_scale_factor``).
      approximation: 'tkfac' (the default) or 'kfac': which Kronecker
        factorisation preconditions.
      damping: λ > 0 of the preconditioner (fixed unless you assign
        ``opt.damping``).
      layer_collection: as for ``TKFAC``; None lets ``model.compile``
        register the model.
      **kwargs: the schedule and estimation options of ``TKFAC``
        (``PRECONDITIONER_OPTIONS``: cov_update_every, inv_update_every,
        cov_ema_decay, estimation_mode, inverse_method, ...) with the same
        defaults, and ``name``.

    ``optimizer.variables`` holds both states (the factors and the wrapped
    optimizer's slots), so a saved model resumes exactly.
    """

    keeps_momenta = False  # the wrapped optimizer keeps its own

    def __init__(
        self,
        optimizer: keras.optimizers.Optimizer,
        approximation: str = "tkfac",
        damping: Any = 1e-3,
        layer_collection: Optional[layer_collection_lib.LayerCollection] = None,
        name: Optional[str] = None,
        **kwargs: Any,
    ):
        if isinstance(optimizer, dict):  # from get_config()
            optimizer = keras.optimizers.deserialize(optimizer)
        if not isinstance(optimizer, keras.optimizers.Optimizer) or isinstance(
            optimizer, KroneckerFactoredOptimizer
        ):
            raise TypeError(
                "Preconditioned wraps a keras.optimizers.Optimizer (SGD, Adam, AdamW, Lion, ...); "
                f"got {type(optimizer).__name__}."
            )
        if optimizer.built:
            raise ValueError(
                f"Preconditioned: the wrapped optimizer '{optimizer.name}' is already built; "
                "pass a new one (it is built with the preconditioner's variables)."
            )
        if approximation not in APPROXIMATIONS:
            raise ValueError(f"approximation must be one of {APPROXIMATIONS}; got {approximation!r}.")
        refused = sorted(set(kwargs) & (set(Options.names()) - set(PRECONDITIONER_OPTIONS)))
        refused += sorted(set(kwargs) & WRAPPED_OPTIMIZER_ARGUMENTS)
        if refused:
            raise ValueError(
                f"Preconditioned does not take {refused}: the update rule, its learning rate, "
                "clipping, weight decay, EMA and loss scale are the wrapped optimizer's (set them there); "
                f"Preconditioned takes the schedule and estimation options {list(PRECONDITIONER_OPTIONS)}."
            )
        keras_compat.set_untracked(self, "approximation", approximation)
        super().__init__(learning_rate=0.0, damping=damping, layer_collection=layer_collection,
                         name=name, **kwargs)
        self.wrapped_optimizer = optimizer  # tracked: tf.train.Checkpoint saves its slots

    # --- the wrapped optimizer's face ----------------------------------------------
    @property
    def learning_rate(self) -> Any:
        """The wrapped optimizer's learning rate (callbacks set it there)."""
        return self.wrapped_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate: Any) -> None:
        self.wrapped_optimizer.learning_rate = learning_rate

    @property
    def variables(self) -> list:
        """The preconditioner's state, then the wrapped optimizer's."""
        return self._variables + self.wrapped_optimizer.variables

    def build(self, variables: list) -> None:
        """The preconditioner's state and the wrapped optimizer's."""
        if self.built:
            return
        super().build(variables)
        with keras.name_scope(self.wrapped_optimizer.name, caller=self.wrapped_optimizer):
            self.wrapped_optimizer.build(variables)

    def scale_loss(self, loss: Any) -> Any:
        """The loss (recorded as ``TKFAC``'s is) times the wrapped optimizer's
        ``loss_scale_factor``, which its ``apply`` divides out of the
        directions: d is linear in the gradients."""
        return self.wrapped_optimizer.scale_loss(super().scale_loss(loss))

    def finalize_variable_values(self, var_list: list) -> None:
        """The wrapped optimizer's (its EMA weights, at the end of ``fit``)."""
        self.wrapped_optimizer.finalize_variable_values(var_list)

    def get_config(self) -> dict:
        config = {
            "name": self.name,
            "optimizer": keras.optimizers.serialize(self.wrapped_optimizer),
            "approximation": self.approximation,
            "damping": float(self._damping.numpy()),
            "layer_collection": self._current_collection_config(),
        }
        config.update({name: self.options.get(name) for name in PRECONDITIONER_OPTIONS})
        return config

    @classmethod
    def from_config(cls, config: dict, custom_objects: Any = None) -> "Preconditioned":
        config = dict(config)
        optimizer = keras.optimizers.deserialize(config.pop("optimizer"), custom_objects=custom_objects)
        return cls(optimizer, **config)

    # --- the step -------------------------------------------------------------------
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """The scheduled statistics and inverses, d = precond(∇), then the
        wrapped optimizer's ``apply(d)`` if everything is finite."""
        self._require_bound("apply_gradients()")
        if distribution.num_replicas() > 1:
            raise NotImplementedError(
                "Preconditioned runs on one device; under a tf.distribute strategy with "
                f"{distribution.num_replicas()} replicas use TKFAC / KFAC, which support it."
            )
        inputs, directions = step_lib.preconditioned_gradients(
            self, grads, trainable_variables, learning_rate
        )
        ok = inputs.finite & step_lib.all_finite(directions)
        directions = [tf.cast(d, v.dtype) for d, v in zip(directions, trainable_variables)]
        step_lib.run_if(ok, lambda: self.wrapped_optimizer.apply(directions, trainable_variables))
        self._skipped_steps.assign_add(
            tf.cast(tf.logical_not(ok) | inputs.covariance_skipped, tf.int64)
        )
