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
A measured step that raised the batch loss (ρ < 0) is rejected: not applied,
λ ← 10λ, and every step is measured until an adaptation step keeps its step
(``update_rules.rejects``); the first step is measured too.
The curvature side (blocks, statistics, inverses) is ``estimator``.

Under tf.distribute (``distribution``) the step runs in each replica on its
slice of the batch: gradients, statistic sums and the adaptive step's loss
and curvature products are summed over replicas, inverses are placed by
``inverse_placement``, and every state change is committed on every device.
"""

from __future__ import annotations

import inspect
import types
import weakref
from typing import Any, Callable, Optional

import keras
import tensorflow as tf
from absl import logging

from tkfac_tf import curvature as curvature_lib
from tkfac_tf import distribution
from tkfac_tf import estimator as estimator_lib
from tkfac_tf import keras_compat
from tkfac_tf import layer_collection as layer_collection_lib
from tkfac_tf import schedule
from tkfac_tf import step as step_lib
from tkfac_tf.options import INFINITY, Options, number

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

MIN_AUTO_CURVATURE_EXAMPLES = 64
"""With ``curvature_batch_size='auto'`` a BatchNorm network's curvature
products never take fewer examples than this (smaller batches keep the
whole batch): on the suite's ResNet 16 of 32 and 32 of 128 examples made
the adaptive step unstable, 64 of 128 did not (docs/adaptive.md)."""


def _checked_learning_rate(value: Any) -> Any:
    """A LearningRateSchedule (or other callable) as it is, else a number ≥ 0."""
    return value if callable(value) else number("learning_rate", value, 0.0, INFINITY)


def _adaptive_preset(cls, layer_collection=None, **kwargs):
    """The adaptive optimizer with library defaults (``ADAPTIVE_DEFAULTS``):
    α, μ from the quadratic model with the exact curvature, λ by
    Levenberg–Marquardt. Keyword arguments override the defaults."""
    options = dict(ADAPTIVE_DEFAULTS)
    options.update(kwargs)
    return cls(layer_collection=layer_collection, adaptive=True, **options)


class _PresetOrOption:
    """``Cls.adaptive(...)`` is the preset constructor; ``opt.adaptive`` the
    value of the option (whether the optimizer is adaptive)."""

    __doc__ = _adaptive_preset.__doc__

    def __get__(self, obj, cls):
        if obj is None:
            return types.MethodType(_adaptive_preset, cls)
        return obj.options.adaptive.adaptive


def _option_property(name):
    def get(self):
        return self.options.get(name)

    get.__doc__ = f"The ``{name}`` option (read-only; see the class docstring)."
    return property(get)


class KroneckerFactoredOptimizer(keras.optimizers.Optimizer):
    """Shared implementation of :class:`TKFAC` and :class:`KFAC`.

    Args:
      learning_rate: α ≥ 0 (0 is allowed, e.g. to start a warm-up) or a
        ``keras.optimizers.schedules.LearningRateSchedule``.
      damping: λ > 0 (a variable: assign ``opt.damping = x`` to change it).
      layer_collection: a :class:`tkfac_tf.LayerCollection` of the model.
      momentum: τ in [0, 1).
      cov_ema_decay: ε in [0, 1), decay of the factors' running averages
        (per update of the whole batch's statistics; see ``statistics_pass``).
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
        ``apply_gradients(..., loss_fn=...)``. The options below up to
        ``max_damping`` act on the adaptive step only: given with
        adaptive=False they have no effect, and a warning names them.
      curvature: 'exact' (the Gauss–Newton matrix of the loss on the batch,
        by forward-mode products: one extra forward pass per direction) or
        'approximate' (the blocks' own P ⊗ Q, no extra pass; unregistered
        variables then add no curvature).
      curvature_batch_size: how many of each replica's batch's first
        examples the adaptive step's exact curvature products take (cost
        ∝ that number); the gradient, Δ and ρ's two losses (every
        ``damping_adaptation_interval`` steps) keep the whole batch.
        'auto' (the default): the first half of the batch, but at least
        ``MIN_AUTO_CURVATURE_EXAMPLES`` (64) examples, when a layer of the
        collection normalises over the batch in training mode
        (BatchNormalization; ``LayerCollection.normalises_over_batch``),
        else the whole batch. A BatchNorm network's
        step acts through its batch's own normalisation statistics, so the
        whole batch's curvature along it is several times what any other
        batch sees (docs/adaptive.md, "BatchNorm and the curvature batch").
        None: the whole batch; n ≥ 1: the first n examples;
        'ghost_halves': the whole batch as its two halves, each in a forward
        pass of its own (with its own BatchNorm moments), their losses
        weighted by size: the BatchNorm networks' choice at batches of 64
        or fewer, where 'auto' keeps the whole batch (docs/adaptive.md), at
        the price of tracing the model once more. Assumes the
        loss averages over the examples (Keras' default reduction). Applied
        in ``model.fit``; custom loops pass ``apply_gradients(...,
        curvature_loss_fn=opt.curvature_loss_fn(loss_on, batch_size))``. A
        fixed n much smaller than
        the batch made the autoencoder benchmark's long runs unstable, and
        16 of the suite's Transformer's 32 sequences diverged it
        (docs/reliability.md, "Finite steps that raise the loss").
      curvature_update_every: k ≥ 1 (k > 1 needs curvature='exact'): the
        Gauss–Newton products of d and δ are computed on steps with
        step % k == 0, on every inverse step, every adaptation step and
        every step after a rejected one; on the others the quadratic model
        uses the preconditioner's own curvature B (d = B⁻¹∇) scaled by
        c ≥ dᵀGd / ∇ᵀd of the last such step: no extra pass, only scalars
        (docs/adaptive.md). 1 (the default) solves the exact model on every
        step. Experimental: it costs steps to the target on the suite
        (docs/suite/curvature_every_2/, docs/suite/amortised/).
      damping_adaptation_interval: T ≥ 1, adapt λ on steps k with
        (k + 1) % T == 0 (one extra forward pass at θ + u each; also on the
        first step and after a rejected step, for the rejection only).
      damping_adaptation_decay: ω₁ in (0, 1): λ is multiplied or divided by
        ω = ω₁ᵀ.
      min_damping, max_damping: bounds of the adapted λ (1e-5, 1e8).
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
      statistics_pass: which forward pass the factor statistics come from:
        'step' (the step's own, every example of the batch), 'curvature':
        on an adaptive step whose exact curvature products re-evaluate the
        model on n of the batch's N examples (``curvature_batch_size`` n,
        or 'auto' on a BatchNorm network at a batch over 64) and run on
        every step, that re-evaluation, recorded once: the statistics then
        take its examples, with their own BatchNorm moments, so their
        sampled backward pass and products cost n/N of the batch's, the
        curvature products walk the same pass, and the running averages
        decay by ε' = 1 − (n/N)(1 − ε) per update (as many examples in
        them as with the whole batch's statistics). Elsewhere (whole-batch,
        'ghost_halves', amortised or approximate curvature, the fixed step,
        a manual covariance schedule, Keras' gradient accumulation) as
        'step'. 'auto' (the default): 'curvature' on a network that
        normalises over the batch (BatchNorm in training mode), else
        'step'. On the suite's BatchNorm networks it made the step 14–20 %
        cheaper and took the ResNet to 0.80× a tuned Adam's seconds on the
        mean of five seeds against 1.00× with 'step' (MobileNetV2: 2.09×
        against 2.19×; docs/suite/statistics_pass/).
      conv_statistics_samples: S (default 8192) or None. Where
        ``cov_batch_size`` is None, a convolution block with P output
        positions per example (so P samples per example) takes its
        statistics from a random subset of max(32, ⌈S / P⌉) examples (the
        whole batch when it has no more): about S samples, and never fewer
        than 32 examples. Dense, embedding and normalisation blocks always
        use the whole batch. None: every block uses the whole batch.
        Not used for blocks with one sample per example
        (``conv_statistics``).
      conv_statistics: the samples of a convolution block (Conv1D, Conv2D,
        grouped, depthwise and separable): 'expand' (one sample (a_t, g_t)
        per example and output position t, KFC of Grosse & Martens 2016),
        'reduce' (one sample per example: the patches averaged and the
        pre-activation gradients summed over its positions, â = mean_t a_t,
        ĝ = Σ_t g_t; K-FAC-reduce of Eschenhagen et al. 2023), or 'auto'
        (the default): 'reduce' for depthwise convolutions (one input
        channel per group: DepthwiseConv2D, SeparableConv2D's depthwise
        part), 'expand' for the others. 'reduce' treats the example's
        gradient Σ_t a_t g_tᵀ as â ĝᵀ (exact where a or g is constant over
        positions); its statistics cost about the layer's forward pass
        instead of P · d_a / d_g times it. On every convolution it breaks
        MobileNetV2's training on the suite, on the depthwise ones it does
        not (docs/conv.md).
      inverse_method: how the damped factors are inverted
        (``fisher_factors.damped_inverse``): 'cholesky' (the fastest in our
        measurements, docs/performance.md), 'eigh', or 'newton_schulz' (two
        Newton–Schulz steps from the previous inverse when that warm start
        is provably close enough, else Cholesky); these invert with the λ
        of the inverse update. 'eigenbasis' keeps the factors'
        eigendecompositions instead and damps them at every step with the
        current λ, so a change of λ (the Levenberg–Marquardt rule,
        ``opt.damping = x``) applies at the very next step, for two more
        matrix products per block and step (docs/performance.md).
      regularizer_curvature: True (the default): the exact curvature of the
        variables' Keras L2 weight regularizers (``kernel_regularizer=L2(c)``
        or ``L1L2``: R = c Σw², Hessian 2c I) is part of the model, as the
        regularization loss is part of the training loss ``fit`` minimises:
        each block's damping adds κ̄, the mean of 2c over its parameters, and
        the adaptive quadratic model adds 2c ⟨uᵢ, uⱼ⟩ exactly. L1 has no
        curvature; other regularizers are not modelled (logged when the
        optimizer is built). False
        leaves both out (for a custom loop whose loss leaves out
        ``model.losses``). See docs/adaptive.md, "Weight regularizers".
      **kwargs: other ``keras.optimizers.Optimizer`` arguments. With
        ``gradient_accumulation_steps=k`` the automatic schedule sums the
        factor statistics of an update over its k micro-batches (the fixed
        step equals that of one batch k times as large, where the statistics
        take every example); the adaptive step's exact curvature and ρ take
        the last micro-batch (docs/adaptive.md).

    Every numeric argument (and ``opt.damping = x``) takes any real scalar
    within its bounds: a Python or NumPy number or a 0-d eager tensor /
    variable; the integer ones (the intervals, ``seed``) take integer
    scalars. Booleans are refused.
    """

    approximation = None
    keeps_momenta = True  # δ, the previous update, one per variable

    def __init__(
        self,
        learning_rate: Any = 0.01,
        damping: Any = 1e-3,
        layer_collection: Optional[layer_collection_lib.LayerCollection] = None,
        name: Optional[str] = None,
        **kwargs: Any,
    ):
        learning_rate = _checked_learning_rate(learning_rate)
        weight_decay = kwargs.pop("weight_decay", None)
        if weight_decay is not None:
            weight_decay = number("weight_decay", weight_decay, 0.0, INFINITY)
        options, keras_kwargs = Options.from_arguments(kwargs)
        super().__init__(
            learning_rate=learning_rate, weight_decay=weight_decay, name=name, **keras_kwargs
        )
        keras_compat.set_untracked(self, "options", options)
        damping = self._checked_damping(damping)
        estimation = options.estimation
        keras_compat.set_untracked(self, "estimator", estimator_lib.FisherEstimator(
            self.approximation, estimation.estimation_mode, estimation.seed,
            estimation.matmul_dtype, cov_batch_size=estimation.cov_batch_size,
            conv_statistics_samples=estimation.conv_statistics_samples,
            damping_split=estimation.damping_split, inverse_method=estimation.inverse_method,
            conv_statistics=estimation.conv_statistics,
            regularizer_curvature=estimation.regularizer_curvature,
        ))
        # Per thread: MirroredStrategy applies each replica's step on a thread.
        keras_compat.set_untracked(
            self, "_thread_state", distribution.ThreadLocal(step_loss_fns=None, micro_batch=None)
        )
        with keras.name_scope(self.name):
            self._damping = keras.Variable(
                damping, name="damping", dtype="float32", trainable=False
            )
        keras_compat.set_untracked(self, "_layer_collection", None)
        keras_compat.set_untracked(self, "_collection_config", None)
        # The model whose compile() registered the collection (None: the user's).
        keras_compat.set_untracked(self, "_registered_by_compile", None)
        # Whether cov_update_op / inv_update_op were ever called (traced), and
        # whether the "never updated" warning was logged.
        keras_compat.set_untracked(self, "_manual_calls", set())
        keras_compat.set_untracked(self, "_warned_never_updated", False)
        keras_compat.set_untracked(self, "_warned_curvature_batch_size", False)
        if isinstance(layer_collection, dict):
            # From get_config(): bound to a model later by attach(model).
            keras_compat.set_untracked(self, "_collection_config", layer_collection)
        else:
            self.layer_collection = layer_collection

    adaptive = _PresetOrOption()

    # --- configuration ---------------------------------------------------------
    @property
    def learning_rate(self) -> Any:
        """α (the fixed rule) or the multiplier of the model's step (the
        adaptive rule): Keras' learning rate, set as Keras sets it (a
        number ≥ 0, checked as the constructor checks it, or a schedule)."""
        return super().learning_rate

    @learning_rate.setter
    def learning_rate(self, value: Any) -> None:
        keras.optimizers.Optimizer.learning_rate.fset(self, _checked_learning_rate(value))

    @property
    def damping(self) -> keras.Variable:
        """λ as a float32 variable (read it, or assign a float to change it)."""
        return self._damping

    @damping.setter
    def damping(self, value: Any) -> None:
        self._damping.assign(self._checked_damping(value))

    def _checked_damping(self, value: Any) -> float:
        """λ > 0 as a float; for the adaptive rule within [min_damping,
        max_damping], the range it adapts λ in (below it the inverses of
        nearly singular factors overflow before λ could rise)."""
        value = number("damping", value, 0.0, INFINITY, low_open=True)
        rule = self.options.adaptive
        if rule.adaptive and not rule.min_damping <= value <= rule.max_damping:
            raise ValueError(
                f"damping (the adaptive rule's initial λ) must lie in [min_damping, max_damping] = "
                f"[{rule.min_damping:g}, {rule.max_damping:g}], the range it adapts λ in; got {value:g}. "
                "Change damping, or min_damping / max_damping."
            )
        return value

    @property
    def estimation_mode(self) -> str:
        """'gradients', 'empirical' or 'exact' (see the class docstring)."""
        return self.estimator.estimation_mode

    @estimation_mode.setter
    def estimation_mode(self, mode: str) -> None:
        if self.built:
            # The step reads it when it is traced: Keras' traced train
            # function would go on with the old mode.
            raise ValueError(
                f"{self.name}: estimation_mode cannot change after the optimizer is built (its "
                "training step may be traced already); create the optimizer with "
                f"estimation_mode={mode!r} instead."
            )
        keras_compat.set_untracked(self, "options", self.options.replace(estimation_mode=mode))
        self.estimator.estimation_mode = mode

    @property
    def layer_collection(self) -> Optional[layer_collection_lib.LayerCollection]:
        return self._layer_collection

    @layer_collection.setter
    def layer_collection(self, collection: Optional[layer_collection_lib.LayerCollection]) -> None:
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
        keras_compat.set_untracked(self, "_layer_collection", collection)
        if collection is not None:
            collection.recorder.eager_tape_wanted = self._eager_tape_wanted

    def _current_collection_config(self):
        """The bound collection's description, else the saved one (a loaded
        optimizer not attached yet), else None."""
        if self._layer_collection is not None:
            return self._layer_collection.get_config()
        return self._collection_config

    def attach(self, model: keras.Model) -> layer_collection_lib.LayerCollection:
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
            self._bind_estimator(keras_compat.trained_variables(self))
        return collection

    def _register_compiled_model(self, model: keras.Model) -> None:
        """What ``model.compile(optimizer=self, ...)`` does to the optimizer:
        without a collection it registers the model
        (``LayerCollection.from_model(model)``: every supported layer, the
        compiled loss's predictive distribution); with a saved one
        (``load_model``) it attaches it. A collection the user passed or an
        earlier compile registered is kept (even released: the next step then
        names the released layer)."""
        collection = self._layer_collection
        registered = self._registered_by_compile and self._registered_by_compile()
        if registered is not None and registered is not model and not collection.released:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' was compiled into model "
                f"'{registered.name}' and holds its layers; an optimizer trains "
                f"one model: compile model '{model.name}' with a new optimizer.")
        if collection is not None:  # the user's, or an earlier compile's (released: the step says so)
            self._warn_if_loss_weights_unmodelled(model, collection)
            return
        if self._collection_config is not None:
            self.attach(model)
        elif not model.built:
            logging.warning(
                "%s: model '%s' is not built when compiled, so its layers "
                "cannot be registered; build it first (keras.Input, or "
                "model.build(input_shape)) and compile again, or pass "
                "layer_collection=LayerCollection.from_model(model).",
                type(self).__name__, model.name)
            return
        else:
            self.layer_collection = layer_collection_lib.LayerCollection.from_model(model)
        keras_compat.set_untracked(self, "_registered_by_compile", weakref.ref(model))

    def _warn_if_loss_weights_unmodelled(self, model, collection) -> None:
        """A warning when ``model`` is compiled with loss weights other than 1
        but ``collection``'s distributions all have coefficient 1 (it was
        built without them): their Fisher then misses the weights."""
        weights = keras_compat.compiled_loss_weights(model)
        if all(w is None or w == 1.0 for w in keras.tree.flatten(weights)):
            return
        if any(d.coefficient != 1.0 for d in collection.distributions):
            return
        logging.warning(
            "%s: model '%s' is compiled with loss_weights=%r, but the layer collection's "
            "predictive distributions all have coefficient 1, so their Fisher ignores the "
            "weights. Build it with LayerCollection.from_model(model, loss, loss_weights=...) "
            "or register_*_predictive_distribution(..., coefficient=...).",
            type(self).__name__, model.name, weights)

    def _release_compiled_model(self, model: keras.Model) -> None:
        """Gives back the layers of ``model`` that its compile() registered
        for this optimizer (the model was compiled again with another one)."""
        registered = self._registered_by_compile and self._registered_by_compile()
        if registered is model and self._layer_collection is not None:
            self._layer_collection.release()

    @property
    def fisher_blocks(self) -> dict:
        """dict layer name -> Fisher block (available once built)."""
        return dict(self.estimator.blocks)

    @property
    def num_cov_updates(self) -> keras.Variable:
        """How many covariance updates have been applied (int64 variable)."""
        return self._num_cov_updates

    @property
    def step_learning_rate(self) -> keras.Variable:
        """The step size of the last applied step (float32 variable): α·lr
        for adaptive optimizers, lr·c (c: KL clipping) otherwise."""
        return self._step_learning_rate

    @property
    def step_momentum(self) -> keras.Variable:
        """The momentum of the last applied step (float32 variable): μ·lr
        for adaptive optimizers, τ otherwise."""
        return self._step_momentum

    @property
    def reduction_ratio(self) -> keras.Variable:
        """ρ of the last damping adaptation or rejected step (float32
        variable; adaptive only); the lowest float32 after a step whose loss
        at θ + u overflowed."""
        return self._reduction_ratio

    @property
    def skipped_steps(self) -> keras.Variable:
        """How many steps skipped an update for non-finite values (int64
        variable): one per step, whether the step's covariance update, its
        apply_gradients or both found non-finite values."""
        return self._skipped_steps

    @property
    def rejected_steps(self) -> keras.Variable:
        """How many finite steps of the adaptive rule were rejected because
        they raised the batch loss they were fitted to, or overflowed it
        (int64 variable; see ``update_rules.rejects``). Not counted in
        ``skipped_steps``."""
        return self._rejected_steps

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(self.options.to_config())
        config["damping"] = float(self._damping.numpy())
        config["layer_collection"] = self._current_collection_config()
        return config

    # --- building ---------------------------------------------------------------
    def build(self, variables: list) -> None:
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
                f"{type(self).__name__} has no layer_collection. Compile a "
                "built model with it (model.compile(optimizer=opt, loss=...) "
                "registers the model's layers), or pass layer_collection="
                "LayerCollection.from_model(model) to the constructor or set "
                "opt.layer_collection before the first step (custom loops)."
            )
        if self._layer_collection is not None:
            self._layer_collection.validate()
        super().build(variables)
        if self.keeps_momenta:
            self.momentums = self.add_optimizer_variables(variables, "momentum")
        self._num_cov_updates = self.add_variable(
            (), initializer="zeros", dtype="int64", name="num_cov_updates"
        )
        self._skipped_steps = self.add_variable(
            (), initializer="zeros", dtype="int64", name="skipped_steps"
        )
        self._rejected_steps = self.add_variable(
            (), initializer="zeros", dtype="int64", name="rejected_steps"
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
        # Amortised exact curvature (curvature_update_every > 1):
        # update_rules.CurvatureCalibration.
        self._curvature_scale = self.add_variable(
            (), initializer="ones", dtype="float32", name="curvature_scale"
        )
        self._momentum_curvature = self.add_variable(
            (), initializer="zeros", dtype="float32", name="momentum_curvature"
        )
        self.estimator.build(
            collection_config,
            lambda shape, init, name: self.add_variable(
                shape, initializer=init, dtype="float32", name=name
            ),
            self.options.estimation.conv_damping,
            self.options.estimation.conv_damping_floor,
        )
        # Under Keras' gradient_accumulation_steps: the statistic sums of the
        # micro-batches since the last update (``step.accumulate_statistics``).
        self._accumulated_sums = []
        if self.gradient_accumulation_steps and self.options.schedule.cov_update_every is not None:
            self._accumulated_sums = [
                self.add_variable(tuple(s.shape), initializer="zeros", dtype="float32",
                                  name=f"{name.replace('/', '_')}_accumulated_sum_{i}")
                for name, block in self.estimator.blocks.items()
                for i, s in enumerate(block.zero_sums())
            ]
        if self._layer_collection is not None:
            self._bind_estimator(variables)

    def _bind_estimator(self, variables):
        self.estimator.bind(
            self._layer_collection, variables, keras_compat.variable_key(self), self.name
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
        distribution.check_strategy_supported(type(self).__name__, what)

    # --- the three parts of a step -----------------------------------------
    def _eager_tape_wanted(self):
        return schedule.eager_tape_wanted(self.options.schedule, int(self.iterations.numpy()))

    def scale_loss(self, loss: Any) -> Any:
        """Keras calls this on the training loss; 'empirical' mode uses it."""
        if self._layer_collection is not None:
            self._layer_collection.recorder.set_loss(loss)
        return super().scale_loss(loss)

    def cov_update_op(self, loss: Any = None) -> None:
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
        finite = step_lib.commit_statistics(self, statistics)
        # The step counts it (skipped_steps) when it commits.
        recorder.note_covariance_skipped(tf.logical_not(finite))

    def inv_update_op(self) -> None:
        """Recomputes every block's damped inverses from the running averages
        (under tf.distribute: in replica context, placed by
        ``inverse_placement``)."""
        self._require_bound("inv_update_op()")
        self._manual_calls.add("inv")
        step_lib.update_inverses(self, tf.constant(True))

    def curvature_examples(self, batch_size: int | tf.Tensor) -> Optional[int | tf.Tensor]:
        """How many of the first examples of a batch of ``batch_size`` (an
        int, or a scalar int32 tensor) the adaptive step's curvature products
        take (``curvature_batch_size``): None for the whole batch (also
        with 'ghost_halves', which takes it in two parts); with
        'auto', when the collection ``normalises_over_batch``,
        max(batch_size // 2, ``MIN_AUTO_CURVATURE_EXAMPLES``), which a batch
        of at most that many examples takes whole; else None."""
        size = self.options.adaptive.curvature_batch_size
        if size == "ghost_halves":
            return None
        if size != "auto":
            return size
        if not self.layer_collection.normalises_over_batch:
            return None
        if isinstance(batch_size, int):
            return None if batch_size <= MIN_AUTO_CURVATURE_EXAMPLES else max(
                batch_size // 2, MIN_AUTO_CURVATURE_EXAMPLES)
        # A batch size known only when the step runs: slicing [:n] with n ≥ batch_size is the whole batch.
        return tf.maximum(batch_size // 2, MIN_AUTO_CURVATURE_EXAMPLES)

    def curvature_loss_fn(self, loss_on: Callable[[Any, Any], Any],
                          batch_size: int | tf.Tensor) -> Optional[Callable[[], Any]]:
        """For a custom loop's ``apply_gradients(..., curvature_loss_fn=)``:
        the re-evaluation ``model.fit`` gives the curvature products, built
        from ``loss_on(start, stop)`` -> the loss of the batch's examples
        [start, stop) recomputed from the model (its forward pass with
        training=True), for a batch of ``batch_size`` examples (an int or a
        scalar int32 tensor). None where that is the whole batch's loss
        (pass ``loss_fn`` alone); with 'ghost_halves' the two halves'
        losses weighted by size (``curvature.ghost_halves_loss``); else the
        first ``curvature_examples(batch_size)`` examples'."""
        return self._curvature_subset_loss_fn(lambda start, stop: lambda: loss_on(start, stop),
                                              batch_size)

    def _curvature_subset_loss_fn(self, loss_fn_on: Callable[[Any, Any], Callable[[], Any]],
                                  batch_size: int | tf.Tensor) -> Optional[Callable[[], Any]]:
        """``curvature_loss_fn`` from ``loss_fn_on(start, stop)`` -> callable()
        -> the loss of examples [start, stop) (called now, for each part the
        curvature products take; the step slices its record there)."""
        if self.options.adaptive.curvature_batch_size == "ghost_halves":
            first, second = (loss_fn_on(*bounds) for bounds in curvature_lib.ghost_halves(batch_size))
            return lambda: curvature_lib.ghost_halves_loss(first(), second(), batch_size)
        count = self.curvature_examples(batch_size)
        return None if count is None else loss_fn_on(0, count)

    def apply_gradients(self, grads_and_vars: Any, loss_fn: Optional[Callable[[], Any]] = None,
                        curvature_loss_fn: Optional[Callable[[], Any]] = None) -> Any:
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

    # --- the step -------------------------------------------------------------------
    def _backend_apply_gradients(self, grads, trainable_variables):
        """Keras' step; under ``gradient_accumulation_steps`` its conditional
        update or accumulation, for which this micro-batch's gradients and
        (on the automatic schedule) statistic sums are taken first
        (``step.micro_batch_statistics``): the sums are added to the
        accumulated sums on accumulation steps, to the update's statistics
        on update steps, so that they cover every micro-batch."""
        if not self.gradient_accumulation_steps:
            return super()._backend_apply_gradients(grads, trainable_variables)
        self._require_bound("apply_gradients()")
        state = self._thread_state
        state.micro_batch = step_lib.micro_batch_statistics(self, grads)
        try:
            return super()._backend_apply_gradients(grads, trainable_variables)
        finally:
            state.micro_batch = None

    def _backend_increment_gradient_accumulators(self, grads, acc_grads):
        super()._backend_increment_gradient_accumulators(grads, acc_grads)
        step_lib.accumulate_statistics(self, self._thread_state.micro_batch)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """One step (``step``): scheduled covariance / inverse updates, then
        the preconditioned update; all of it skipped if anything is
        non-finite. Under tf.distribute this runs in replica context:
        gradients and statistics are summed over replicas first, so every
        replica computes the same update."""
        self._require_bound("apply_gradients()")
        step_lib.run(self, grads, trainable_variables, learning_rate)

    def _warn_if_never_updated(self):
        """Logs once when a step runs with a part of the update that has never
        run: no schedule for it and no manual call so far."""
        missing = schedule.never_updated(self.options.schedule, self._manual_calls)
        if missing and not self._warned_never_updated:
            keras_compat.set_untracked(self, "_warned_never_updated", True)
            schedule.warn_never_updated(self.name, missing)

    def _warn_curvature_batch_size(self, why):
        if not self._warned_curvature_batch_size:
            keras_compat.set_untracked(self, "_warned_curvature_batch_size", True)
            logging.warning(
                "%s: curvature_batch_size=%r has no effect here: %s. (Logged once.)",
                self.name, self.curvature_batch_size, why,
            )


for _name in Options.names():
    if _name not in vars(KroneckerFactoredOptimizer):
        setattr(KroneckerFactoredOptimizer, _name, _option_property(_name))
del _name
KroneckerFactoredOptimizer.__init__.__signature__ = inspect.Signature(
    list(inspect.signature(KroneckerFactoredOptimizer.__init__).parameters.values())[:5]
    + [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
       for name, default in Options.defaults().items()]
    + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
)


@keras.saving.register_keras_serializable(package="tkfac_tf")
class TKFAC(KroneckerFactoredOptimizer):
    """Trace-restricted K-FAC (Gao et al., AAAI 2021): F_l ≈ δ Φ ⊗ Ψ."""

    approximation = "tkfac"


@keras.saving.register_keras_serializable(package="tkfac_tf")
class KFAC(KroneckerFactoredOptimizer):
    """Classic K-FAC (Martens & Grosse 2015): F_l ≈ A ⊗ G."""

    approximation = "kfac"


def _after_compile(model: keras.Model, previous: Any) -> None:
    """keras.Model.compile's hook: a TKFAC / K-FAC optimizer registers the
    model it is compiled into; one the model was compiled with before gives
    back the layers its compile registered."""
    optimizer = keras_compat.inner_optimizer(getattr(model, "optimizer", None))
    previous = keras_compat.inner_optimizer(previous)
    if isinstance(previous, KroneckerFactoredOptimizer) and previous is not optimizer:
        previous._release_compiled_model(model)
    if isinstance(optimizer, KroneckerFactoredOptimizer):
        optimizer._register_compiled_model(model)


keras_compat.call_after_compile(_after_compile)
