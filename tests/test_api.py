"""Registration errors, argument checks, config round-trip, unregistered variables."""

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf


def _mlp(with_batchnorm=False):
    layers = [keras.Input((4,)), keras.layers.Dense(6, activation="tanh", name="hidden")]
    if with_batchnorm:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers.append(keras.layers.Dense(3, name="logits"))
    return keras.Sequential(layers)


def _collection(model):
    collection = tkfac_tf.LayerCollection()
    collection.register_dense(model.get_layer("hidden"))
    collection.register_dense(model.get_layer("logits"))
    collection.register_categorical_predictive_distribution(model.get_layer("logits"))
    return collection


# --- registration errors ----------------------------------------------------------
def test_registering_a_non_dense_layer_names_it():
    conv = keras.layers.Conv2D(2, 3, name="my_conv")
    conv.build((None, 5, 5, 1))
    with pytest.raises(tkfac_tf.UnsupportedLayerError, match="my_conv.*not keras.layers.Dense") as error:
        tkfac_tf.LayerCollection().register_dense(conv)
    assert isinstance(error.value, TypeError) and isinstance(error.value, ValueError)


def test_registering_an_unbuilt_layer_names_it():
    with pytest.raises(ValueError, match="'lonely' is not built.*Build the model"):
        tkfac_tf.LayerCollection().register_dense(keras.layers.Dense(3, name="lonely"))


def test_second_predictive_distribution_on_a_layer_is_refused():
    model = _mlp()
    collection = _collection(model)
    with pytest.raises(ValueError, match="'logits' already has a predictive distribution"):
        collection.register_multi_bernoulli_predictive_distribution(model.get_layer("logits"))


def test_registering_a_layer_twice_is_refused():
    model = _mlp()
    collection = _collection(model)
    with pytest.raises(ValueError, match="'hidden' is already registered"):
        collection.register_dense(model.get_layer("hidden"))


def test_distribution_needs_a_compatible_activation():
    model = _mlp()
    with pytest.raises(ValueError, match="'hidden' has activation 'tanh'.*categorical"):
        tkfac_tf.LayerCollection().register_categorical_predictive_distribution(
            model.get_layer("hidden")
        )


def test_missing_predictive_distribution_is_reported_at_first_use():
    model = _mlp()
    collection = tkfac_tf.LayerCollection()
    collection.register_dense(model.get_layer("hidden"))
    model.compile(optimizer=tkfac_tf.TKFAC(layer_collection=collection), loss="mse")
    with pytest.raises(ValueError, match="no predictive distribution.*'hidden'.*register_categorical"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 3)), verbose=0)


def test_missing_layer_collection_is_reported():
    model = _mlp()
    model.compile(optimizer=tkfac_tf.KFAC(), loss="mse")
    with pytest.raises(ValueError, match="no layer_collection"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 3)), verbose=0)


def test_collection_of_another_model_is_reported():
    other = _mlp()
    model = _mlp()
    model.compile(optimizer=tkfac_tf.TKFAC(layer_collection=_collection(other)), loss="mse")
    with pytest.raises(ValueError, match="'hidden'.*does not match the model"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 3)), verbose=0)


def test_newest_collection_takes_over_a_layer():
    """Re-registering (e.g. from_model again, or attach) hands the layer's
    statistics to the newest collection; the old one's optimizer says so."""
    model = _mlp()
    old = tkfac_tf.TKFAC(layer_collection=_collection(model))
    new = tkfac_tf.TKFAC(layer_collection=_collection(model))
    x, y = np.zeros((4, 4), np.float32), np.zeros((4,), np.int32)
    model.compile(optimizer=new, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, verbose=0)
    assert int(new.num_cov_updates.numpy()) == 1
    model.compile(optimizer=old, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ValueError, match="'hidden'.*another LayerCollection"):
        model.fit(x, y, verbose=0)


def test_manual_cov_update_with_automatic_schedule_is_not_repeated():
    """cov_update_op() before apply_gradients replaces the scheduled update."""
    model = _mlp()
    opt = tkfac_tf.TKFAC(layer_collection=_collection(model))
    opt.build(model.trainable_variables)
    x = np.random.RandomState(0).randn(8, 4).astype(np.float32)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x, training=True)))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.cov_update_op()
        opt.apply_gradients(zip(grads, model.trainable_variables))

    step(x)
    step(x)
    assert int(opt.num_cov_updates.numpy()) == 2


def test_schedule_counts_applied_updates_under_gradient_accumulation():
    model = _mlp()
    opt = tkfac_tf.TKFAC(layer_collection=_collection(model), gradient_accumulation_steps=2,
                         cov_update_every=2, inv_update_every=2)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.RandomState(0).randn(16, 4).astype(np.float32)
    model.fit(x, np.arange(16) % 3, batch_size=2, verbose=0)  # 8 batches, 4 updates
    assert int(opt.iterations.numpy()) == 4
    assert int(opt.num_cov_updates.numpy()) == 2  # updates 0 and 2
    inverse = opt.fisher_blocks["hidden"].left_inverse.numpy()
    assert not np.allclose(inverse, np.eye(len(inverse)))


# --- argument checks ------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"damping": -1.0}, ValueError, "damping"),
        ({"damping": 0.0}, ValueError, "damping"),
        ({"damping": "big"}, TypeError, "damping"),
        ({"cov_ema_decay": 1.0}, ValueError, "cov_ema_decay"),
        ({"cov_ema_decay": -0.1}, ValueError, "cov_ema_decay"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"cov_update_every": 0}, ValueError, "cov_update_every"),
        ({"inv_update_every": 2.5}, ValueError, "inv_update_every"),
        ({"estimation_mode": "fancy"}, ValueError, "estimation_mode"),
        ({"norm_constraint": -1.0}, ValueError, "norm_constraint"),
        ({"learning_rate": -0.1}, ValueError, "learning_rate"),
        ({"seed": 1.5}, TypeError, "seed"),
        ({"layer_collection": "layers"}, TypeError, "layer_collection"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        tkfac_tf.TKFAC(**kwargs)


def test_config_round_trip():
    opt = tkfac_tf.KFAC(
        learning_rate=0.2, damping=0.03, momentum=0.8, cov_ema_decay=0.9,
        cov_update_every=2, inv_update_every=7, estimation_mode="exact",
        norm_constraint=0.01, seed=5, weight_decay=1e-4,
    )
    config = opt.get_config()
    clone = tkfac_tf.KFAC.from_config(config)
    assert clone.get_config() == config
    assert config["damping"] == pytest.approx(0.03)
    assert config["inv_update_every"] == 7 and config["estimation_mode"] == "exact"
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(restored, tkfac_tf.KFAC)
    assert restored.get_config() == config


def test_learning_rate_schedule_is_accepted_and_followed():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    opt = tkfac_tf.TKFAC(learning_rate=schedule)
    assert float(opt.learning_rate) == pytest.approx(0.1)
    opt.iterations.assign(2)
    assert float(opt.learning_rate) == pytest.approx(0.025)


# --- unregistered variables -------------------------------------------------------
def test_unregistered_variables_get_plain_momentum_and_are_reported_once():
    model = _mlp(with_batchnorm=True)
    collection = _collection(model)
    opt = tkfac_tf.TKFAC(learning_rate=0.1, layer_collection=collection, momentum=0.5)
    with mock.patch("tkfac_tf.optimizer.logging.warning") as warning:
        opt.build(model.trainable_variables)
        opt.build(model.trainable_variables)
    assert warning.call_count == 1
    message = warning.call_args[0][0] % warning.call_args[0][1:]
    assert "bn/gamma" in message and "bn/beta" in message and "hidden" not in message

    gamma = model.get_layer("bn").gamma
    start = gamma.numpy()
    x = np.random.RandomState(0).randn(8, 4).astype(np.float32)
    y = np.arange(8) % 3
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    updates = []
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        gamma_grad = grads[[v.path for v in model.trainable_variables].index(gamma.path)]
        before = gamma.numpy()
        opt.apply_gradients(zip(grads, model.trainable_variables))
        updates.append((before, gamma_grad.numpy(), gamma.numpy()))
    # m₁ = −α∇₁, θ₁ = θ₀ + m₁; m₂ = τ m₁ − α∇₂, θ₂ = θ₁ + m₂.
    (b1, g1, a1), (b2, g2, a2) = updates
    np.testing.assert_allclose(b1, start)
    np.testing.assert_allclose(a1, b1 - 0.1 * g1, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a2, b2 + 0.5 * (-0.1 * g1) - 0.1 * g2, rtol=1e-6, atol=1e-7)


def test_damping_can_be_changed_during_training():
    opt = tkfac_tf.TKFAC(damping=0.1)
    opt.damping = 0.5
    assert float(opt.damping.numpy()) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="damping"):
        opt.damping = -3.0
