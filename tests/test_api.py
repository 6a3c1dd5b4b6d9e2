"""Registration errors, argument checks, config round-trip, unregistered variables."""

import json
import re
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import loss_functions


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
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="'logits' already has a predictive distribution"):
        collection.register_multi_bernoulli_predictive_distribution(model.get_layer("logits"))


def test_registering_a_layer_twice_is_refused():
    model = _mlp()
    collection = _collection(model)
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="'hidden' is already registered"):
        collection.register_dense(model.get_layer("hidden"))


def test_distribution_errors_name_existing_register_methods():
    for family, cls in loss_functions.DISTRIBUTIONS.items():
        assert cls.family == family
        assert callable(getattr(tkfac_tf.LayerCollection, cls.register_method))
    with pytest.raises(tkfac_tf.UnsupportedLayerError,
                       match="^register_multi_bernoulli_predictive_distribution expects"):
        tkfac_tf.LayerCollection().register_multi_bernoulli_predictive_distribution("logits")
    model = _mlp()
    collection = tkfac_tf.LayerCollection()
    collection.register_dense(model.get_layer("hidden"))
    with pytest.raises(ValueError, match="no predictive distribution") as error:
        collection.validate()
    named = re.findall(r"(register_\w+)\(", str(error.value))
    assert sorted(set(named)) == sorted(c.register_method for c in loss_functions.DISTRIBUTIONS.values())
    assert all(callable(getattr(collection, name)) for name in named)


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


def test_missing_layer_collection_is_reported_in_a_custom_loop():
    model = _mlp()
    opt = tkfac_tf.KFAC()  # never compiled: nothing registers the model
    with pytest.raises(ValueError, match="no layer_collection. Compile a built model"):
        opt.apply_gradients(zip([tf.zeros_like(v) for v in model.trainable_variables], model.trainable_variables))


def test_collection_of_another_model_is_reported():
    other = _mlp()
    model = _mlp()
    model.compile(optimizer=tkfac_tf.TKFAC(layer_collection=_collection(other)), loss="mse")
    with pytest.raises(ValueError, match="'hidden'.*does not match the model"):
        model.fit(np.zeros((4, 4)), np.zeros((4, 3)), verbose=0)


def test_layer_held_by_another_collection_is_refused_until_released():
    """A second collection may not silently take a layer's taps: registering
    it raises (by hand and through from_model) until the first collection is
    released; the released collection's optimizer then names the layer."""
    model = _mlp()
    old_collection = _collection(model)
    old = tkfac_tf.TKFAC(layer_collection=old_collection)
    x, y = np.zeros((4, 4), np.float32), np.zeros((4,), np.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="'hidden'.*another.*LayerCollection.*release()"):
        tkfac_tf.LayerCollection().register_dense(model.get_layer("hidden"))
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="'logits'.*another.*LayerCollection.*release()"):
        tkfac_tf.LayerCollection().register_categorical_predictive_distribution(model.get_layer("logits"))
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="'hidden'.*another.*LayerCollection"):
        tkfac_tf.LayerCollection.from_model(model, loss)
    # Nothing was taken: the first collection still trains.
    model.compile(optimizer=old, loss=loss)
    model.fit(x, y, verbose=0)
    assert int(old.num_cov_updates.numpy()) == 1

    old_collection.release()
    assert old_collection.released
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="released"):
        old_collection.register_dense(model.get_layer("hidden"))
    new = tkfac_tf.TKFAC(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss))
    model.compile(optimizer=new, loss=loss)
    model.fit(x, y, verbose=0)
    assert int(new.num_cov_updates.numpy()) == 1
    model.compile(optimizer=old, loss=loss)
    with pytest.raises(ValueError, match="'hidden' no longer records statistics.*released"):
        model.fit(x, y, verbose=0)


def test_a_collection_nothing_refers_to_holds_no_layer():
    model = _mlp()
    opt = tkfac_tf.TKFAC(layer_collection=_collection(model))
    opt.build(model.trainable_variables)  # collection <-> optimizer: a cycle
    del opt
    collection = _collection(model)  # the abandoned one is collected, not an error
    assert [k.layer.name for k in collection.layer_kinds] == ["hidden", "logits"]


def test_release_of_a_hand_registered_layer_frees_it_for_from_model():
    model = _mlp()
    collection = tkfac_tf.LayerCollection()
    collection.register_dense(model.get_layer("hidden"))
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="'hidden'"):
        tkfac_tf.LayerCollection.from_model(model, "mse")
    collection.release()
    collection.release()  # idempotent
    auto = tkfac_tf.LayerCollection.from_model(model, "mse")
    assert sorted(k.layer.name for k in auto.layer_kinds) == ["hidden", "logits"]


def test_failed_from_model_gives_back_the_layers_it_took():
    model = _mlp()
    keep = tkfac_tf.LayerCollection()
    keep.register_dense(model.get_layer("logits"))  # held; 'hidden' comes first
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="'logits'"):
        tkfac_tf.LayerCollection.from_model(model, "mse")
    assert getattr(model.get_layer("hidden"), "_tkfac_recorder", None) is None
    keep.release()
    tkfac_tf.LayerCollection.from_model(model, "mse")


def test_attach_on_the_model_of_another_live_collection_is_refused():
    model = _mlp()
    opt = tkfac_tf.TKFAC(layer_collection=_collection(model))
    clone = tkfac_tf.TKFAC.from_config(opt.get_config())
    with pytest.raises(tkfac_tf.RegistrationConflictError, match="'hidden'.*another"):
        clone.attach(model)
    opt.attach(model)  # its own collection: released and registered again
    assert opt.layer_collection.get_config() == clone.get_config()["layer_collection"]


def test_calling_cov_update_op_twice_in_a_step_says_so():
    model = _mlp()
    opt = tkfac_tf.TKFAC(layer_collection=_collection(model), cov_update_every=None,
                         inv_update_every=None)
    opt.build(model.trainable_variables)
    x = np.random.RandomState(0).randn(8, 4).astype(np.float32)

    def step():
        model(x, training=True)
        opt.cov_update_op()
        opt.cov_update_op()

    for run in (step, tf.function(step)):
        with pytest.raises(ValueError, match="'hidden'.*already consumed by an earlier cov_update_op"):
            run()


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
        ({"damping": True}, TypeError, "damping must be a real number.*not a bool"),
        ({"damping": np.array([0.1, 0.2])}, TypeError, "damping must be a real number.*shape"),
        ({"damping": tf.constant(True)}, TypeError, "damping must be a real number.*bool"),
        ({"momentum": np.float32(1.5)}, ValueError, r"momentum must be in \[0.0, 1.0\)"),
        ({"cov_ema_decay": 1.0}, ValueError, "cov_ema_decay"),
        ({"cov_ema_decay": -0.1}, ValueError, "cov_ema_decay"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"cov_update_every": 0}, ValueError, "cov_update_every"),
        ({"cov_update_every": np.int64(0)}, ValueError, "cov_update_every must be an integer >= 1"),
        ({"inv_update_every": 2.5}, ValueError, "inv_update_every"),
        ({"inv_update_every": True}, ValueError, "inv_update_every must be an integer >= 1.*not a bool"),
        ({"inv_update_every": np.float64(5.0)}, ValueError, "inv_update_every must be an integer >= 1"),
        ({"estimation_mode": "fancy"}, ValueError, "estimation_mode"),
        ({"norm_constraint": -1.0}, ValueError, "norm_constraint"),
        ({"learning_rate": -0.1}, ValueError, "learning_rate"),
        ({"learning_rate": "fast"}, TypeError, "learning_rate must be a real number"),
        ({"weight_decay": "x"}, TypeError, "weight_decay must be a real number"),
        ({"weight_decay": -1.0}, ValueError, r"weight_decay must be in \[0.0, inf\)"),
        ({"weight_decay": True}, TypeError, "weight_decay"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"seed": True}, TypeError, "seed must be an integer.*not a bool"),
        ({"layer_collection": "layers"}, TypeError, "layer_collection"),
        ({"inverse_method": "lu"}, ValueError, "inverse_method must be one of"),
        ({"regularizer_curvature": "yes"}, TypeError, "regularizer_curvature must be True or False"),
        ({"curvature_batch_size": "ghost"}, ValueError,
         "curvature_batch_size must be 'auto', 'ghost_halves', None or an integer >= 1; got 'ghost'"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, pattern):
    with pytest.raises(error, match=pattern) as raised:
        tkfac_tf.TKFAC(**kwargs)
    assert type(raised.value) is error


@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), tf.constant(0.25),
                                   tf.constant(0.25, tf.float64), keras.Variable(0.25),
                                   np.array(0.25), 0.25])
def test_numpy_and_tensor_scalars_are_accepted(value):
    opt = tkfac_tf.TKFAC(learning_rate=value, damping=value, momentum=value, cov_ema_decay=value,
                         norm_constraint=value, weight_decay=value, conv_damping_floor=value)
    config = opt.get_config()
    for name in ("learning_rate", "momentum", "cov_ema_decay", "norm_constraint",
                 "weight_decay", "conv_damping_floor", "damping"):
        assert type(config[name]) is float and config[name] == pytest.approx(0.25), name
    opt.damping = value
    assert float(opt.damping.numpy()) == pytest.approx(0.25)
    json.dumps(config)


@pytest.mark.parametrize("value", [np.int64(5), np.int32(5), tf.constant(5), tf.constant(5, tf.int64),
                                   np.array(5), 5])
def test_numpy_and_tensor_integers_are_accepted(value):
    opt = tkfac_tf.KFAC(cov_update_every=value, inv_update_every=value, seed=value,
                        cov_batch_size=value, curvature_batch_size=value)
    config = opt.get_config()
    for name in ("cov_update_every", "inv_update_every", "seed", "cov_batch_size",
                 "curvature_batch_size"):
        assert type(config[name]) is int and config[name] == 5, name


def test_zero_learning_rate_and_weight_decay_are_accepted():
    model = _mlp()
    opt = tkfac_tf.TKFAC(learning_rate=0.0, weight_decay=0.0, layer_collection=_collection(model))
    assert float(opt.learning_rate.numpy()) == 0.0
    start = [w.numpy() for w in model.trainable_weights]
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(np.ones((4, 4), np.float32), np.zeros((4,), np.int32), verbose=0)
    for w, s in zip(model.trainable_weights, start):
        np.testing.assert_array_equal(w.numpy(), s)  # α = 0: no motion
    assert int(opt.num_cov_updates.numpy()) == 1


def test_damping_setter_refuses_bad_values_naming_damping():
    opt = tkfac_tf.TKFAC(damping=0.1)
    with pytest.raises(TypeError, match="damping must be a real number"):
        opt.damping = "big"
    with pytest.raises(ValueError, match="damping must be in"):
        opt.damping = np.float32(-1.0)
    assert float(opt.damping.numpy()) == pytest.approx(0.1)


@pytest.mark.parametrize("variance, error", [
    (True, TypeError), ("x", TypeError), (None, TypeError), (0.0, ValueError), (np.inf, ValueError)])
def test_bad_normal_variance_is_refused_naming_it_and_the_layer(variance, error):
    model = _mlp()
    with pytest.raises(error, match="variance of the normal predictive distribution on layer 'logits'"):
        tkfac_tf.LayerCollection().register_normal_predictive_distribution(model.layers[-1], variance=variance)


@pytest.mark.parametrize("coefficient, error", [(0.0, ValueError), (-1.0, ValueError), ("x", TypeError)])
def test_bad_distribution_coefficient_is_refused_naming_it(coefficient, error):
    model = _mlp()
    with pytest.raises(error, match="coefficient of the predictive distribution on layer 'logits'"):
        tkfac_tf.LayerCollection().register_categorical_predictive_distribution(
            model.layers[-1], coefficient=coefficient)


def test_a_dtype_option_is_kept_by_its_name():
    """matmul_dtype=tf.bfloat16 (equal to 'bfloat16') is stored as the
    string, so the config serialises to JSON."""
    config = tkfac_tf.TKFAC(matmul_dtype=tf.bfloat16).get_config()
    assert config["matmul_dtype"] == "bfloat16" and isinstance(config["matmul_dtype"], str)
    json.dumps(config)


def test_learning_rate_setter_checks_as_the_constructor_does():
    """Keras' setter (used by LearningRateScheduler and ReduceLROnPlateau)
    with the constructor's check: NaN, ∞ and negative rates are refused
    naming learning_rate, and the rate is unchanged."""
    opt = tkfac_tf.TKFAC(learning_rate=0.1)
    for bad in (np.nan, np.inf, -1.0):
        with pytest.raises(ValueError, match="learning_rate must be in"):
            opt.learning_rate = bad
    with pytest.raises(TypeError, match="learning_rate must be a real number"):
        opt.learning_rate = "fast"
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.1)
    opt.learning_rate = np.float32(0.25)
    assert float(opt.learning_rate.numpy()) == pytest.approx(0.25)


def test_estimation_mode_changes_only_before_the_optimizer_is_built():
    """The step reads it when traced, so after build a change would not
    reach an already traced train function: refused, naming the fix."""
    model = _mlp()
    opt = tkfac_tf.TKFAC(layer_collection=_collection(model))
    opt.estimation_mode = "exact"
    assert opt.get_config()["estimation_mode"] == "exact"
    opt.build(model.trainable_variables)
    with pytest.raises(ValueError, match="estimation_mode='empirical'"):
        opt.estimation_mode = "empirical"
    assert opt.estimation_mode == "exact"


def test_config_round_trip():
    opt = tkfac_tf.KFAC(
        learning_rate=0.2, damping=0.03, momentum=0.8, cov_ema_decay=0.9,
        cov_update_every=2, inv_update_every=7, estimation_mode="exact",
        norm_constraint=0.01, seed=5, weight_decay=1e-4, cov_batch_size=32,
        curvature_batch_size=16, inverse_method="newton_schulz", regularizer_curvature=False,
    )
    config = opt.get_config()
    assert config["curvature_batch_size"] == 16
    clone = tkfac_tf.KFAC.from_config(config)
    assert clone.get_config() == config
    assert config["damping"] == pytest.approx(0.03)
    assert config["inv_update_every"] == 7 and config["estimation_mode"] == "exact"
    assert config["inverse_method"] == "newton_schulz" and config["regularizer_curvature"] is False
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
