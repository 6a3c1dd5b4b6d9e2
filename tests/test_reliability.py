"""Save/resume exactly, non-finite steps, ill-conditioning, mixed precision,
varying batches, callbacks."""

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf

BATCH = 8
RNG = np.random.RandomState(0)
X = RNG.randn(6 * BATCH, 5).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0.5)


def _model_and_optimizer(opt_class=tkfac_tf.TKFAC, seed=3, **kwargs):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(7, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="logits"),
        ]
    )
    collection = tkfac_tf.LayerCollection()
    for layer in model.layers:
        collection.register_dense(layer)
    collection.register_categorical_predictive_distribution(model.layers[-1])
    options = dict(learning_rate=0.05, damping=0.01, layer_collection=collection,
                   inv_update_every=2, seed=5)
    options.update(kwargs)
    opt = opt_class(**options)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, opt


def _fit(model, x, y, epochs=1, **kwargs):
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, **kwargs)


def _state(model, opt):
    return [v.numpy() for v in model.trainable_weights] + [v.numpy() for v in opt.variables]


def _assert_states_equal(a, b, rtol=1e-6):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7)


# --- save and resume ----------------------------------------------------------------
@pytest.mark.parametrize("opt_class,options", [
    (tkfac_tf.TKFAC, {}), (tkfac_tf.KFAC, {}), (tkfac_tf.TKFAC, {"inverse_method": "eigenbasis"}),
])
def test_model_save_and_load_model_resume_exactly(tmp_path, opt_class, options):
    reference, reference_opt = _model_and_optimizer(opt_class, **options)
    _fit(reference, X, Y, epochs=2)

    model, opt = _model_and_optimizer(opt_class, **options)
    _fit(model, X, Y, epochs=1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects, safe_mode on
    assert isinstance(loaded.optimizer, opt_class)
    assert loaded.optimizer.get_config()["inverse_method"] == opt.get_config()["inverse_method"]
    # load_model compiles the model, which attaches the saved collection to it.
    assert loaded.optimizer.layer_collection.get_config() == opt.layer_collection.get_config()
    assert int(loaded.optimizer.iterations.numpy()) == len(X) // BATCH
    _fit(loaded, X, Y, epochs=1)
    _assert_states_equal(_state(loaded, loaded.optimizer), _state(reference, reference_opt))


def test_tf_train_checkpoint_resumes_exactly(tmp_path):
    reference, reference_opt = _model_and_optimizer()
    _fit(reference, X, Y, epochs=2)

    model, opt = _model_and_optimizer()
    _fit(model, X, Y, epochs=1)
    saved_factors = opt.fisher_blocks["hidden"].phi.numpy()
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))

    fresh, fresh_opt = _model_and_optimizer(seed=99)  # different initial weights
    fresh_opt.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(path).assert_consumed()
    np.testing.assert_array_equal(fresh_opt.fisher_blocks["hidden"].phi.numpy(), saved_factors)
    _fit(fresh, X, Y, epochs=1)
    _assert_states_equal(_state(fresh, fresh_opt), _state(reference, reference_opt))


# --- non-finite values ------------------------------------------------------------------
@pytest.mark.parametrize("run_eagerly", [False, True])
def test_nan_batch_is_skipped_and_counted(run_eagerly):
    model, opt = _model_and_optimizer()
    model.compile(optimizer=opt, loss=model.loss, run_eagerly=run_eagerly)
    _fit(model, X[:2 * BATCH], Y[:2 * BATCH])
    before = _state(model, opt)
    bad = X[:BATCH].copy()
    bad[3, 2] = np.nan
    _fit(model, bad, Y[:BATCH])
    after = _state(model, opt)
    names = [v.path for v in model.trainable_weights] + [v.path for v in opt.variables]
    for name, b, a in zip(names, before, after):
        if "iteration" in name or "skipped_steps" in name:
            continue
        np.testing.assert_array_equal(a, b, err_msg=name)
    assert int(opt.skipped_steps.numpy()) == 1
    assert int(opt.iterations.numpy()) == 3
    # Training goes on with finite values.
    history = _fit(model, X, Y, epochs=2)
    assert np.all(np.isfinite(history.history["loss"]))
    assert int(opt.skipped_steps.numpy()) == 1
    assert all(np.all(np.isfinite(v)) for v in _state(model, opt))


@pytest.mark.parametrize("opt,mode", [("adaptive", "graph"), ("adaptive", "eager"), ("adaptive", "xla"),
                                      ("fixed", "graph")])
def test_nan_batch_leaves_batch_norm_moving_statistics_finite(opt, mode):
    """A batch with a NaN makes BatchNorm's training call assign NaN moving
    statistics before the optimizer sees the step: the registered layer's
    call sets them back, so they keep their values (exactly), inference stays
    finite, and the next finite batch updates them again."""
    keras.utils.set_random_seed(4)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(6, name="hidden"),
                              keras.layers.BatchNormalization(name="norm"),
                              keras.layers.Activation("tanh"), keras.layers.Dense(3, name="logits")])
    optimizer = tkfac_tf.TKFAC.adaptive() if opt == "adaptive" else tkfac_tf.TKFAC(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=mode == "eager", jit_compile=mode == "xla")
    norm = model.get_layer("norm")
    _fit(model, X[:2 * BATCH], Y[:2 * BATCH])
    statistics = [v.numpy() for v in norm.non_trainable_variables]
    bad = X[:BATCH].copy()
    bad[3, 2] = np.nan
    _fit(model, bad, Y[:BATCH])
    assert int(optimizer.skipped_steps.numpy()) == 1
    for got, want in zip(norm.non_trainable_variables, statistics):
        np.testing.assert_array_equal(got.numpy(), want)
    assert np.all(np.isfinite(model.predict(X, verbose=0)))
    _fit(model, X[:BATCH], Y[:BATCH])
    assert int(optimizer.skipped_steps.numpy()) == 1
    for got, want in zip(norm.non_trainable_variables, statistics):
        assert np.all(np.isfinite(got.numpy())) and not np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("opt_class,mode", [(tkfac_tf.TKFAC, "graph"), (tkfac_tf.KFAC, "graph"),
                                            (tkfac_tf.TKFAC, "eager"), (tkfac_tf.TKFAC, "xla")])
def test_adaptive_step_on_zero_gradients_changes_nothing_and_is_not_counted(opt_class, mode):
    """A batch whose sample weights are all zero has zero gradients, so d = 0
    and the quadratic model has no step (A₀₀ = 0): weights, momenta, λ and the
    step's (α, μ) stay as they were, also on the first step and on an
    adaptation step (ρ measured), and no step counts as skipped or rejected."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"),
                              keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    opt = opt_class.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                             inv_update_every=2, seed=5)
    model.compile(optimizer=opt, loss=loss, run_eagerly=mode == "eager", jit_compile=mode == "xla")
    opt.build(model.trainable_variables)

    def state():
        return ([v.numpy() for v in model.trainable_weights] + [m.numpy() for m in opt.momentums]
                + [opt.damping.numpy(), opt.step_learning_rate.numpy(), opt.step_momentum.numpy()])

    zero_weight_steps = {0, 2, 4}  # 0: the first step, 4: an adaptation step
    for k in range(6):
        batch = slice(k * BATCH, (k + 1) * BATCH)
        weights = np.zeros(BATCH, np.float32) if k in zero_weight_steps else np.ones(BATCH, np.float32)
        before = state()
        model.train_on_batch(X[batch], Y[batch], sample_weight=weights)
        after = state()
        if k in zero_weight_steps:
            _assert_states_equal(after, before, rtol=0.0)
        else:
            assert not np.allclose(after[0], before[0]), f"step {k} was not applied"
    assert int(opt.iterations.numpy()) == 6
    assert int(opt.skipped_steps.numpy()) == 0
    assert int(opt.rejected_steps.numpy()) == 0
    assert all(np.all(np.isfinite(v)) for v in state())


def _custom_step(model, opt, manual_cov):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        if manual_cov:
            opt.cov_update_op()
        opt.apply_gradients(zip(grads, model.trainable_variables))

    return step


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("manual_cov", [False, True])
def test_nan_step_in_a_custom_loop_counts_one_skipped_step(compiled, manual_cov):
    """cov_update_op and apply_gradients both see the NaN; the step counts once."""
    model, opt = _model_and_optimizer(cov_update_every=None if manual_cov else 1)
    opt.build(model.trainable_variables)
    step = _custom_step(model, opt, manual_cov)
    if compiled:
        step = tf.function(step)
    step(X[:BATCH], Y[:BATCH])
    bad = X[:BATCH].copy()
    bad[3, 2] = np.nan
    step(bad, Y[:BATCH])
    assert int(opt.skipped_steps.numpy()) == 1
    step(X[:BATCH], Y[:BATCH])
    assert int(opt.skipped_steps.numpy()) == 1
    assert int(opt.num_cov_updates.numpy()) == 2
    step(bad, Y[:BATCH])
    assert int(opt.skipped_steps.numpy()) == 2


def test_manual_cov_update_skipped_alone_counts_one_step():
    """Non-finite statistics with finite gradients: one skipped step."""
    model, opt = _model_and_optimizer(cov_update_every=None)
    opt.build(model.trainable_variables)
    x = X[:BATCH]
    model(x, training=True)
    with mock.patch.object(opt.estimator, "statistics_from_sums",
                           lambda sums: [tf.fill(v.shape, np.nan)
                                         for v in opt.estimator.factor_variables]):
        opt.cov_update_op()
    grads = [tf.zeros_like(v) for v in model.trainable_variables]
    opt.apply_gradients(zip(grads, model.trainable_variables))
    assert int(opt.skipped_steps.numpy()) == 1
    assert int(opt.num_cov_updates.numpy()) == 0


@pytest.mark.parametrize("compiled", [False, True])
def test_unscheduled_optimizer_without_manual_updates_warns_once(compiled):
    model, opt = _model_and_optimizer(cov_update_every=None, inv_update_every=None)
    opt.build(model.trainable_variables)
    step = _custom_step(model, opt, manual_cov=False)
    if compiled:
        step = tf.function(step)
    with mock.patch("tkfac_tf.optimizer.logging.warning") as warning:
        for _ in range(3):
            step(X[:BATCH], Y[:BATCH])
    messages = [call[0][0] % call[0][1:] for call in warning.call_args_list]
    never = [m for m in messages if "never been updated" in m]
    assert len(never) == 1, messages
    assert "cov_update_every=None and no cov_update_op() call" in never[0]
    assert "inv_update_every=None and no inv_update_op() call" in never[0]
    assert int(opt.num_cov_updates.numpy()) == 0


def test_manual_updates_do_not_warn():
    model, opt = _model_and_optimizer(cov_update_every=None, inv_update_every=None)
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.cov_update_op()
        opt.inv_update_op()
        opt.apply_gradients(zip(grads, model.trainable_variables))

    with mock.patch("tkfac_tf.optimizer.logging.warning") as warning:
        for _ in range(2):
            step(X[:BATCH], Y[:BATCH])
    assert not [c for c in warning.call_args_list if "never been updated" in c[0][0]]
    assert int(opt.num_cov_updates.numpy()) == 2


def test_infinite_gradient_with_finite_statistics_is_skipped():
    model, opt = _model_and_optimizer(cov_update_every=None, inv_update_every=None)
    opt.build(model.trainable_variables)
    before = _state(model, opt)
    grads = [tf.fill(v.shape, np.inf) for v in model.trainable_variables]
    opt.apply_gradients(zip(grads, model.trainable_variables))
    after = _state(model, opt)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not np.array_equal(a, b)]
    names = [v.path for v in model.trainable_weights] + [v.path for v in opt.variables]
    assert sorted(names[i] for i in changed) == sorted(
        [opt.iterations.path, opt.skipped_steps.path]
    )


# --- ill-conditioning --------------------------------------------------------------------
@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
@pytest.mark.parametrize("method,compiled", [
    (method, False) for method in ("cholesky", "eigh", "newton_schulz", "eigenbasis")
] + [("cholesky", True), ("eigenbasis", True)])  # XLA: Cholesky's own fallback, the snapshot
def test_inverses_that_are_not_finite_are_not_stored(opt_class, method, compiled):
    """Every running average set to NaN or ±inf by hand (the statistics are
    checked, so only a user's assignment gets there): the inverse update
    raises nothing and stores nothing, the inverses stay the identity (the
    eigenbasis snapshot stays untaken), and the first step is exactly −α∇
    (momentum starts at 0); every variable stays finite."""
    model, opt = _model_and_optimizer(opt_class, inverse_method=method, cov_update_every=None,
                                      inv_update_every=None)
    opt.build(model.trainable_variables)
    blocks = list(opt.fisher_blocks.values())
    before = [v.numpy() for block in blocks for v in block.inverse_variables]
    for i, factor in enumerate(v for block in blocks for v in block.factor_variables):
        factor.assign(tf.fill(factor.shape, [np.nan, np.inf, -np.inf][i % 3]))
    x, y = X[:BATCH], Y[:BATCH]
    with tf.GradientTape() as tape:
        loss = model.loss(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    expected = [w.numpy() - 0.05 * g.numpy() for w, g in zip(model.trainable_weights, grads)]

    def step():
        opt.inv_update_op()
        opt.apply_gradients(zip(grads, model.trainable_weights))

    (tf.function(step, jit_compile=True) if compiled else step)()
    after = [v.numpy() for block in blocks for v in block.inverse_variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    for w, want in zip(model.trainable_weights, expected):
        np.testing.assert_allclose(w.numpy(), want, rtol=1e-6, atol=1e-7)
    factors = {id(v) for block in blocks for v in block.factor_variables}
    assert all(np.all(np.isfinite(v.numpy())) for v in opt.variables if id(v) not in factors)


@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
def test_a_learning_rate_schedule_giving_nan_skips_the_fixed_step(opt_class):
    """The fixed rule's update −α d + τ δ is checked as a whole: a schedule
    that returns NaN at the second step skips it (weights and momenta
    unchanged, counted), and the third step trains on."""

    class NanAtStepOne(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return tf.where(tf.equal(step, 1), np.nan, 0.05)

    model, opt = _model_and_optimizer(opt_class, learning_rate=NanAtStepOne())
    model.train_on_batch(X[:BATCH], Y[:BATCH])
    before = [v.numpy() for v in model.trainable_weights] + [v.numpy() for v in opt.momentums]
    model.train_on_batch(X[BATCH:2 * BATCH], Y[BATCH:2 * BATCH])
    after = [v.numpy() for v in model.trainable_weights] + [v.numpy() for v in opt.momentums]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert int(opt.skipped_steps.numpy()) == 1
    model.train_on_batch(X[2 * BATCH:3 * BATCH], Y[2 * BATCH:3 * BATCH])
    assert int(opt.skipped_steps.numpy()) == 1
    assert all(np.all(np.isfinite(v)) for v in _state(model, opt))
    assert not np.array_equal(model.trainable_weights[0].numpy(), after[0])


@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
def test_constant_and_dead_inputs_with_tiny_damping_stay_finite(opt_class):
    """Columns 3-4 constant (one all zeros): singular factors, λ = 1e-10.
    Training is ill-posed here (round-off in the factors' null directions is
    amplified by up to 1/√λ; docs/reliability.md measures it), so the test
    asserts what the library promises, not convergence: every loss, weight
    and state variable finite, and the dead input's weights exactly
    unchanged (its gradient is 0 and its row of the damped factor is
    decoupled, so its step is exactly 0)."""
    x = X.copy()
    x[:, 3] = 1.0
    x[:, 4] = 0.0
    model, opt = _model_and_optimizer(opt_class, damping=1e-10, learning_rate=0.005,
                                      inv_update_every=1)
    dead_row = model.layers[0].kernel.numpy()[4].copy()
    history = _fit(model, x, Y, epochs=10)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.all(np.isfinite(v)) for v in _state(model, opt))
    np.testing.assert_array_equal(model.layers[0].kernel.numpy()[4], dead_row)


def test_damped_inverse_falls_back_when_cholesky_fails():
    from tkfac_tf import fisher_factors

    indefinite = tf.constant([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3, −1
    inverse = fisher_factors.damped_inverse(indefinite, tf.constant(1e-3))
    # Eigenvalues clamped at 0 then shifted: 3 + 1e-3 and 1e-3.
    vectors = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2.0)
    expected = vectors @ np.diag([1 / 3.001, 1 / 1e-3]) @ vectors.T
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-4)


# --- mixed precision ---------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_trains_with_float32_statistics(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model, opt = _model_and_optimizer()
        history = _fit(model, X, Y, epochs=4)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    block = opt.fisher_blocks["hidden"]
    assert block.phi.dtype == "float32" and block.left_inverse.dtype == "float32"
    np.testing.assert_allclose(np.trace(block.phi.numpy()), 1.0, rtol=1e-4)


# --- batches that vary -----------------------------------------------------------------
def test_partial_last_batch_and_batch_of_one():
    model, opt = _model_and_optimizer()
    history = model.fit(X[:19], Y[:19], batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    assert int(opt.num_cov_updates.numpy()) == 6  # 3 batches (8, 8, 3) × 2 epochs
    assert np.all(np.isfinite(history.history["loss"]))
    history = model.fit(X[:3], Y[:3], batch_size=1, epochs=1, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.all(np.isfinite(v)) for v in _state(model, opt))


def test_unknown_static_batch_size_in_custom_loop():
    model, opt = _model_and_optimizer()
    opt.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    @tf.function(input_signature=[
        tf.TensorSpec([None, 5], tf.float32), tf.TensorSpec([None], tf.int32)])
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    losses = [float(step(X[i:i + n], Y[i:i + n])) for i, n in [(0, 8), (8, 5), (13, 1), (14, 8)]]
    assert np.all(np.isfinite(losses))
    assert int(opt.num_cov_updates.numpy()) == 4


# --- schedules and callbacks -----------------------------------------------------------
def test_learning_rate_scheduler_callback_is_followed():
    model, opt = _model_and_optimizer()
    start = [w.numpy() for w in model.trainable_weights]
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.0)
    _fit(model, X, Y, epochs=2, callbacks=[scheduler])
    for w, s in zip(model.trainable_weights, start):
        np.testing.assert_array_equal(w.numpy(), s)  # α = 0: no motion at all
    assert float(opt.learning_rate.numpy()) == 0.0


def test_reduce_lr_on_plateau_lowers_the_learning_rate():
    model, opt = _model_and_optimizer(learning_rate=0.05)
    plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=10.0)
    _fit(model, X, Y, epochs=3, callbacks=[plateau])
    # Epoch 1 sets the reference; epochs 2 and 3 each halve α.
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.05 * 0.5**2)


def test_damping_changed_by_a_callback_is_used_by_the_next_inverse():
    model, opt = _model_and_optimizer(inv_update_every=1)

    class SetDamping(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            opt.damping = 0.5 if batch >= 2 else 0.01

    _fit(model, X, Y, callbacks=[SetDamping()])
    block = opt.fisher_blocks["hidden"]
    delta = float(block.delta.numpy())
    left = np.sqrt(delta) * block.phi.numpy() + np.sqrt(0.5) * np.eye(block.input_size)
    # The last step updated the factors, then inverted them with λ = 0.5.
    np.testing.assert_allclose(block.left_inverse.numpy(), np.linalg.inv(left), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_loss_scale_optimizer_skips_nan_batch_and_training_goes_on(run_eagerly):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, opt = _model_and_optimizer()
        model.compile(optimizer=opt, loss=model.loss, run_eagerly=run_eagerly)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        _fit(model, X[:BATCH], Y[:BATCH])
        weights = [w.numpy() for w in model.trainable_weights]
        factors = [v.numpy() for v in opt.fisher_blocks["hidden"].factor_variables]
        bad = X[:BATCH].copy()
        bad[0, 0] = np.inf
        _fit(model, bad, Y[:BATCH])
        for w, before in zip(model.trainable_weights, weights):
            np.testing.assert_array_equal(w.numpy(), before)
        for v, before in zip(opt.fisher_blocks["hidden"].factor_variables, factors):
            np.testing.assert_array_equal(v.numpy(), before)
        cov_updates = int(opt.num_cov_updates.numpy())
        history = _fit(model, X, Y, epochs=2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(history.history["loss"]))
    # Every finite batch after the skipped one updated the statistics once.
    assert int(opt.num_cov_updates.numpy()) == cov_updates + 2 * len(X) // BATCH


# --- capture hygiene ---------------------------------------------------------------
def test_graph_records_do_not_outlive_their_graph():
    import gc
    import weakref

    model, _ = _model_and_optimizer()

    def forward(x):
        return model(x, training=True)  # traced, never followed by an update

    graphs = []
    for n in (2, 3, 4):
        function = tf.function(forward)
        graphs.append(weakref.ref(function.get_concrete_function(tf.TensorSpec([n, 5])).graph))
        del function
    gc.collect()
    assert all(ref() is None for ref in graphs)


def test_eager_training_call_of_a_sub_model_outside_the_step_is_not_recorded_into_it():
    """run_eagerly: a sub-model called on its own with training=True between
    two steps of the model around it (a GAN's discriminator trained apart)
    leaves the next step exactly as without that call."""
    def train(foreign_call):
        keras.utils.set_random_seed(0)
        body = keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh"),
                                 keras.layers.Dense(3)], name="body")
        inputs = keras.Input((5,))
        model = keras.Model(inputs, body(inputs))
        model.compile(optimizer=tkfac_tf.TKFAC(learning_rate=0.05, damping=0.01, inv_update_every=1),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
        model.train_on_batch(X[:BATCH], Y[:BATCH])
        if foreign_call:
            body(X[BATCH:3 * BATCH], training=True)
        model.train_on_batch(X[:BATCH], Y[:BATCH])
        return [w.numpy() for w in model.trainable_weights]

    for got, want in zip(train(True), train(False)):
        np.testing.assert_array_equal(got, want)


def test_eager_inference_call_stops_the_pending_tape():
    model, opt = _model_and_optimizer()
    recorder = opt.layer_collection.recorder
    model(X[:4], training=True)  # a training pass with no update after it
    assert recorder._eager_record._tape_open
    model(X[:4])  # an eager inference call
    assert not recorder._eager_record._tape_open


def test_attach_twice_and_from_config_on_the_same_model(tmp_path):
    model, opt = _model_and_optimizer()
    _fit(model, X, Y)
    opt.attach(model)
    clone = tkfac_tf.TKFAC.from_config(opt.get_config())
    opt.layer_collection.release()  # the model's layers belong to one live collection
    clone.attach(model)
    assert sorted(clone.layer_collection.get_config()["layers"], key=str) == sorted(
        opt.layer_collection.get_config()["layers"], key=str)
    model.compile(optimizer=clone, loss=model.loss)
    history = _fit(model, X, Y)
    assert np.all(np.isfinite(history.history["loss"]))
