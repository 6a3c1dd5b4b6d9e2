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
steps from 0, so the first step does all three; inverses also on every step
k < ``inverse_warmup_steps``). ``None`` hands that part to the user.

Adaptive optimizers (``adaptive=True``, e.g. ``TKFAC.adaptive(...)``) replace
step 3 by the quadratic-model step of Martens & Grosse (2015, §6–7): with
Δ = −precond(∇) and δ the previous update,

    (α, μ) = argmin M(αΔ + μδ),   M(u) = h + ∇ᵀu + ½ uᵀ(G + λI)u,
    u = lr · (αΔ + μδ),   θ ← θ + u,

G the exact Gauss–Newton (= Fisher) matrix of the loss on this batch
(``curvature``), and every ``damping_adaptation_interval`` steps the
Levenberg–Marquardt rule adapts λ from ρ = (h(θ+u) − h(θ)) / (M₀(u) − M₀(0)),
M₀ the model without its damping term ½λ‖u‖² (as tensorflow/kfac and
kfac-jax compute it: ρ = 1 on an exactly quadratic loss whatever λ is).
The curvature side (blocks, statistics, inverses) is ``estimator``.

Under tf.distribute (``distribution``) the step runs in each replica on its
slice of the batch: gradients, statistic sums and the adaptive step's loss
and curvature products are summed over replicas, inverses are placed by
``inverse_placement``, and every state change is committed on every device.
"""

import numbers
import random

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tkfac_tf import curvature as curvature_lib
from tkfac_tf import distribution
from tkfac_tf import estimator as estimator_lib
from tkfac_tf import fisher_blocks
from tkfac_tf import fisher_factors
from tkfac_tf import layer_collection as layer_collection_lib

ESTIMATION_MODES = estimator_lib.ESTIMATION_MODES
CURVATURES = ("exact", "approximate")

ADAPTIVE_DEFAULTS = dict(
    learning_rate=1.0,
    damping=1e-3,
    cov_ema_decay=0.95,
    cov_update_every=1,
    inv_update_every=5,
    inverse_warmup_steps=5,
)
"""Settings of ``TKFAC.adaptive()`` / ``KFAC.adaptive()`` besides adaptive=True
(any of them can be overridden there)."""


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


def _check_count(name, value):
    value = _scalar(name, value, integer=True, what="an integer >= 0", error=ValueError)
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}.")
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
        labels) or 'exact' (all outcomes; one backward pass per output unit
        and output position).
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
      damping_split: how λ is split between a Kronecker block's two
        factors: 'sqrt' (√λ added to each), 'pi' (π√λ and √λ/π,
        π = √((tr P / d_a) / (tr Q / d_g)); for TKFAC π = √(d_g / d_a)), or
        None for the approximation's own rule ('sqrt' for TKFAC as in Gao et
        al., 'pi' for K-FAC as in Martens & Grosse). See docs/math.md.
      inverse_warmup_steps: k ≥ 0: the inverses are also recomputed on every
        step k' < k (so the first preconditioners are not built from the
        first batch alone); needs inv_update_every.
      adaptive: choose α, μ by the quadratic model and adapt λ by
        Levenberg–Marquardt every step (see the module docstring); then
        ``learning_rate`` multiplies the model's step (1 = its minimiser),
        ``momentum`` is unused and ``norm_constraint`` must be None. The
        step needs the batch's loss: in ``model.fit`` it is recorded when
        the collection knows the model (``LayerCollection.from_model`` or
        ``register_model``); in a custom loop pass
        ``apply_gradients(..., loss_fn=...)``.
      curvature: 'exact' (the Gauss–Newton matrix of the loss on the batch,
        by forward-mode products: one extra forward pass per direction) or
        'approximate' (the blocks' own P ⊗ Q, no extra pass; unregistered
        variables then add no curvature).
      curvature_batch_size: None (the whole batch) or n ≥ 1: in
        ``model.fit``, the loss re-evaluations of the adaptive step (the
        exact curvature products) use only the first n examples of each
        replica's batch (cost ∝ n); the gradient, Δ and ρ's two losses
        (every ``damping_adaptation_interval`` steps) keep the whole batch.
        Assumes the loss averages over the examples (Keras' default
        reduction). Custom loops pass ``apply_gradients(...,
        curvature_loss_fn=...)`` over ``x[:n]`` instead. Experimental
        (docs/performance.md).
      damping_adaptation_interval: T ≥ 1, adapt λ on steps k with
        (k + 1) % T == 0 (one extra forward pass at θ + u each).
      damping_adaptation_decay: ω₁ in (0, 1): λ is multiplied or divided by
        ω = ω₁ᵀ.
      min_damping, max_damping: bounds of the adapted λ.
      inverse_placement: under tf.distribute, 'distributed' (each block is
        inverted on one replica, balanced by cost, and the inverses are
        all-reduced) or 'replicated' (every replica inverts every block).
        No effect on one device.
      matmul_dtype: input dtype of the large products — the factor
        statistics and the preconditioning L̂⁻¹ ∇Θ R̂⁻¹ — 'float32' or
        'bfloat16' (the products' inputs and results rounded to bfloat16;
        every running average, inverse, momentum and weight stays float32).
        bfloat16 is faster only where the hardware multiplies it natively
        (CPUs with AVX512_BF16 / AMX under oneDNN, GPUs, TPUs): elsewhere
        it is slower (docs/performance.md).
      cov_batch_size: None (the default: every example) or m ≥ 1: the factor
        statistics of each covariance update are taken from a random subset
        of m examples of each replica's batch (the whole batch when it has
        at most m), drawn from (seed, step, replica): the factor matmuls and
        convolution patches cost m/N of the batch's, the sampled backward
        pass still runs over the whole batch. Unbiased (sums over the subset
        with its count m). Diagonal blocks of generic variables always use
        the whole batch. See docs/performance.md.
      inverse_method: how the damped factors are inverted
        (``fisher_factors.damped_inverse``): 'cholesky' (the fastest in our
        measurements, docs/performance.md), 'eigh', or 'newton_schulz' (two
        Newton–Schulz steps from the previous inverse when that warm start
        is provably close enough, else Cholesky).
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
        damping_split=None,
        inverse_warmup_steps=0,
        adaptive=False,
        curvature="exact",
        curvature_batch_size=None,
        damping_adaptation_interval=5,
        damping_adaptation_decay=0.95,
        min_damping=1e-8,
        max_damping=1e8,
        inverse_placement="distributed",
        matmul_dtype="float32",
        cov_batch_size=None,
        inverse_method="cholesky",
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
        # estimation_mode and seed live in the estimator only (read through
        # the properties below).
        if matmul_dtype not in fisher_factors.MATMUL_DTYPES:
            raise ValueError(
                f"matmul_dtype must be one of {fisher_factors.MATMUL_DTYPES}; got {matmul_dtype!r}."
            )
        if damping_split is not None and damping_split not in fisher_blocks.DAMPING_SPLITS:
            raise ValueError(
                f"damping_split must be None or one of {fisher_blocks.DAMPING_SPLITS}; "
                f"got {damping_split!r}."
            )
        object.__setattr__(self, "estimator", estimator_lib.FisherEstimator(
            self.approximation, estimation_mode, _scalar("seed", seed, integer=True), matmul_dtype,
            cov_batch_size=_check_interval("cov_batch_size", cov_batch_size),
            damping_split=damping_split,
        ))
        self.inverse_warmup_steps = _check_count("inverse_warmup_steps", inverse_warmup_steps)
        if self.inverse_warmup_steps and self.inv_update_every is None:
            raise ValueError(
                "inverse_warmup_steps needs the automatic inverse schedule "
                "(inv_update_every); with inv_update_every=None call "
                "inv_update_op() yourself."
            )
        if not isinstance(adaptive, (bool, np.bool_)):
            raise TypeError(f"adaptive must be True or False; got {adaptive!r}.")
        self.adaptive = bool(adaptive)
        if curvature not in CURVATURES:
            raise ValueError(f"curvature must be one of {CURVATURES}; got {curvature!r}.")
        self.curvature = curvature
        self.curvature_batch_size = _check_interval("curvature_batch_size", curvature_batch_size)
        self.damping_adaptation_interval = _check_interval(
            "damping_adaptation_interval", damping_adaptation_interval
        )
        if self.damping_adaptation_interval is None:
            raise ValueError("damping_adaptation_interval must be an integer >= 1; got None.")
        self.damping_adaptation_decay = _check_number(
            "damping_adaptation_decay", damping_adaptation_decay, 0.0, 1.0, low_open=True
        )
        self.min_damping = _check_number("min_damping", min_damping, 0.0, float("inf"), low_open=True)
        self.max_damping = _check_number("max_damping", max_damping, self.min_damping, float("inf"), high_open=False)
        if adaptive and norm_constraint is not None:
            raise ValueError(
                "norm_constraint (KL clipping) is for the fixed-step optimizer; "
                "the adaptive step is sized by its quadratic model. Pass "
                "norm_constraint=None with adaptive=True."
            )
        if inverse_placement not in distribution.INVERSE_PLACEMENTS:
            raise ValueError(
                f"inverse_placement must be one of {distribution.INVERSE_PLACEMENTS}; "
                f"got {inverse_placement!r}."
            )
        self.inverse_placement = inverse_placement
        if inverse_method not in fisher_factors.INVERSE_METHODS:
            raise ValueError(
                f"inverse_method must be one of {fisher_factors.INVERSE_METHODS}; "
                f"got {inverse_method!r}."
            )
        self.inverse_method = inverse_method
        # Per thread: MirroredStrategy applies each replica's step on a thread.
        object.__setattr__(self, "_thread_state", distribution.ThreadLocal(step_loss_fns=None))
        with keras.name_scope(self.name):
            self._damping = keras.Variable(
                damping, name="damping", dtype="float32", trainable=False
            )
        object.__setattr__(self, "_layer_collection", None)
        object.__setattr__(self, "_collection_config", None)
        # Whether cov_update_op / inv_update_op were ever called (traced), and
        # whether the "never updated" warning was logged.
        object.__setattr__(self, "_manual_calls", set())
        object.__setattr__(self, "_warned_never_updated", False)
        object.__setattr__(self, "_warned_curvature_batch_size", False)
        if isinstance(layer_collection, dict):
            # From get_config(): bound to a model later by attach(model).
            object.__setattr__(self, "_collection_config", layer_collection)
        else:
            self.layer_collection = layer_collection

    @classmethod
    def adaptive(cls, layer_collection=None, **kwargs):
        """The adaptive optimizer with library defaults (``ADAPTIVE_DEFAULTS``):
        α, μ from the quadratic model with the exact curvature, λ by
        Levenberg–Marquardt. Keyword arguments override the defaults."""
        options = dict(ADAPTIVE_DEFAULTS)
        options.update(kwargs)
        return cls(layer_collection=layer_collection, adaptive=True, **options)

    # --- configuration ---------------------------------------------------------
    @property
    def damping(self):
        """λ as a float32 variable (read it, or assign a float to change it)."""
        return self._damping

    @damping.setter
    def damping(self, value):
        self._damping.assign(_check_number("damping", value, 0.0, float("inf"), low_open=True))

    @property
    def estimation_mode(self):
        """'gradients', 'empirical' or 'exact' (see the class docstring)."""
        return self.estimator.estimation_mode

    @estimation_mode.setter
    def estimation_mode(self, mode):
        if mode not in ESTIMATION_MODES:
            raise ValueError(f"estimation_mode must be one of {ESTIMATION_MODES}; got {mode!r}.")
        self.estimator.estimation_mode = mode

    @property
    def seed(self):
        """Integer seed of the sampled targets and of the example subsets."""
        return self.estimator.seed

    @property
    def matmul_dtype(self):
        """'float32' or 'bfloat16': see the class docstring."""
        return self.estimator.matmul_dtype

    @property
    def cov_batch_size(self):
        """Examples per replica the statistics are taken from (None: all)."""
        return self.estimator.cov_batch_size

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
            self._bind_estimator(self._trainable_variables)
        return collection

    @property
    def fisher_blocks(self):
        """dict layer name -> Fisher block (available once built)."""
        return dict(self.estimator.blocks)

    @property
    def num_cov_updates(self):
        """How many covariance updates have been applied (int64 variable)."""
        return self._num_cov_updates

    @property
    def step_learning_rate(self):
        """The step size of the last applied step (float32 variable): α·lr
        for adaptive optimizers, lr·c (c: KL clipping) otherwise."""
        return self._step_learning_rate

    @property
    def step_momentum(self):
        """The momentum of the last applied step (float32 variable): μ·lr
        for adaptive optimizers, τ otherwise."""
        return self._step_momentum

    @property
    def reduction_ratio(self):
        """ρ of the last damping adaptation (float32 variable; adaptive only)."""
        return self._reduction_ratio

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
                "damping_split": self.estimator.damping_split,
                "inverse_warmup_steps": self.inverse_warmup_steps,
                "adaptive": self.adaptive,
                "curvature": self.curvature,
                "curvature_batch_size": self.curvature_batch_size,
                "damping_adaptation_interval": self.damping_adaptation_interval,
                "damping_adaptation_decay": self.damping_adaptation_decay,
                "min_damping": self.min_damping,
                "max_damping": self.max_damping,
                "inverse_placement": self.inverse_placement,
                "matmul_dtype": self.matmul_dtype,
                "cov_batch_size": self.cov_batch_size,
                "inverse_method": self.inverse_method,
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
        self._step_learning_rate = self.add_variable(
            (), initializer="zeros", dtype="float32", name="step_learning_rate"
        )
        self._step_momentum = self.add_variable(
            (), initializer="zeros", dtype="float32", name="step_momentum"
        )
        self._reduction_ratio = self.add_variable(
            (), initializer="zeros", dtype="float32", name="reduction_ratio"
        )
        self.estimator.build(
            collection_config,
            lambda shape, init, name: self.add_variable(
                shape, initializer=init, dtype="float32", name=name
            ),
            self.conv_damping,
            self.conv_damping_floor,
        )
        if self._layer_collection is not None:
            self._bind_estimator(variables)

    def _bind_estimator(self, variables):
        self.estimator.bind(self._layer_collection, variables, self._var_key, self.name)

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
        distribution.check_strategy_supported(type(self).__name__, what)

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
        its own scheduled covariance update for this step). ``loss`` is the
        training loss, needed only by estimation_mode='empirical' in custom
        loops. If the statistics are not finite the averages are left
        unchanged and ``skipped_steps`` counts it. Under tf.distribute call
        it in replica context (inside ``strategy.run``).
        """
        self._require_bound("cov_update_op()")
        self._manual_calls.add("cov")
        recorder = self._layer_collection.recorder
        record = recorder.take_for_covariance_update()
        if record is not None and loss is not None:
            record.loss = loss
        # The global batch's statistics: this replica's sums, summed over replicas.
        sums = self.estimator.batch_statistic_sums(record, self.iterations)
        statistics = self.estimator.statistics_from_sums(distribution.all_reduce_sum(sums))
        finite = _all_finite(statistics)
        self._on_every_device(
            lambda statistics, finite: self._run_if_else(
                finite,
                lambda: self._assign_statistics(statistics),
                lambda: self._skipped_steps.assign_add(1),
            ),
            statistics,
            finite,
        )
        # This step is counted once: apply_gradients does not count it again.
        recorder.note_covariance_skipped(tf.logical_not(finite))

    def inv_update_op(self):
        """Recomputes every block's damped inverses from the running averages
        (under tf.distribute: in replica context, placed by
        ``inverse_placement``)."""
        self._require_bound("inv_update_op()")
        self._manual_calls.add("inv")
        self._update_inverses_if(tf.constant(True))

    def apply_gradients(self, grads_and_vars, loss_fn=None, curvature_loss_fn=None):
        """Applies one step. ``loss_fn``: callable() -> the scalar training
        loss of this batch recomputed from the model (its forward pass with
        training=True); the adaptive step re-evaluates it (curvature products
        and ρ). ``curvature_loss_fn``: the same loss on part of the batch
        (e.g. ``lambda: loss(y[:n], model(x[:n], training=True))``) for the
        curvature products only, which then cost ∝ n; ρ keeps ``loss_fn``.
        Neither is needed in ``model.fit`` (see ``curvature_batch_size``),
        nor by fixed-step optimizers."""
        for name, fn in (("loss_fn", loss_fn), ("curvature_loss_fn", curvature_loss_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable or None; got {type(fn).__name__}.")
        if curvature_loss_fn is not None and loss_fn is None:
            raise ValueError(
                "apply_gradients: curvature_loss_fn needs loss_fn too (the whole batch's loss, "
                "which ρ re-evaluates)."
            )
        state = self._thread_state
        fns = None if loss_fn is None else (curvature_loss_fn or loss_fn, loss_fn)
        previous, state.step_loss_fns = state.step_loss_fns, fns
        try:
            return super().apply_gradients(grads_and_vars)
        finally:
            state.step_loss_fns = previous

    def _apply_weight_decay(self, variables):
        """Keras applies decay before the update step; here it runs inside the
        step instead, so that a skipped (non-finite) step changes nothing."""
        del variables

    # --- replicas ----------------------------------------------------------------
    def _on_every_device(self, fn, *args):
        """``fn(*args)`` on every device of the strategy (directly without
        one): the only place optimizer state and weights are assigned."""
        distribution.commit_on_every_device(self._num_cov_updates.value, fn, *args)

    def _update_inverses_if(self, predicate):
        """Recomputes the inverses where ``predicate`` (a bool tensor, the
        same on every replica) holds: on every device ('replicated', or one
        replica), or each block on its owner replica and then summed over
        replicas ('distributed')."""
        count = distribution.num_replicas()
        if self.inverse_placement == "replicated" or count == 1:
            self._on_every_device(
                lambda p: self._run_if(
                    p, lambda: self.estimator.update_inverses(self._damping, self.inverse_method)
                ),
                predicate,
            )
            return
        blocks = list(self.estimator.blocks.values())
        distribution.distributed_update(
            predicate,
            [block.inverse_variables for block in blocks],
            distribution.assign_owners(self.estimator.inverse_costs(), count),
            lambda job: blocks[job].inverse_values(self._damping, method=self.inverse_method),
        )

    # --- the step -------------------------------------------------------------------
    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """One step: scheduled covariance / inverse updates, then the
        preconditioned update; all of it skipped if anything is non-finite.
        Under tf.distribute this runs in replica context: gradients and
        statistics are summed over replicas first, so every replica computes
        the same update."""
        self._require_bound("apply_gradients()")
        # Applied updates so far (differs from _iterations under Keras'
        # gradient_accumulation_steps, which calls this every k-th batch).
        step = tf.convert_to_tensor(self.iterations)
        record = self._layer_collection.recorder.take()
        self._warn_if_never_updated()
        loss_fns = self._loss_fns_for_step(record)
        grads = distribution.all_reduce_sum(list(grads))
        learning_rate = tf.cast(learning_rate, tf.float32)
        finite = _all_finite(grads)
        counted = tf.constant(False)  # skipped and counted by cov_update_op
        if record is not None and record.covariance_skipped is not None:
            counted = record.covariance_skipped
        if self.cov_update_every is not None and not (
            record is not None and record.covariance_updated
        ):
            is_cov_step = step % self.cov_update_every == 0
            sums = tf.cond(
                is_cov_step,
                lambda: self.estimator.batch_statistic_sums(record, step),
                self.estimator.zero_sums,
            )

            def assign_if_finite(sums):
                statistics = self.estimator.statistics_from_sums(sums)
                self._run_if(_all_finite(statistics),
                             lambda: self._assign_statistics(statistics))

            # Summed over replicas on covariance steps only; a non-finite
            # result skips the whole step.
            finite = finite & distribution.sum_and_commit_if(
                is_cov_step & finite,
                sums,
                self._num_cov_updates.value,
                assign_if_finite,
                lambda sums: _all_finite(self.estimator.statistics_from_sums(sums)),
            )
        if self.inv_update_every is not None:
            is_inv_step = (step % self.inv_update_every == 0) | (step < self.inverse_warmup_steps)
            self._update_inverses_if(is_inv_step & finite)
        directions = self.estimator.precondition(grads, trainable_variables, self._var_key)
        if self.adaptive:
            self._apply_adaptive(
                grads, directions, trainable_variables, learning_rate, step, loss_fns,
                finite, counted,
            )
        else:
            self._on_every_device(
                lambda grads, directions, lr, finite, counted: self._run_if_else(
                    finite,
                    lambda: self._apply_fixed(grads, directions, trainable_variables, lr),
                    lambda: self._count_skipped_step(counted),
                ),
                grads, directions, learning_rate, finite, counted,
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

    def _assign_statistics(self, statistics):
        """Running averages ← statistics (the first update initialises them)."""
        first = tf.equal(self._num_cov_updates, 0)
        self.estimator.update_running_averages(statistics, self.cov_ema_decay, first)
        self._num_cov_updates.assign_add(1)

    # --- the update rules (run on every device) ---------------------------------------
    def _count_skipped_step(self, counted):
        """skipped_steps + 1, unless this step's cov_update_op counted it."""
        self._skipped_steps.assign_add(tf.cast(tf.logical_not(counted), tf.int64))

    def _apply_decoupled_weight_decay(self, trainable_variables, learning_rate):
        """θ ← θ − α·wd·θ for the variables Keras' weight-decay settings
        select (``exclude_from_weight_decay``)."""
        if self.weight_decay is None:
            return
        for variable in trainable_variables:
            if self._use_weight_decay(variable):
                decay = tf.cast(learning_rate * self.weight_decay, variable.dtype)
                self.assign_sub(variable, variable * decay)

    def _apply_fixed(self, grads, directions, trainable_variables, learning_rate):
        """ζ = −α·c·precond(∇), m ← τ m + ζ, θ ← θ + m (c: KL clipping);
        decoupled weight decay first."""
        self._apply_decoupled_weight_decay(trainable_variables, learning_rate)
        lr = learning_rate
        scale = lr
        if self.norm_constraint is not None:
            sq_norm = lr * lr * curvature_lib.dot(directions, grads)
            coefficient = tf.minimum(
                1.0, tf.sqrt(tf.math.divide_no_nan(self.norm_constraint, sq_norm))
            )
            coefficient = tf.where(sq_norm > 0.0, coefficient, 1.0)
            scale = lr * coefficient
        for direction, v in zip(directions, trainable_variables):
            momentum = self.momentums[self._get_variable_index(v)]
            self.assign(momentum, self.momentum * momentum - tf.cast(direction * scale, v.dtype))
            self.assign_add(v, momentum)
        self._step_learning_rate.assign(scale)
        self._step_momentum.assign(self.momentum)

    def _loss_fns_for_step(self, record):
        """The adaptive step's loss re-evaluations (curvature, ρ): those
        given to apply_gradients, else the step's recorded
        compute_loss, for the curvature products on the first
        ``curvature_batch_size`` examples and for ρ on the whole batch (ρ
        compares the loss's real change with the model's, whose gradient is
        the whole batch's); None when not adaptive."""
        if not self.adaptive:
            return None
        if self._thread_state.step_loss_fns is not None:
            if self.curvature_batch_size is not None:
                self._warn_curvature_batch_size(
                    "the loss functions given to apply_gradients are used as they are "
                    "(pass curvature_loss_fn over the first "
                    f"{self.curvature_batch_size} examples of the batch for the same effect)"
                )
            return self._thread_state.step_loss_fns
        loss_fn = whole_batch = None
        if record is not None:
            whole_batch = record.recorded_loss_fn()
            try:
                loss_fn = curvature_lib.recorded_loss_fn(record, self.curvature_batch_size)
            except (TypeError, ValueError) as error:
                self._warn_curvature_batch_size(
                    f"the recorded inputs could not be sliced ({error}); the whole batch is used"
                )
                loss_fn = whole_batch
        if loss_fn is None:
            raise ValueError(
                f"The adaptive {type(self).__name__} needs this batch's loss. In "
                "model.fit build the collection with "
                "LayerCollection.from_model(model, loss=...) or call "
                "layer_collection.register_model(model); in a custom loop pass "
                "opt.apply_gradients(grads_and_vars, loss_fn=lambda: "
                "loss(y, model(x, training=True)))."
            )
        return loss_fn, whole_batch if self.curvature_batch_size is not None else loss_fn

    def _warn_curvature_batch_size(self, why):
        if not self._warned_curvature_batch_size:
            object.__setattr__(self, "_warned_curvature_batch_size", True)
            logging.warning(
                "%s: curvature_batch_size=%d has no effect here: %s. (Logged once.)",
                self.name, self.curvature_batch_size, why,
            )

    def _apply_adaptive(
        self, grads, directions, trainable_variables, learning_rate, step, loss_fns, finite,
        counted,
    ):
        """The quadratic-model step with Levenberg–Marquardt damping (see the
        module docstring); skipped (weights, previous update and λ unchanged;
        ``skipped_steps`` + 1 unless ``counted`` already) if the step or the
        model is not finite; skipped with λ raised (λ/ω) if ρ is not finite on
        an adaptation step (the loss at θ + u overflowed). Under
        tf.distribute the loss and the exact curvature products of each replica's slice are summed over replicas
        (each replica's loss is its share of the global mean). ``loss_fns``:
        the loss re-evaluations of the curvature products and of ρ."""
        # Δ = −directions: every product is taken with the directions d and
        # the signs are applied to the 2×2 results (no negated copy of Δ).
        momenta = [self.momentums[self._get_variable_index(v)] for v in trainable_variables]
        previous = [tf.cast(m, tf.float32) for m in momenta]
        values = [tf.cast(v, tf.float32) for v in trainable_variables]
        vectors = [list(directions), previous]
        signs = tf.constant([-1.0, 1.0])
        flip = signs[:, None] * signs[None, :]
        probe, rho_probe = (
            curvature_lib.LossProbe(
                self._layer_collection.recorder,
                {id(d.layer): d.tensor for d in self._layer_collection.distributions},
                trainable_variables,
                loss_fn,
            )
            for loss_fn in loss_fns
        )
        if self.curvature == "exact":
            loss, gram = distribution.all_reduce_sum(
                curvature_lib.gauss_newton_gram(probe, values, vectors)
            )
        else:
            gram = self.estimator.approximate_curvature_products(
                vectors, trainable_variables, self._var_key
            )
            loss = None
        if loss_fns[1] is not loss_fns[0]:
            loss = None  # h(θ) of the curvature pass is not the batch's: ρ evaluates both
        gram = flip * gram
        damping = tf.convert_to_tensor(self._damping)
        # [d, δ, ∇]ᵀ[d, δ, ∇] in one pass over the three vectors.
        dots = curvature_lib.pairwise_dots(vectors + [grads])
        identity_gram = flip * dots[:2, :2]
        matrix = gram + damping * identity_gram
        linear = signs * dots[2, :2]
        alpha, mu = curvature_lib.solve_quadratic_model(
            matrix, linear, identity_gram[1, 1] > 0.0
        )
        coefficients = (learning_rate * alpha, learning_rate * mu)
        # ρ's prediction leaves the damping term out (as tensorflow/kfac and
        # kfac-jax do): on an exactly quadratic loss ρ = 1 whatever λ is.
        model_change = curvature_lib.quadratic_model_change(coefficients, linear, gram)
        updates = [coefficients[1] * p - coefficients[0] * d for d, p in zip(directions, previous)]
        adapt = (step + 1) % self.damping_adaptation_interval == 0

        def losses_before_and_after():
            before = loss if loss is not None else rho_probe.loss(values)
            after = rho_probe.loss([v + u for v, u in zip(values, updates)])
            return tf.stack([before, after]) if loss is None else tf.stack([0.0, after])

        # Collectives stay outside tf.cond: the replicas' losses are summed
        # on every step (two scalars), computed only when λ adapts.
        before, after = tf.unstack(
            distribution.all_reduce_sum(
                tf.cond(adapt, losses_before_and_after, lambda: tf.zeros([2]))
            )
        )
        if loss is not None:
            before = loss
        rho = tf.where(adapt, (after - before) / model_change, 0.0)
        step_finite = finite & _all_finite([alpha, mu, model_change])
        rho_finite = tf.math.is_finite(rho)
        ok = step_finite & rho_finite
        # A finite step whose loss at θ + u is not finite (overflow) is
        # skipped and, on an adaptation step, raises λ for the next one.
        failed_adaptation = step_finite & adapt & tf.logical_not(rho_finite)
        decay = self.damping_adaptation_decay ** self.damping_adaptation_interval
        new_damping = curvature_lib.levenberg_marquardt(
            damping, rho, decay, self.min_damping, self.max_damping
        )

        def commit(updates, coefficients, rho, new_damping, adapt, lr):
            self._apply_decoupled_weight_decay(trainable_variables, lr)
            for variable, momentum, update in zip(trainable_variables, momenta, updates):
                self.assign(momentum, tf.cast(update, momentum.dtype))
                self.assign_add(variable, tf.cast(update, variable.dtype))
            self._step_learning_rate.assign(coefficients[0])
            self._step_momentum.assign(coefficients[1])

            def adapt_damping():
                self._reduction_ratio.assign(rho)
                self._damping.assign(new_damping)

            self._run_if(adapt, adapt_damping)

        def skip(counted, failed_adaptation, new_damping):
            self._count_skipped_step(counted)
            self._run_if(failed_adaptation, lambda: self._damping.assign(new_damping))

        self._on_every_device(
            lambda ok, counted, failed, updates, coefficients, rho, new_damping, adapt, lr: (
                self._run_if_else(
                    ok,
                    lambda: commit(updates, coefficients, rho, new_damping, adapt, lr),
                    lambda: skip(counted, failed, new_damping),
                )
            ),
            ok, counted, failed_adaptation, updates, coefficients, rho, new_damping, adapt,
            learning_rate,
        )


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
