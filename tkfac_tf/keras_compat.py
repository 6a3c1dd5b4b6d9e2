"""The Keras internals tkfac_tf relies on, in one place.

Keras 3 offers no public hook for what these do; each is pinned by
tests/test_keras_compat.py, so that a Keras upgrade that changes one fails
there, by name, rather than somewhere inside a training step.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import keras
from keras.src.backend.common import global_state
from keras.src.trainers.trainer import Trainer


def set_untracked(obj: Any, name: str, value: Any) -> None:
    """``obj.name = value`` past Keras' attribute tracking (layers, models
    and optimizers track what is assigned to them: wrapped calls, the
    optimizer's helpers and flags must not become tracked state)."""
    object.__setattr__(obj, name, value)


def current_call_context() -> Any:
    """Keras' context of the outermost layer call now running (with its
    ``training`` flag and ``entry_layer``), or None."""
    return global_state.get_global_attribute("current_call_ctx")


def call_state(layer: keras.layers.Layer) -> list:
    """The float state a layer's own training call assigns (BatchNorm's
    moving mean and variance): its own non-trainable variables created
    without autocast, so their value reads as it is stored under mixed
    precision too (a frozen kernel is autocast and is not included)."""
    return [v for v in layer._non_trainable_variables
            if not v._autocast and keras.backend.is_float_dtype(v.dtype)]


def variable_key(optimizer: keras.optimizers.Optimizer) -> Callable[[Any], Any]:
    """The optimizer's key of a variable (the one its slot variables are
    indexed by)."""
    return optimizer._var_key


def slot(optimizer: keras.optimizers.Optimizer, slots: list, variable: Any) -> Any:
    """The optimizer variable of ``variable`` in ``slots`` (a list built by
    ``add_optimizer_variables`` in the order of the trained variables)."""
    return slots[optimizer._get_variable_index(variable)]


def applied_batches(optimizer: keras.optimizers.Optimizer) -> Any:
    """How many batches ``apply`` has taken (int variable): under
    ``gradient_accumulation_steps=k`` every micro-batch, while
    ``optimizer.iterations`` counts the updates (one per k)."""
    return optimizer._iterations


def uses_weight_decay(optimizer: keras.optimizers.Optimizer, variable: Any) -> bool:
    """Whether Keras' weight-decay settings (``exclude_from_weight_decay``)
    select ``variable``."""
    return optimizer._use_weight_decay(variable)


def call_after_compile(hook: Callable[[keras.Model, Any], None]) -> None:
    """Makes every ``keras.Model.compile`` (Keras' ``Trainer.compile``) call ``hook(model, previous)``
    once it has returned (``previous``: the model's optimizer before the
    call, or None). Installed once per hook; subclasses that override
    ``compile`` reach it through ``super().compile``, and so does
    ``load_model`` (``compile_from_config``)."""
    original = Trainer.compile
    if hook in getattr(original, "_tkfac_hooks", ()):
        return

    @functools.wraps(original)
    def compile(model, *args, **kwargs):
        previous = getattr(model, "optimizer", None)
        original(model, *args, **kwargs)
        hook(model, previous)

    compile._tkfac_hooks = getattr(original, "_tkfac_hooks", ()) + (hook,)
    # On Keras' Trainer itself: compile_from_config (load_model) compiles
    # only models whose class does not override Trainer.compile.
    Trainer.compile = compile


def compiled_loss_weights(model: keras.Model) -> Any:
    """The ``loss_weights`` ``model.compile`` was given (None if none, or
    not compiled)."""
    compile_loss = getattr(model, "_compile_loss", None)
    return getattr(compile_loss, "_user_loss_weights", None)


def probability_op(operation: Any) -> str | None:
    """'softmax' or 'sigmoid' when ``operation`` is the Keras operation that
    ``keras.ops.softmax`` / ``keras.ops.sigmoid`` (or the same
    ``keras.activations``) leave in a functional graph, else None."""
    from keras.src.ops import nn

    if isinstance(operation, nn.Softmax):
        return "softmax"
    if isinstance(operation, nn.Sigmoid):
        return "sigmoid"
    return None


def inner_optimizer(optimizer: Any) -> Any:
    """The optimizer a ``LossScaleOptimizer`` (mixed_float16 compile) wraps,
    else ``optimizer`` itself."""
    return getattr(optimizer, "inner_optimizer", optimizer)


def trained_variables(optimizer: keras.optimizers.Optimizer) -> list:
    """The variables ``optimizer`` was built for (``build(variables)``)."""
    return list(optimizer._trainable_variables)
