"""TKFAC and K-FAC as Keras 3 optimizers.

One step, in this order (each part can also be driven by hand):

1. covariance update (``cov_update_op``): the statistics of this batch, taken
   at the current weights from the tensors the layer taps recorded, update the
   running averages of every block's factors;
2. inverse update (``inv_update_op``): the damped factors are re-inverted;
3. preconditioned update (``apply_gradients``): with τ = momentum, α = the
   learning rate and c ≤ 1 the KL-clipping coefficient,
       ζ = −α · c · precond(∇),   m ← τ m + ζ,   θ ← θ + m,
   where precond is the block's Kronecker-factored inverse for registered
   layers and the identity for every other trainable variable.

With ``cov_update_every`` / ``inv_update_every`` set, steps 1 and 2 run
inside ``apply_gradients`` on steps k with k % every == 0 (k counts applied
steps from 0, so the first step does all three). ``None`` hands that part to
the user.
"""

import numbers
import random

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tkfac_tf import fisher_blocks
from tkfac_tf import fisher_factors
from tkfac_tf import layer_collection as layer_collection_lib

ESTIMATION_MODES = ("gradients", "empirical", "exact")


_SCALAR_KINDS = "a Python, NumPy or 0-d tensor scalar"


def _scalar(name, value, integer=False, what=None, error=TypeError):
    """``value`` as a Python float (int if ``integer``) if it is a real scalar:
    a Python or NumPy number, a 0-d NumPy array, or a 0-d eager tensor /
    variable. Booleans, strings, arrays and symbolic tensors are refused
    with ``error`` naming ``name``."""
    what = what or ("an integer" if integer else "a real number")
    if isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be {what} ({_SCALAR_KINDS}), not a bool; got {value!r}.")
    if isinstance(value, numbers.Real):
        array = np.asarray(value)
    elif isinstance(value, np.ndarray) or tf.is_tensor(value) or isinstance(value, keras.Variable):
        try:
            array = np.asarray(value if isinstance(value, np.ndarray) else value.numpy())
        except Exception:  # a symbolic tensor (inside a tf.function)
            raise error(
                f"{name} must be {what} ({_SCALAR_KINDS}) known outside any "
                f"tf.function; got the symbolic tensor {value!r}."
            ) from None
    else:
        raise error(f"{name} must be {what} ({_SCALAR_KINDS}); got {type(value).__name__} {value!r}.")
    if array.shape != ():
        raise error(f"{name} must be {what} ({_SCALAR_KINDS}); got a value of shape {array.shape}.")
    if array.dtype.kind == "b" or array.dtype.kind not in ("iu" if integer else "iuf"):
        raise error(f"{name} must be {what} ({_SCALAR_KINDS}); got a {array.dtype} value {value!r}.")
    return int(array) if integer else float(array)


def _check_interval(name, value):
    if value is None:
        return None
    what = "an integer >= 1 or None"
    value = _scalar(name, value, integer=True, what=what, error=ValueError)
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or None; got {value!r}.")
    return value


def _check_number(name, value, low, high, low_open=False, high_open=True):
    value = _scalar(name, value)
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}; got {value}.")
    return value


class KroneckerFactoredOptimizer(keras.optimizers.Optimizer):
    """Shared implementation of :class:`TKFAC` and :class:`KFAC`.

    Args:
      learning_rate: α ≥ 0 (0 is allowed, e.g. to start a warm-up) or a
        ``keras.optimizers.schedules.LearningRateSchedule``.
      damping: λ > 0 (a variable: assign ``opt.damping = x`` to change it).
      layer_collection: a :class:`tkfac_tf.LayerCollection` of the model.
      momentum: τ in [0, 1).
      cov_ema_decay: ε in [0, 1), decay of the factors' running averages.
      cov_update_every, inv_update_every: automatic schedule intervals, or None
        to call ``cov_update_op()`` / ``inv_update_op()`` yourself.
      estimation_mode: 'gradients' (targets sampled from the model's
        predictive distribution), 'empirical' (the training loss, i.e. the
        labels) or 'exact' (all outcomes; one backward pass per output unit).
      norm_constraint: None or c > 0: scale the update so that
        α² Σ ⟨precond(∇), ∇⟩ ≤ c (KL clipping).
      seed: integer seed of the sampled targets (random if None).
      weight_decay: None or wd ≥ 0: decoupled weight decay as in Keras
        optimizers (θ ← θ − α·wd·θ before the step).
      conv_damping: damping of conv blocks: 'plain' (the same λ as every
        block) or 'trace_scaled' (λ_l = max(δ_l / n_l, conv_damping_floor),
        δ_l the trace of the block's approximate Fisher, n_l its parameter
        count; see ``fisher_blocks``). Dense blocks always use λ.
      conv_damping_floor: ν > 0, the floor of the trace-scaled conv damping.
      **kwargs: other ``keras.optimizers.Optimizer`` arguments.

    Every numeric argument (and ``opt.damping = x``) takes any real scalar
    within its bounds: a Python or NumPy number or a 0-d eager tensor /
    variable; the integer ones (the intervals, ``seed``) take integer
    scalars. Booleans are refused.
    """

    approximation = None

    def __init__(
        self,
        learning_rate=0.01,
        damping=1e-3,
        layer_collection=None,
        momentum=0.9,
        cov_ema_decay=0.95,
        cov_update_every=1,
        inv_update_every=20,
        estimation_mode="gradients",
        norm_constraint=None,
        seed=None,
        weight_decay=None,
        conv_damping="plain",
        conv_damping_floor=1e-6,
        name=None,
        **kwargs,
    ):
        if not callable(learning_rate):  # a LearningRateSchedule is callable
            learning_rate = _check_number("learning_rate", learning_rate, 0.0, float("inf"))
        if weight_decay is not None:
            weight_decay = _check_number("weight_decay", weight_decay, 0.0, float("inf"))
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **kwargs
        )
        damping = _check_number("damping", damping, 0.0, float("inf"), low_open=True)
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        self.cov_ema_decay = _check_number("cov_ema_decay", cov_ema_decay, 0.0, 1.0)
        self.cov_update_every = _check_interval("cov_update_every", cov_update_every)
        self.inv_update_every = _check_interval("inv_update_every", inv_update_every)
        if estimation_mode not in ESTIMATION_MODES:
            raise ValueError(
                f"estimation_mode must be one of {ESTIMATION_MODES}; got {estimation_mode!r}."
            )
        self.estimation_mode = estimation_mode
        if norm_constraint is not None:
            norm_constraint = _check_number(
                "norm_constraint", norm_constraint, 0.0, float("inf"), low_open=True
            )
        self.norm_constraint = norm_constraint
        if conv_damping not in fisher_blocks.DAMPING_MODES:
            raise ValueError(
                f"conv_damping must be one of {fisher_blocks.DAMPING_MODES}; "
                f"got {conv_damping!r}."
            )
        self.conv_damping = conv_damping
        self.conv_damping_floor = _check_number(
            "conv_damping_floor", conv_damping_floor, 0.0, float("inf"), low_open=True
        )
        if seed is None:
            seed = random.randrange(2**31)
        self.seed = _scalar("seed", seed, integer=True)
        with keras.name_scope(self.name):
            self._damping = keras.Variable(
                damping, name="damping", dtype="float32", trainable=False
            )
        object.__setattr__(self, "_layer_collection", None)
        object.__setattr__(self, "_collection_config", None)
        object.__setattr__(self, "_blocks", {})
        # Whether cov_update_op / inv_update_op were ever called (traced), and
        # whether the "never updated" warning was logged.
        object.__setattr__(self, "_manual_calls", set())
        object.__setattr__(self, "_warned_never_updated", False)
        if isinstance(layer_collection, dict):
            # From get_config(): bound to a model later by attach(model).
            object.__setattr__(self, "_collection_config", layer_collection)
        else:
            self.layer_collection = layer_collection

    # --- configuration ---------------------------------------------------------
    @property
    def damping(self):
        """λ as a float32 variable (read it, or assign a float to change it)."""
        return self._damping

    @damping.setter
    def damping(self, value):
        self._damping.assign(_check_number("damping", value, 0.0, float("inf"), low_open=True))

    @property
    def layer_collection(self):
        return self._layer_collection

    @layer_collection.setter
    def layer_collection(self, collection):
        if collection is not None and not isinstance(
            collection, layer_collection_lib.LayerCollection
        ):
            raise TypeError(
                "layer_collection must be a tkfac_tf.LayerCollection; got "
                f"{type(collection).__name__}."
            )
        if self.built and collection is not self._layer_collection:
            raise ValueError(
                "The optimizer is already built; to bind it to a (loaded) "
                "model call opt.attach(model), or create a new optimizer for "
                "a new layer collection."
            )
        self._set_collection(collection)

    def _set_collection(self, collection):
        object.__setattr__(self, "_layer_collection", collection)
        if collection is not None:
            collection.recorder.eager_tape_wanted = self._eager_tape_wanted

    def _current_collection_config(self):
        """The bound collection's description, else the saved one (a loaded
        optimizer not attached yet), else None."""
        if self._layer_collection is not None:
            return self._layer_collection.get_config()
        return self._collection_config

    def attach(self, model):
        """Re-registers the saved layer collection on ``model`` and binds the
        optimizer's state to it. Call it once after
        ``keras.models.load_model(...)`` (or ``from_config``) before training:

            model = keras.models.load_model(path)
            model.optimizer.attach(model)
        """
        config = self._current_collection_config()
        if config is None:
            raise ValueError(
                "This optimizer has no saved layer collection to attach; pass "
                "layer_collection=LayerCollection(...) instead."
            )
        if self._layer_collection is not None:
            # The optimizer's previous collection gives its layers up.
            self._layer_collection.release()
        collection = layer_collection_lib.LayerCollection.from_config(config, model)
        self._set_collection(collection)
        if self.built:
            self._bind_blocks(self._trainable_variables)
        return collection

    @property
    def fisher_blocks(self):
        """dict layer name -> Fisher block (available once built)."""
        return dict(self._blocks)

    @property
    def num_cov_updates(self):
        """How many covariance updates have been applied (int64 variable)."""
        return self._num_cov_updates

    @property
    def skipped_steps(self):
        """How many steps skipped an update for non-finite values (int64
        variable): one per step, whether the step's covariance update, its
        apply_gradients or both found non-finite values."""
        return self._skipped_steps

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "damping": float(self._damping.numpy()),
                "momentum": self.momentum,
                "cov_ema_decay": self.cov_ema_decay,
                "cov_update_every": self.cov_update_every,
                "inv_update_every": self.inv_update_every,
                "estimation_mode": self.estimation_mode,
                "norm_constraint": self.norm_constraint,
                "seed": self.seed,
                "conv_damping": self.conv_damping,
                "conv_damping_floor": self.conv_damping_floor,
                "layer_collection": self._current_collection_config(),
            }
        )
        return config

    # --- building ---------------------------------------------------------------
    def build(self, variables):
        """Creates momenta, counters and every registered layer's factor state.

        Without a bound collection but with a saved one (``load_model``), the
        state is created from the saved sizes so it can be restored, and
        ``attach(model)`` binds it later.
        """
        if self.built:
            return
        collection_config = self._current_collection_config()
        if collection_config is None:
            raise ValueError(
                f"{type(self).__name__} has no layer_collection. Pass "
                "layer_collection=... to the constructor or set "
                "opt.layer_collection before the first step."
            )
        if self._layer_collection is not None:
            self._layer_collection.validate()
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._num_cov_updates = self.add_variable(
            (), initializer="zeros", dtype="int64", name="num_cov_updates"
        )
        self._skipped_steps = self.add_variable(
            (), initializer="zeros", dtype="int64", name="skipped_steps"
        )
        block_class = fisher_blocks.BLOCK_CLASSES[self.approximation]
        blocks = {}
        for entry in collection_config["layers"]:
            blocks[entry["layer"]] = block_class(
                entry["layer"],
                entry["input_size"],
                entry["output_size"],
                lambda shape, init, name: self.add_variable(
                    shape, initializer=init, dtype="float32", name=name
                ),
                damping_mode=self.conv_damping if entry["is_convolution"] else "plain",
                damping_floor=self.conv_damping_floor,
            )
        object.__setattr__(self, "_blocks", blocks)
        if self._layer_collection is not None:
            self._bind_blocks(variables)

    def _bind_blocks(self, variables):
        """Binds each block to its layer kind; checks the layers' variables are
        being trained; logs the unregistered ones once."""
        keys = {self._var_key(v) for v in variables}
        registered = set()
        kinds = self._layer_collection.layer_kinds
        if sorted(k.layer.name for k in kinds) != sorted(self._blocks):
            raise ValueError(
                f"The layer collection registers {sorted(k.layer.name for k in kinds)} "
                f"but the optimizer was built for {sorted(self._blocks)}: "
                "register every layer before the optimizer's first step."
            )
        for kind in kinds:
            for variable in kind.parameters:
                if self._var_key(variable) not in keys:
                    raise ValueError(
                        f"Registered layer '{kind.layer.name}' has variable "
                        f"'{variable.path}' that is not among the variables "
                        "being trained: the layer collection does not match "
                        "the model. Register the layers of the model you train."
                    )
            block = self._blocks[kind.layer.name]
            block.bind(kind)
            registered.update(self._var_key(v) for v in kind.parameters)
        unregistered = [v.path for v in variables if self._var_key(v) not in registered]
        if unregistered:
            logging.warning(
                "%s: %d trainable variable(s) belong to no registered layer and "
                "get the plain momentum update (no preconditioning): %s",
                self.name,
                len(unregistered),
                ", ".join(unregistered),
            )

    def _require_bound(self, what):
        if not self.built:
            raise ValueError(
                f"{what} needs a built optimizer: call "
                "opt.build(model.trainable_variables) first (fit does it for you)."
            )
        if self._layer_collection is None:
            raise ValueError(
                f"{what}: the optimizer's state was loaded but is not attached "
                "to a model. Call opt.attach(model) (e.g. "
                "model.optimizer.attach(model) after keras.models.load_model)."
            )
        self._layer_collection.check_holds_layers()

    # --- the three parts of a step -----------------------------------------
    def _eager_tape_wanted(self):
        if self.cov_update_every is None:
            return True
        return int(self.iterations.numpy()) % self.cov_update_every == 0

    def scale_loss(self, loss):
        """Keras calls this on the training loss; 'empirical' mode uses it."""
        if self._layer_collection is not None:
            self._layer_collection.recorder.set_loss(loss)
        return super().scale_loss(loss)

    def cov_update_op(self, loss=None):
        """Updates the factors' running averages from this step's statistics.

        Call it inside the same ``tf.function`` (or eager step) as the model's
        training forward pass, before ``apply_gradients`` (which then skips
        its own scheduled covariance update for this step). ``loss`` is the training loss, needed only by
        estimation_mode='empirical' in custom loops. If the statistics are not
        finite the averages are left unchanged and ``skipped_steps`` counts it.
        """
        self._require_bound("cov_update_op()")
        self._manual_calls.add("cov")
        recorder = self._layer_collection.recorder
        record = recorder.take_for_covariance_update()
        if record is not None and loss is not None:
            record.loss = loss
        statistics = self._batch_statistics(record)
        finite = _all_finite(statistics)
        self._run_if_else(
            finite,
            lambda: self._assign_statistics(statistics),
            lambda: self._skipped_steps.assign_add(1),
        )
        # This step is counted once: apply_gradients does not count it again.
        recorder.note_covariance_skipped(tf.logical_not(finite))

    def inv_update_op(self):
        """Recomputes every block's damped inverses from the running averages."""
        self._require_bound("inv_update_op()")
        self._manual_calls.add("inv")
        for block in self._blocks.values():
            block.update_inverse(self._damping)

    def _apply_weight_decay(self, variables):
        """Keras applies decay before the update step; here it runs inside the
        step instead, so that a skipped (non-finite) step changes nothing."""
        del variables

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """One step: scheduled covariance / inverse updates, then the
        preconditioned update; all of it skipped if anything is non-finite."""
        self._require_bound("apply_gradients()")
        # Applied updates so far (differs from _iterations under Keras'
        # gradient_accumulation_steps, which calls this every k-th batch).
        step = tf.convert_to_tensor(self.iterations)
        record = self._layer_collection.recorder.take()
        self._warn_if_never_updated()
        finite = _all_finite(grads)
        counted = tf.constant(False)  # skipped and counted by cov_update_op
        if record is not None and record.covariance_skipped is not None:
            counted = record.covariance_skipped
        statistics = None
        if self.cov_update_every is not None and not (
            record is not None and record.covariance_updated
        ):
            is_cov_step = step % self.cov_update_every == 0
            zeros = [tf.zeros_like(v) for v in self._factor_variables()]
            statistics = tf.cond(
                is_cov_step, lambda: self._batch_statistics(record), lambda: zeros
            )
            finite = finite & _all_finite(statistics)

        def update():
            super(KroneckerFactoredOptimizer, self)._apply_weight_decay(trainable_variables)
            if statistics is not None:
                self._run_if(is_cov_step, lambda: self._assign_statistics(statistics))
            if self.inv_update_every is not None:
                self._run_if(step % self.inv_update_every == 0, self.inv_update_op)
            self._apply_preconditioned(grads, trainable_variables, learning_rate)

        self._run_if_else(
            finite,
            update,
            lambda: self._skipped_steps.assign_add(tf.cast(tf.logical_not(counted), tf.int64)),
        )

    def _warn_if_never_updated(self):
        """Logs once when a step runs with a part of the update that has never
        run: no schedule for it and no manual call so far (the step is then
        plain momentum SGD, or preconditioned by never-updated inverses)."""
        missing = [
            f"{part}_update_every=None and no {part}_update_op() call"
            for part, every in (("cov", self.cov_update_every), ("inv", self.inv_update_every))
            if every is None and part not in self._manual_calls
        ]
        if missing and not self._warned_never_updated:
            object.__setattr__(self, "_warned_never_updated", True)
            logging.warning(
                "%s: apply_gradients runs with %s so far: the Fisher factors "
                "or their inverses have never been updated, so the step uses "
                "no Fisher information (plain momentum SGD up to a constant "
                "scale). Call "
                "opt.cov_update_op() and opt.inv_update_op() in your training "
                "step, or set cov_update_every / inv_update_every. (Logged once.)",
                self.name,
                " and ".join(missing),
            )

    @staticmethod
    def _run_if(predicate, fn):
        return KroneckerFactoredOptimizer._run_if_else(predicate, fn, lambda: None)

    @staticmethod
    def _run_if_else(predicate, true_fn, false_fn):
        """tf.cond for side effects only (works eagerly, in graphs and XLA)."""

        def branch(fn):
            def run():
                fn()
                return tf.constant(True)

            return run

        return tf.cond(predicate, branch(true_fn), branch(false_fn))

    # --- covariance update --------------------------------------------------
    def _factor_variables(self):
        return [v for block in self._blocks.values() for v in block.factor_variables]

    def _uses_of(self, record, layer):
        uses = record.uses.get(id(layer)) if record is not None else None
        if not uses and record is not None and record.covariance_updated:
            raise ValueError(
                f"The statistics of this forward pass (layer '{layer.name}') "
                "were already consumed by an earlier cov_update_op() in this "
                "step; call cov_update_op() once per forward pass."
            )
        if not uses:
            raise ValueError(
                f"No statistics were recorded for layer '{layer.name}' in this "
                "step. Run the model's forward pass with training=True in the "
                "same tf.function / eager step as the optimizer's update, and "
                "make sure the registered layers belong to the model you train "
                "(and were not registered since in another LayerCollection)."
            )
        return uses

    def _backward_gradients(self, record, taps):
        """List over backward vectors of lists (over taps) of d/ds tensors."""
        if self.estimation_mode == "empirical":
            if record is None or record.loss is None:
                raise ValueError(
                    "estimation_mode='empirical' needs the training loss. fit "
                    "hands it to the optimizer's scale_loss, except under a "
                    "LossScaleOptimizer (mixed_float16), which keeps it: use "
                    "estimation_mode='gradients' or 'exact' there. In a custom "
                    "loop with cov_update_every=None call "
                    "opt.cov_update_op(loss=loss)."
                )
            # Keras losses average over the loss terms (the output's leading
            # axes, N·T for a [N, T, k] output): g = (N·T) ∂L/∂s is each
            # term's own gradient.
            output = getattr(
                self._uses_of(record, self._layer_collection.distributions[0].layer)[0],
                self._layer_collection.distributions[0].tensor,
            )
            terms = tf.cast(tf.size(output) // tf.shape(output)[-1], record.loss.dtype)
            return [record.gradients(record.loss * terms, taps)]
        step = tf.cast(self.iterations, tf.int64)
        targets, vector_sets = [], []
        index = 0
        for distribution in self._layer_collection.distributions:
            for use in self._uses_of(record, distribution.layer):
                target = getattr(use, distribution.tensor)
                if self.estimation_mode == "gradients":
                    seed = tf.stack([tf.constant(self.seed + index, tf.int64), step])
                    vectors = [distribution.sampled_backward_vector(target, seed)]
                else:
                    vectors = distribution.exact_backward_vectors(target)
                targets.append(target)
                vector_sets.append([tf.cast(v, target.dtype) for v in vectors])
                index += 1
        if self.estimation_mode == "gradients":
            # One backward pass of Σ_outputs −log p(ŷ): independent outputs.
            return [
                record.gradients(targets, taps, output_gradients=[vs[0] for vs in vector_sets])
            ]
        return [
            record.gradients(target, taps, output_gradients=vector)
            for target, vectors in zip(targets, vector_sets)
            for vector in vectors
        ]

    def _batch_statistics(self, record):
        """This batch's factor statistics, flat in the order of _factor_variables()."""
        blocks = list(self._blocks.values())
        uses = [self._uses_of(record, block.layer) for block in blocks]
        taps = [use.preactivation for block_uses in uses for use in block_uses]
        backward = self._backward_gradients(record, taps)
        statistics, offset = [], 0
        # Graph mode: each block's statistics (and its im2col patches) are
        # formed after the previous block's, so at most one layer's patches
        # are alive at a time. No effect eagerly (already sequential).
        previous = []
        for block, block_uses in zip(blocks, uses):
            count = len(block_uses)
            grads = [per_vector[offset : offset + count] for per_vector in backward]
            offset += count
            with tf.control_dependencies(previous):
                previous = list(block.statistics(block_uses, grads))
            statistics.extend(previous)
        return statistics

    def _assign_statistics(self, statistics):
        """Running averages ← statistics (the first update initialises them)."""
        first = tf.equal(self._num_cov_updates, 0)
        for variable, value in zip(self._factor_variables(), statistics):
            fisher_factors.update_running_average(variable, value, self.cov_ema_decay, first)
        self._num_cov_updates.assign_add(1)

    # --- preconditioned update --------------------------------------------------
    def _apply_preconditioned(self, grads, trainable_variables, learning_rate):
        grad_of = {self._var_key(v): g for g, v in zip(grads, trainable_variables)}
        direction = {}
        for block in self._blocks.values():
            params = block.kind.parameters
            keys = [self._var_key(p) for p in params]
            if all(grad_of.get(k) is None for k in keys):
                continue
            block_grads = [
                grad_of[k] if grad_of.get(k) is not None else tf.zeros(p.shape, p.dtype)
                for k, p in zip(keys, params)
            ]
            matrix = block.multiply_inverse(block.kind.to_matrix(block_grads))
            for k, part in zip(keys, block.kind.from_matrix(matrix)):
                direction[k] = part
        for g, v in zip(grads, trainable_variables):
            direction.setdefault(self._var_key(v), tf.cast(g, tf.float32))

        lr = tf.cast(learning_rate, tf.float32)
        scale = lr
        if self.norm_constraint is not None:
            sq_norm = lr * lr * tf.add_n(
                [
                    tf.reduce_sum(direction[self._var_key(v)] * tf.cast(g, tf.float32))
                    for g, v in zip(grads, trainable_variables)
                ]
            )
            coefficient = tf.minimum(
                1.0, tf.sqrt(tf.math.divide_no_nan(self.norm_constraint, sq_norm))
            )
            coefficient = tf.where(sq_norm > 0.0, coefficient, 1.0)
            scale = lr * coefficient
        for g, v in zip(grads, trainable_variables):
            momentum = self.momentums[self._get_variable_index(v)]
            step = tf.cast(direction[self._var_key(v)] * scale, v.dtype)
            self.assign(momentum, self.momentum * momentum - step)
            self.assign_add(v, momentum)


def _all_finite(tensors):
    """True iff every element of every (non-None) tensor is finite."""
    checks = [
        tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32)))
        for t in tensors
        if t is not None
    ]
    return tf.reduce_all(checks) if checks else tf.constant(True)


@keras.saving.register_keras_serializable(package="tkfac_tf")
class TKFAC(KroneckerFactoredOptimizer):
    """Trace-restricted K-FAC (Gao et al., AAAI 2021): F_l ≈ δ Φ ⊗ Ψ."""

    approximation = "tkfac"


@keras.saving.register_keras_serializable(package="tkfac_tf")
class KFAC(KroneckerFactoredOptimizer):
    """Classic K-FAC (Martens & Grosse 2015): F_l ≈ A ⊗ G."""

    approximation = "kfac"
