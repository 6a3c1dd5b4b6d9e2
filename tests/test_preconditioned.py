"""Preconditioned: any Keras optimizer fed the preconditioned gradient.
With an identity preconditioner it is the wrapped optimizer exactly; its
first step is the float64 dense solve (F̂ + damping)⁻¹ ∇; it saves and
resumes exactly, skips non-finite steps, and refuses what is the wrapped
optimizer's business."""

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf

RNG = np.random.RandomState(0)
X = RNG.randn(64, 5).astype(np.float32)
Y = (X[:, 0] > 0).astype(np.int32) + (X[:, 1] > 0.5)
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

WRAPPED = {
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adamw_clipped_ema": lambda: keras.optimizers.AdamW(
        keras.optimizers.schedules.CosineDecay(3e-3, 20), weight_decay=0.01, clipnorm=1.0,
        use_ema=True, ema_overwrite_frequency=3),
    "lion": lambda: keras.optimizers.Lion(1e-3),
    # The loss is scaled by the wrapped optimizer's factor, which its apply divides out.
    "sgd_loss_scaled": lambda: keras.optimizers.SGD(0.05, momentum=0.9, loss_scale_factor=64.0),
}


def _model(seed=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(7, activation="tanh", name="hidden"),
                             keras.layers.Dense(3, name="logits")])


def _fit(model, epochs=1, x=X, y=Y):
    return model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)


def _weights(model):
    return [w.numpy() for w in model.weights]


@pytest.mark.parametrize("wrapped", list(WRAPPED))
def test_with_the_identity_preconditioner_it_is_the_wrapped_optimizer(wrapped):
    reference = _model()
    reference.compile(optimizer=WRAPPED[wrapped](), loss=LOSS)
    _fit(reference, epochs=2)

    model = _model()
    opt = tkfac_tf.Preconditioned(WRAPPED[wrapped]())
    model.compile(optimizer=opt, loss=LOSS)

    def identity(grads, variables, var_key, damping=None):
        return [tf.cast(g, tf.float32) for g in grads]

    with mock.patch.object(opt.estimator, "precondition", identity):
        _fit(model, epochs=2)
    for got, want in zip(_weights(model), _weights(reference)):
        np.testing.assert_array_equal(got, want)
    wrapped_state = [v.numpy() for v in opt.wrapped_optimizer.variables]
    for got, want in zip(wrapped_state, [v.numpy() for v in reference.optimizer.variables]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
def test_the_first_step_is_the_dense_solve(approximation):
    """SGD(lr, no momentum) wrapped, one step on the whole batch: the update
    is −lr·(F̂ + D(λ))⁻¹ ∇ with F̂ + D(λ) the dense damped Kronecker block
    of each layer from its factors, solved in float64."""
    model = _model()
    damping, lr = 0.05, 0.1
    opt = tkfac_tf.Preconditioned(keras.optimizers.SGD(lr), approximation=approximation,
                                  damping=damping, seed=0)
    model.compile(optimizer=opt, loss=LOSS)
    before = {w.path: w.numpy() for w in model.trainable_weights}
    with tf.GradientTape() as tape:
        loss = LOSS(Y, model(X, training=True))
    grads = dict(zip([w.path for w in model.trainable_weights],
                     tape.gradient(loss, model.trainable_weights)))
    model.fit(X, Y, batch_size=len(X), epochs=1, shuffle=False, verbose=0)
    for block in opt.fisher_blocks.values():
        kind = block.kind
        left, right = (f.numpy().astype(np.float64) for f in block.kronecker_factors())
        shift_left, shift_right = (float(s) for s in block._shifts(float(np.trace(left)), float(np.trace(right)), damping))
        dense = np.kron(left + shift_left * np.eye(len(left)), right + shift_right * np.eye(len(right)))
        gradient = kind.to_matrix([grads[p.path] for p in kind.parameters]).numpy().astype(np.float64)
        want = -lr * np.linalg.solve(dense, gradient.reshape(-1)).reshape(gradient.shape)
        got = kind.to_matrix([p.numpy() - before[p.path] for p in kind.parameters]).numpy()
        # float32 steps (condition of the damped blocks ≲ 1e3): ~1e-4 relative.
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_save_load_model_and_checkpoint_resume_exactly(tmp_path):
    def compiled():
        model = _model()
        model.compile(optimizer=tkfac_tf.Preconditioned(WRAPPED["adamw_clipped_ema"](), inv_update_every=3, seed=5),
                      loss=LOSS)
        return model

    reference = compiled()
    _fit(reference)
    _fit(reference)  # two fits: each ends with the EMA weights (finalize_variable_values)

    model = compiled()
    _fit(model)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, tkfac_tf.Preconditioned)
    assert isinstance(loaded.optimizer.wrapped_optimizer, keras.optimizers.AdamW)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    _fit(loaded)

    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(str(tmp_path / "ckpt"))
    restored = compiled()
    restored.optimizer.build(restored.trainable_variables)
    tf.train.Checkpoint(model=restored, optimizer=restored.optimizer).restore(ckpt).assert_consumed()
    _fit(restored)
    for resumed in (loaded, restored):
        assert len(resumed.optimizer.variables) == len(reference.optimizer.variables)
        for got, want in zip(_weights(resumed) + [v.numpy() for v in resumed.optimizer.variables],
                             _weights(reference) + [v.numpy() for v in reference.optimizer.variables]):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_a_non_finite_step_changes_nothing_and_is_counted():
    model = _model()
    opt = tkfac_tf.Preconditioned(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=opt, loss=LOSS)
    _fit(model, x=X[:16], y=Y[:16])
    state = _weights(model) + [v.numpy() for v in opt.wrapped_optimizer.variables]
    factors = [v.numpy() for v in opt.estimator.factor_variables]
    bad = X[:16].copy()
    bad[3, 2] = np.nan
    _fit(model, x=bad, y=Y[:16])
    assert int(opt.skipped_steps.numpy()) == 1
    for got, want in zip(_weights(model) + [v.numpy() for v in opt.wrapped_optimizer.variables], state):
        np.testing.assert_array_equal(got, want)
    for got, want in zip([v.numpy() for v in opt.estimator.factor_variables], factors):
        np.testing.assert_array_equal(got, want)
    _fit(model, x=X[:16], y=Y[:16])  # and trains on
    assert int(opt.skipped_steps.numpy()) == 1
    assert all(np.isfinite(w).all() for w in _weights(model))


def test_the_learning_rate_is_the_wrapped_optimizers():
    opt = tkfac_tf.Preconditioned(keras.optimizers.SGD(0.1))
    opt.learning_rate = 0.02  # what LearningRateScheduler / ReduceLROnPlateau do
    assert float(opt.wrapped_optimizer.learning_rate.numpy()) == pytest.approx(0.02)
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.02)


@pytest.mark.parametrize("arguments,error,match", [
    ({"momentum": 0.5}, ValueError, "wrapped optimizer"),
    ({"adaptive": True}, ValueError, "wrapped optimizer"),
    ({"learning_rate": 0.1}, ValueError, "wrapped optimizer"),
    ({"weight_decay": 0.1}, ValueError, "wrapped optimizer"),
    ({"loss_scale_factor": 64.0}, ValueError, "wrapped optimizer"),
    ({"ema_momentum": 0.5}, ValueError, "wrapped optimizer"),
    ({"approximation": "ekfac"}, ValueError, "approximation must be one of"),
    ({"inv_update_every": 0}, ValueError, "inv_update_every"),
])
def test_bad_arguments_are_refused_by_name(arguments, error, match):
    with pytest.raises(error, match=match):
        tkfac_tf.Preconditioned(keras.optimizers.SGD(0.1), **arguments)


def test_what_cannot_be_wrapped_is_refused():
    with pytest.raises(TypeError, match="wraps a keras.optimizers.Optimizer"):
        tkfac_tf.Preconditioned(tkfac_tf.TKFAC())
    with pytest.raises(TypeError, match="wraps a keras.optimizers.Optimizer"):
        tkfac_tf.Preconditioned("adam")
    built = keras.optimizers.Adam()
    built.build([keras.Variable(np.zeros(3, np.float32))])
    with pytest.raises(ValueError, match="already built"):
        tkfac_tf.Preconditioned(built)
