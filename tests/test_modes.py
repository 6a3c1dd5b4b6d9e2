"""Same numbers eagerly, under tf.function and under XLA; fit == custom loop."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf

BATCH, STEPS = 16, 5
X = np.random.RandomState(0).randn(BATCH * STEPS, 5).astype(np.float32)
Y = (X[:, 0] + X[:, 1] > 0).astype(np.int32) + (X[:, 2] > 0.5)


def _model_and_optimizer(opt_class=tkfac_tf.TKFAC, **kwargs):
    keras.utils.set_random_seed(42)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(3),
        ]
    )
    collection = tkfac_tf.LayerCollection()
    for layer in model.layers:
        collection.register_dense(layer)
    collection.register_categorical_predictive_distribution(model.layers[-1])
    options = dict(
        learning_rate=0.05, damping=0.01, layer_collection=collection,
        momentum=0.9, cov_update_every=1, inv_update_every=2, seed=11,
    )
    options.update(kwargs)
    return model, opt_class(**options)


def _loss_fn():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(mode, opt_class=tkfac_tf.TKFAC, **kwargs):
    model, opt = _model_and_optimizer(opt_class, **kwargs)
    model.compile(
        optimizer=opt, loss=_loss_fn(),
        run_eagerly=(mode == "eager"), jit_compile=(mode == "xla"),
    )
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    return [w.numpy() for w in model.trainable_weights], opt


def _custom_loop(mode, manual=False, **kwargs):
    if manual:
        kwargs.update(cov_update_every=None, inv_update_every=None)
    model, opt = _model_and_optimizer(**kwargs)
    opt.build(model.trainable_variables)
    loss_fn = _loss_fn()

    def step(x, y, do_inverse):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        if manual:
            # 'empirical' takes its statistics from the training loss.
            opt.cov_update_op(loss=loss if opt.estimation_mode == "empirical" else None)
            if do_inverse:
                opt.inv_update_op()
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    if mode != "eager":
        step = tf.function(step, jit_compile=(mode == "xla"))
    for k in range(STEPS):
        sl = slice(k * BATCH, (k + 1) * BATCH)
        step(tf.constant(X[sl]), tf.constant(Y[sl]), k % 2 == 0)
    return [w.numpy() for w in model.trainable_weights]


def _assert_same(a, b):
    """Equal to float32 round-off grown over STEPS steps. Measured here:
    perturbing X by 2⁻²² relative moves the weights after 5 steps by up to
    4e-6 (K-FAC; 2e-6 TKFAC) relative, XLA against graph by 1-2.5e-6; the
    tolerance leaves ≥ 20× for other CPUs' summation orders, while a missed
    or doubled update moves them by more than 1e-3."""
    for wa, wb in zip(a, b):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def reference():
    weights, opt = _fit("graph")
    return weights, opt


def test_training_changed_weights_and_counted_cov_updates(reference):
    weights, opt = reference
    model, _ = _model_and_optimizer()
    initial = [w.numpy() for w in model.trainable_weights]
    assert max(np.abs(a - b).max() for a, b in zip(weights, initial)) > 1e-3
    assert int(opt.num_cov_updates.numpy()) == STEPS
    assert int(opt.iterations.numpy()) == STEPS


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_fit_modes_agree(reference, mode):
    _assert_same(_fit(mode)[0], reference[0])


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_custom_loop_equals_fit(reference, mode):
    _assert_same(_custom_loop(mode), reference[0])


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_manual_schedule_equals_automatic(reference, mode):
    _assert_same(_custom_loop(mode, manual=True), reference[0])


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_kfac_modes_agree(mode):
    _assert_same(_fit(mode, tkfac_tf.KFAC)[0], _fit("graph", tkfac_tf.KFAC)[0])


@pytest.mark.parametrize("estimation_mode, mode", [
    ("empirical", "eager"), ("empirical", "xla"), ("empirical", "manual eager"), ("exact", "eager")])
def test_every_estimation_mode_gives_the_same_weights_in_every_mode(estimation_mode, mode):
    """'empirical' (the training loss's own gradients, taken after the
    step's forward pass) and 'exact' as the default mode: eagerly, under XLA
    and by a manual schedule as in graph mode."""
    graph = _fit("graph", estimation_mode=estimation_mode)[0]
    if mode == "manual eager":
        got = _custom_loop("eager", manual=True, estimation_mode=estimation_mode)
    else:
        got = _fit(mode, estimation_mode=estimation_mode)[0]
    _assert_same(got, graph)


def test_cov_every_two_uses_only_scheduled_batches():
    """cov_update_every=2: 3 covariance updates in 5 steps (k = 0, 2, 4)."""
    _, opt = _fit("graph", cov_update_every=2)
    assert int(opt.num_cov_updates.numpy()) == 3
    eager_weights, eager_opt = _fit("eager", cov_update_every=2)
    assert int(eager_opt.num_cov_updates.numpy()) == 3
    _assert_same(eager_weights, _fit("graph", cov_update_every=2)[0])


def test_steps_per_execution_gives_the_same_weights(reference):
    model, opt = _model_and_optimizer()
    model.compile(optimizer=opt, loss=_loss_fn(), steps_per_execution=STEPS)
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    _assert_same([w.numpy() for w in model.trainable_weights], reference[0])
    assert int(opt.num_cov_updates.numpy()) == STEPS


@pytest.mark.parametrize("mode, cov_update_every", [("graph", 1), ("eager", 1), ("xla", 1), ("graph", 2)])
def test_gradient_accumulation_takes_the_statistics_of_every_micro_batch(mode, cov_update_every):
    """Keras' gradient_accumulation_steps=2 at batch 8 takes the steps of
    batch 16 (exact statistics: no sampling): Keras averages the two
    micro-batches' gradients, the optimizer sums their statistics."""
    options = dict(estimation_mode="exact", cov_update_every=cov_update_every)
    whole_batches = _fit("graph", **options)[0]
    model, opt = _model_and_optimizer(gradient_accumulation_steps=2, **options)
    model.compile(optimizer=opt, loss=_loss_fn(), run_eagerly=(mode == "eager"), jit_compile=(mode == "xla"))
    model.fit(X, Y, batch_size=BATCH // 2, epochs=1, shuffle=False, verbose=0)
    _assert_same([w.numpy() for w in model.trainable_weights], whole_batches)
    assert int(opt.iterations.numpy()) == STEPS
    assert int(opt.num_cov_updates.numpy()) == len(range(0, STEPS, cov_update_every))
    assert not any(np.asarray(v).any() for v in opt._accumulated_sums)  # reset after the last update
