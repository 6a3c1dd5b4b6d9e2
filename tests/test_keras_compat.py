"""Each Keras internal of tkfac_tf.keras_compat still does what tkfac_tf
relies on (a Keras upgrade that changes one fails here, by name)."""

import keras
import numpy as np
import tensorflow as tf

from tkfac_tf import keras_compat


def test_set_untracked_keeps_a_variable_out_of_the_layers_state():
    layer = keras.layers.Layer()
    extra = keras.Variable(np.zeros(2, "float32"), name="extra")
    keras_compat.set_untracked(layer, "helper", extra)
    assert layer.helper is extra
    assert all(w is not extra for w in layer.weights)
    layer.tracked = keras.Variable(np.zeros(2, "float32"), name="tracked")  # what tracking does
    assert any(w is layer.tracked for w in layer.weights)


def test_current_call_context_names_the_outermost_layer_and_training_flag():
    seen = []

    class Probe(keras.layers.Layer):
        def call(self, x):
            context = keras_compat.current_call_context()
            seen.append((context.entry_layer, context.training))
            return x

    model = keras.Sequential([keras.Input((2,)), Probe()])
    seen.clear()  # the symbolic call that built the model
    model(np.zeros((1, 2), "float32"), training=True)
    model(np.zeros((1, 2), "float32"), training=False)
    assert seen == [(model, True), (model, False)]
    assert keras_compat.current_call_context() is None


def test_variable_key_and_slot_find_each_variables_optimizer_variable():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(4)])
    opt = keras.optimizers.SGD(momentum=0.9)
    opt.build(model.trainable_variables)
    key = keras_compat.variable_key(opt)
    assert len({key(v) for v in model.trainable_variables}) == len(model.trainable_variables)
    assert key(model.trainable_variables[0]) == key(model.layers[0].kernel)
    assert [key(v) for v in keras_compat.trained_variables(opt)] == [key(v) for v in model.trainable_variables]
    for variable in model.trainable_variables:
        momentum = keras_compat.slot(opt, opt.momentums, variable)
        assert momentum.shape == variable.shape and variable.name in momentum.path


def test_applied_batches_counts_micro_batches_and_iterations_updates():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras.optimizers.SGD(gradient_accumulation_steps=2)
    opt.build(model.trainable_variables)
    grads = [tf.ones_like(v) for v in model.trainable_variables]
    for _ in range(3):
        opt.apply(grads, model.trainable_variables)
    assert int(keras_compat.applied_batches(opt).numpy()) == 3
    assert int(opt.iterations.numpy()) == 1


def test_uses_weight_decay_follows_keras_exclusions():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    opt = keras.optimizers.AdamW(weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.build(model.trainable_variables)
    kernel, bias = model.layers[0].kernel, model.layers[0].bias
    assert keras_compat.uses_weight_decay(opt, kernel)
    assert not keras_compat.uses_weight_decay(opt, bias)


def test_the_compile_hook_sees_every_compile_and_load_model_still_compiles(tmp_path):
    seen = []
    hook = lambda model, previous: seen.append((model.name, type(previous).__name__))  # noqa: E731
    keras_compat.call_after_compile(hook)
    keras_compat.call_after_compile(hook)  # installed once
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="hooked")
    model.compile(optimizer="sgd", loss="mse")
    model.compile(optimizer="adam", loss="mse")
    assert seen == [("hooked", "NoneType"), ("hooked", "SGD")]
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.models.load_model(str(tmp_path / "m.keras"))
    assert loaded.compiled and seen[-1] == ("hooked", "NoneType")  # compile_from_config ran compile
    wrapper_optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
    assert isinstance(keras_compat.inner_optimizer(wrapper_optimizer), keras.optimizers.SGD)
    assert keras_compat.inner_optimizer(model.optimizer) is model.optimizer


def test_call_state_is_batch_norms_moving_statistics_and_no_frozen_kernel():
    norm = keras.layers.BatchNormalization()
    norm.build((None, 3))
    assert [v.path for v in keras_compat.call_state(norm)] == [norm.moving_mean.path, norm.moving_variance.path]
    dense = keras.layers.Dense(2, trainable=False)
    dense.build((None, 3))
    assert dense.non_trainable_variables and keras_compat.call_state(dense) == []


def test_probability_op_names_the_softmax_and_sigmoid_operations_of_a_functional_graph():
    inputs = keras.Input((4,))
    logits = keras.layers.Dense(3)(inputs)

    def producer(tensor):
        return tensor._keras_history.operation

    assert keras_compat.probability_op(producer(keras.ops.softmax(logits))) == "softmax"
    assert keras_compat.probability_op(producer(keras.activations.softmax(logits))) == "softmax"
    assert keras_compat.probability_op(producer(keras.ops.sigmoid(logits))) == "sigmoid"
    assert keras_compat.probability_op(producer(keras.ops.relu(logits))) is None
    assert keras_compat.probability_op(producer(logits)) is None
