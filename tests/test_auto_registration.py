"""Tests of LayerCollection.from_model: model walking, loss mapping, and the
statistics of shared and rank-3 Dense layers against brute force."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import auto_registration
from tkfac_tf import loss_functions

from tests import brute_force

LayerCollection = tkfac_tf.LayerCollection


# --- helpers ------------------------------------------------------------------
def _summary(collection):
    """Comparable description of a collection: blocks and distributions."""
    blocks = sorted(
        (k.layer.name, type(k).__name__, k.input_size, k.output_size)
        for k in collection.layer_kinds
    )
    dists = sorted(
        (type(d).__name__, d.layer.name, getattr(d, "variance", None))
        for d in collection.distributions
    )
    return blocks, dists


def _train(model, collection, loss, x, y, approximation=tkfac_tf.TKFAC):
    opt = approximation(
        learning_rate=0.05,
        damping=0.01,
        momentum=0.5,
        layer_collection=collection,
        estimation_mode="exact",
        inv_update_every=1,
        seed=3,
    )
    model.compile(optimizer=opt, loss=loss)
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    return [w.numpy() for w in model.weights], history.history["loss"]


def _pair(build):
    """Two models from ``build`` with identical weights."""
    first, second = build(), build()
    second.set_weights(first.get_weights())
    return first, second


def _check_auto_equals_hand(build, register_by_hand, loss, x, y):
    auto_model, hand_model = _pair(build)
    auto = LayerCollection.from_model(auto_model, loss)
    hand = LayerCollection()
    register_by_hand(hand, hand_model)
    assert _summary(auto) == _summary(hand)
    auto_weights, _ = _train(auto_model, auto, loss, x, y)
    hand_weights, _ = _train(hand_model, hand, loss, x, y)
    initial = build().get_weights()
    moved = False
    for a, h, w0 in zip(auto_weights, hand_weights, initial):
        np.testing.assert_allclose(a, h, rtol=1e-5, atol=1e-6)
        moved |= not np.allclose(a, w0)
    assert moved, "training did not change the weights"


def _data(n=48, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, classes, size=n)
    return x, y


# --- same blocks and same training as hand registration ----------------------
def test_sequential_matches_hand_registration():
    def build():
        keras.utils.set_random_seed(1)
        return keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(8, activation="tanh", name="hidden"),
                keras.layers.Dense(3, activation="softmax", name="out"),
            ]
        )

    def by_hand(lc, model):
        lc.register_dense(model.get_layer("hidden"))
        lc.register_dense(model.get_layer("out"))
        lc.register_categorical_predictive_distribution(model.get_layer("out"))

    x, y = _data()
    _check_auto_equals_hand(build, by_hand, "sparse_categorical_crossentropy", x, y)


def test_functional_residual_matches_hand_registration():
    def build():
        keras.utils.set_random_seed(2)
        inputs = keras.Input((4,))
        h = keras.layers.Dense(6, activation="tanh", name="h1")(inputs)
        branch = keras.layers.Dense(6, activation="tanh", name="h2")(h)
        h = keras.layers.Add()([h, branch])
        outputs = keras.layers.Dense(2, name="out")(h)
        return keras.Model(inputs, outputs)

    def by_hand(lc, model):
        for name in ("h1", "h2", "out"):
            lc.register_dense(model.get_layer(name))
        # Keras' mse is a mean over the 2 outputs: Gauss-Newton 2/D I = I/σ², σ² = D/2.
        lc.register_normal_predictive_distribution(model.get_layer("out"), variance=1.0)

    x, _ = _data(seed=1)
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2]], axis=1).astype("float32")
    _check_auto_equals_hand(build, by_hand, "mse", x, y)


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.logits = keras.layers.Dense(3, name="logits")

    def call(self, x, training=None):
        return self.logits(self.hidden(x))


def test_subclassed_matches_hand_registration():
    x, y = _data(seed=2)

    def build():
        keras.utils.set_random_seed(3)
        model = SubclassedNet()
        model(x[:2])
        return model

    def by_hand(lc, model):
        lc.register_dense(model.hidden)
        lc.register_dense(model.logits)
        lc.register_categorical_predictive_distribution(model.logits)

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _check_auto_equals_hand(build, by_hand, loss, x, y)


def test_nested_model_matches_hand_registration():
    def build():
        keras.utils.set_random_seed(4)
        inner = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(5, activation="tanh", name="inner_hidden"),
                keras.layers.Dense(4, activation="sigmoid", name="inner_out"),
            ],
            name="inner",
        )
        inputs = keras.Input((4,))
        h = keras.layers.Dense(6, activation="tanh", name="outer_hidden")(inputs)
        return keras.Model(inputs, inner(h))

    def by_hand(lc, model):
        inner = model.get_layer("inner")
        lc.register_dense(model.get_layer("outer_hidden"))
        lc.register_dense(inner.get_layer("inner_hidden"))
        lc.register_dense(inner.get_layer("inner_out"))
        lc.register_multi_bernoulli_predictive_distribution(inner.get_layer("inner_out"))

    x, _ = _data(seed=3)
    y = (x[:, :4] > 0).astype("float32")
    _check_auto_equals_hand(build, by_hand, "binary_crossentropy", x, y)


def test_subclassed_model_with_nested_functional_block():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((4,))
    block = keras.Model(inputs, keras.layers.Dense(5, activation="tanh", name="b1")(inputs))

    class Outer(keras.Model):
        def __init__(self):
            super().__init__()
            self.block = block
            self.head = keras.layers.Dense(2, activation="softmax", name="head")
            self.spare = keras.layers.Dense(2, name="spare")  # never called

        def call(self, x, training=None):
            return self.head(self.block(x))

    model = Outer()
    model(np.zeros((2, 4), "float32"))
    model.spare.build((None, 5))
    with mock.patch.object(auto_registration.logging, "warning") as warning:
        lc = LayerCollection.from_model(model, "categorical_crossentropy")
    assert _summary(lc) == (
        [("b1", "DenseKind", 5, 5), ("head", "DenseKind", 6, 2)],
        [("CategoricalLogits", "head", None)],
    )
    message = warning.call_args[0][0] % warning.call_args[0][1:]
    assert "spare (Dense): not called by the model" in message
    assert "spare/kernel" in message


def test_call_without_training_argument_is_reported():
    class NoTrainingArg(keras.Model):
        def __init__(self):
            super().__init__()
            self.out = keras.layers.Dense(2, name="out")

        def call(self, x):
            return self.out(x)

    model = NoTrainingArg()
    model(np.zeros((2, 3), "float32"))
    with mock.patch.object(auto_registration.logging, "warning") as warning:
        LayerCollection.from_model(model, "mse")
    assert warning.call_count == 1
    assert "add `training=None`" in warning.call_args[0][1]
    # fit never passes training=True to it: both rules' first step says so.
    for optimizer in (tkfac_tf.TKFAC.adaptive(), tkfac_tf.TKFAC()):
        model = NoTrainingArg()
        model(np.zeros((2, 3), "float32"))
        model.compile(optimizer=optimizer, loss="mse")
        with pytest.raises(ValueError, match="No statistics were recorded for layer 'out'.*`training` argument"):
            model.fit(np.zeros((4, 3), "float32"), np.zeros((4, 2), "float32"), verbose=0)


def test_subclassed_model_nested_in_functional_model():
    keras.utils.set_random_seed(15)
    inner = SubclassedNet()
    inner(np.zeros((2, 6), "float32"))
    inputs = keras.Input((4,))
    h = keras.layers.Dense(6, activation="tanh", name="first")(inputs)
    model = keras.Model(inputs, inner(h))
    lc = LayerCollection.from_model(model, keras.losses.CategoricalCrossentropy(from_logits=True))
    assert _summary(lc) == (
        [("first", "DenseKind", 5, 6), ("hidden", "DenseKind", 7, 8), ("logits", "DenseKind", 9, 3)],
        [("CategoricalLogits", "logits", None)],
    )


# --- statistics of shared and rank-3 layers against brute force -------------
def _optimizer_blocks(model, collection, x, layer_name):
    """(TKFAC block, KFAC block) after one exact covariance update on x."""
    blocks = []
    for cls in (tkfac_tf.TKFAC, tkfac_tf.KFAC):
        opt = cls(layer_collection=collection, estimation_mode="exact", seed=0)
        opt.build(model.trainable_variables)

        @tf.function
        def step():
            model(x, training=True)
            opt.cov_update_op()

        step()
        blocks.append(opt.fisher_blocks[layer_name])
    return blocks


def _exact_categorical_vectors(logits):
    """[K, N, C] vectors v_c = √p_c (p − e_c) of the exact categorical Fisher."""
    p = tf.nn.softmax(logits).numpy().astype(np.float64)
    eye = np.eye(p.shape[-1])
    return np.stack([np.sqrt(p[:, c : c + 1]) * (p - eye[c]) for c in range(p.shape[-1])])


def _with_one(x):
    return np.concatenate([x, np.ones(x.shape[:-1] + (1,))], axis=-1)


def test_shared_dense_statistics_sum_over_all_uses():
    keras.utils.set_random_seed(6)
    first, second = keras.Input((3,)), keras.Input((3,))
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    head = keras.layers.Dense(3, activation="softmax", name="out")
    outputs = head(keras.layers.Add()([shared(first), shared(second)]))
    model = keras.Model([first, second], outputs)
    lc = LayerCollection.from_model(model, "sparse_categorical_crossentropy")
    assert [k.layer.name for k in lc.layer_kinds].count("shared") == 1

    rng = np.random.default_rng(7)
    n = 5
    xs = [rng.normal(size=(n, 3)).astype("float32") for _ in range(2)]
    tkfac_block, kfac_block = _optimizer_blocks(model, lc, xs, "shared")

    # Independent reference: per-example Jacobians d logits_i / d s_{i,t}.
    kernel, bias = shared.kernel, shared.bias
    with tf.GradientTape(persistent=True) as tape:
        pre = [tf.matmul(x, kernel) + bias for x in xs]
        logits = tf.matmul(tf.tanh(pre[0]) + tf.tanh(pre[1]), head.kernel) + head.bias
    jacobians = np.stack(
        [tape.batch_jacobian(logits, s).numpy() for s in pre], axis=1
    )  # [N, T, C, d_g]
    v = _exact_categorical_vectors(logits)  # [K, N, C]
    g = np.einsum("knc,ntcd->kntd", v, jacobians)
    a = _with_one(np.stack(xs, axis=1))  # [N, T, d_in + 1]
    brute_force.check_blocks(tkfac_block, kfac_block, brute_force.sample_statistics(a, g, n))


def test_rank3_dense_statistics_one_sample_per_position():
    keras.utils.set_random_seed(8)
    inputs = keras.Input((3, 4))  # [batch, time, features]
    timewise = keras.layers.Dense(5, activation="tanh", name="timewise")
    head = keras.layers.Dense(3, name="logits")
    outputs = head(keras.layers.Flatten()(timewise(inputs)))
    model = keras.Model(inputs, outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    lc = LayerCollection.from_model(model, loss)
    assert _summary(lc)[0][1] == ("timewise", "DenseKind", 5, 5)

    n = 4
    x = np.random.default_rng(9).normal(size=(n, 3, 4)).astype("float32")
    tkfac_block, kfac_block = _optimizer_blocks(model, lc, x, "timewise")

    with tf.GradientTape(persistent=True) as tape:
        pre = tf.matmul(x, timewise.kernel) + timewise.bias  # [N, T, 5]
        logits = tf.matmul(tf.reshape(tf.tanh(pre), [n, -1]), head.kernel) + head.bias
    jacobian = tape.batch_jacobian(logits, pre).numpy()  # [N, C, T, d_g]
    v = _exact_categorical_vectors(logits)
    g = np.einsum("knc,nctd->kntd", v, jacobian)
    brute_force.check_blocks(tkfac_block, kfac_block, brute_force.sample_statistics(_with_one(x), g, n))


def _positional_fisher_columns(family, outputs):
    """[T·K, N, T, C]: the columns of the exact Fisher of each position's
    outcome (v at position t, zero elsewhere) for logits / means
    ``outputs`` [N, T, C]; K = C columns per position."""
    out = outputs.numpy().astype(np.float64)
    n, t_count, c_count = out.shape
    eye = np.eye(c_count)
    if family == "categorical":
        p = np.exp(out - out.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        local = np.stack([np.sqrt(p[..., c : c + 1]) * (p - eye[c]) for c in range(c_count)])
    elif family == "multi_bernoulli":
        p = 1.0 / (1.0 + np.exp(-out))
        local = np.stack([np.sqrt(p * (1 - p))[..., c : c + 1] * eye[c] for c in range(c_count)])
    else:  # normal, variance 1
        local = np.broadcast_to(eye[:, None, None, :], (c_count, n, t_count, c_count))
    columns = np.zeros((t_count, c_count, n, t_count, c_count))
    for t in range(t_count):
        columns[t, :, :, t] = local[:, :, t]
    return columns.reshape(t_count * c_count, n, t_count, c_count)


@pytest.mark.parametrize("family", ["categorical", "multi_bernoulli", "normal"])
def test_exact_mode_on_positional_outputs_equals_brute_force(family):
    """Dense(3, tanh) per position under Conv1D logits [N, T, C] that mix
    positions: 'exact' takes one backward pass per (position, class), so
    the statistics of the Dense layer equal the brute-force sums with each
    position's outcome independent (no cross-position terms)."""
    keras.utils.set_random_seed(11)
    n, positions, classes = 4, 3, 3
    inputs = keras.Input((positions, 2))
    hidden = keras.layers.Dense(3, activation="tanh", name="hidden")
    head = keras.layers.Conv1D(classes, 3, padding="same", name="logits")
    model = keras.Model(inputs, head(hidden(inputs)))
    lc = LayerCollection()
    lc.register_dense(hidden)
    lc.register_conv1d(head)
    getattr(lc, f"register_{family}_predictive_distribution")(head)
    x = np.random.default_rng(12).normal(size=(n, positions, 2)).astype("float32")
    tkfac_block, kfac_block = _optimizer_blocks(model, lc, x, "hidden")

    with tf.GradientTape() as tape:
        pre = tf.matmul(x, hidden.kernel) + hidden.bias  # [N, T, d_g]
        outputs = head(tf.tanh(pre))
    jacobian = tape.batch_jacobian(outputs, pre).numpy()  # [N, T_out, C, T, d_g]
    columns = _positional_fisher_columns(family, outputs)
    g = np.einsum("knoc,nocmd->knmd", columns, jacobian)
    expected = brute_force.sample_statistics(_with_one(x), g, n)
    brute_force.check_blocks(tkfac_block, kfac_block, expected)
    # A column at every position at once (the sum over t of the columns
    # above) adds cross-position terms: G is then measurably different.
    same_class = columns.reshape(positions, classes, *columns.shape[1:]).sum(0)
    wrong = brute_force.sample_statistics(
        _with_one(x), np.einsum("knoc,nocmd->knmd", same_class, jacobian), n
    )
    assert np.linalg.norm(wrong[4] - expected[4]) > 0.05 * np.linalg.norm(expected[4])


def test_exact_mode_refuses_too_many_positions_and_unknown_positions():
    lc = LayerCollection()
    head = keras.layers.Dense(8, name="logits")
    head.build((None, 4))
    lc.register_dense(head)
    lc.register_categorical_predictive_distribution(head)
    distribution = lc.distributions[0]
    too_many = tf.zeros([2, loss_functions.MAX_EXACT_BACKWARD_PASSES // 8 + 1, 8])
    with pytest.raises(ValueError, match=r"'logits'.*513 position\(s\) × 8 = 4104 backward passes"):
        distribution.exact_backward_vectors(too_many)
    assert len(distribution.exact_backward_vectors(tf.zeros([2, 512, 8]))) == 4096
    with pytest.raises(ValueError, match=r"1 position\(s\) × 5000 = 5000 backward passes"):
        distribution.exact_backward_vectors(tf.zeros([2, 5000]))

    @tf.function(input_signature=[tf.TensorSpec([None, None, 8])])
    def varying_length(x):
        return distribution.exact_backward_vectors(x)

    with pytest.raises(ValueError, match="'logits'.*varying length"):
        varying_length.get_concrete_function()


# --- BatchNormalization / Dropout with fit ------------------------------------
def test_batchnorm_dropout_model_trains_and_reports_unregistered():
    keras.utils.set_random_seed(10)
    model = keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="d1"),
            keras.layers.BatchNormalization(name="bn"),
            keras.layers.PReLU(name="prelu"),
            keras.layers.Dropout(0.2),
            keras.layers.Dense(3, activation="softmax", name="out"),
        ]
    )
    rng = np.random.default_rng(11)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(8, 3)), axis=1)
    model.compile(loss="sparse_categorical_crossentropy")
    with mock.patch.object(auto_registration.logging, "warning") as warning:
        # loss read from model.loss; PReLU's alpha left to plain momentum
        lc = LayerCollection.from_model(model, other_variables="momentum")
    assert warning.call_count == 1
    message = warning.call_args[0][0] % warning.call_args[0][1:]
    assert "prelu (PReLU): " in message and "prelu/alpha" in message
    assert "bn/gamma" not in message and "bn/beta" not in message
    assert "d1/kernel" not in message and "out/kernel" not in message
    assert _summary(lc)[0] == [
        ("bn", "ScaleAndShiftKind", 16, 2), ("d1", "DenseKind", 9, 16), ("out", "DenseKind", 17, 3)
    ]
    lc.release()
    lc = LayerCollection.from_model(model)  # default: a diagonal block for alpha
    assert ("prelu", "VariablesKind", 16, 1) in _summary(lc)[0]

    opt = tkfac_tf.TKFAC(
        learning_rate=0.1, damping=0.03, layer_collection=lc, inv_update_every=5, seed=0
    )
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    losses = model.fit(x, y, batch_size=64, epochs=6, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses
    assert int(opt.num_cov_updates.numpy()) == 24


# --- loss spellings -------------------------------------------------------------
def _head(activation, units=3):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(units, activation=activation, name="out")(hidden))


_CAT = loss_functions.CategoricalLogits
_BER = loss_functions.MultiBernoulliLogits
_NOR = loss_functions.Normal


@pytest.mark.parametrize(
    "loss, activation, expected",
    [
        ("sparse_categorical_crossentropy", "softmax", _CAT),
        ("SparseCategoricalCrossentropy", "softmax", _CAT),
        (keras.losses.sparse_categorical_crossentropy, "softmax", _CAT),
        (keras.losses.SparseCategoricalCrossentropy(), "softmax", _CAT),
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), None, _CAT),
        (tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), "linear", _CAT),
        ("categorical_crossentropy", "softmax", _CAT),
        (keras.losses.categorical_crossentropy, "softmax", _CAT),
        (keras.losses.CategoricalCrossentropy(), "softmax", _CAT),
        (keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1), None, _CAT),
        ("binary_crossentropy", "sigmoid", _BER),
        (keras.losses.binary_crossentropy, "sigmoid", _BER),
        (keras.losses.BinaryCrossentropy(), "sigmoid", _BER),
        (keras.losses.BinaryCrossentropy(from_logits=True), None, _BER),
        ("mse", None, _NOR),
        ("mean_squared_error", "tanh", _NOR),
        ("MeanSquaredError", None, _NOR),
        (keras.losses.mean_squared_error, None, _NOR),
        (keras.losses.MeanSquaredError(), "sigmoid", _NOR),
    ],
)
def test_loss_spelling_maps_to_distribution(loss, activation, expected):
    model = _head(activation, units=4)
    lc = LayerCollection.from_model(model, loss)
    (distribution,) = lc.distributions
    assert type(distribution) is expected
    assert distribution.layer is model.get_layer("out")
    if expected is _NOR:
        assert distribution.variance == 2.0  # D / 2 with D = 4


def test_compiled_loss_is_used_when_loss_is_none():
    model = _head("sigmoid")
    model.compile(optimizer="sgd", loss=keras.losses.BinaryCrossentropy())
    (distribution,) = LayerCollection.from_model(model).distributions
    assert type(distribution) is _BER


@pytest.mark.parametrize(
    "loss, activation, match",
    [
        ("sparse_categorical_crossentropy", None, r"from_logits=False.*'linear'.*from_logits=True"),
        (keras.losses.CategoricalCrossentropy(from_logits=True), "softmax", r"from_logits=True.*'softmax'"),
        ("binary_crossentropy", "softmax", r"expects probabilities from a 'sigmoid'"),
        (keras.losses.BinaryCrossentropy(from_logits=True), "sigmoid", r"from_logits=True"),
        ("categorical_crossentropy", "relu", r"activation='softmax'"),
    ],
)
def test_activation_loss_mismatch_is_a_clear_error(loss, activation, match):
    with pytest.raises(ValueError, match=match):
        LayerCollection.from_model(_head(activation), loss)


class CustomLoss(keras.losses.Loss):
    def call(self, y_true, y_pred):
        return tf.reduce_mean(tf.abs(y_true - y_pred), axis=-1)


def _custom_loss(y_true, y_pred):
    return tf.reduce_mean(tf.abs(y_true - y_pred), axis=-1)


@pytest.mark.parametrize(
    "loss", [_custom_loss, CustomLoss(), "hinge", "not_a_loss", keras.losses.Huber()]
)
def test_unmappable_loss_says_what_to_register(loss):
    with pytest.raises(ValueError) as error:
        LayerCollection.from_model(_head(None), loss)
    text = str(error.value)
    assert "Cannot infer a predictive distribution" in text
    assert "register_categorical_predictive_distribution" in text
    assert "register_normal_predictive_distribution" in text


def test_missing_loss_asks_for_compile_or_loss():
    with pytest.raises(ValueError, match="not compiled with a loss"):
        LayerCollection.from_model(_head("softmax"))


def test_unbuilt_model_is_refused():
    model = keras.Sequential([keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="not built"):
        LayerCollection.from_model(model, "mse")


# --- output layers that are not Dense --------------------------------------------
def _logits_then(final_layer, units=3):
    inputs = keras.Input((4,))
    logits = keras.layers.Dense(units, name="logits")(inputs)
    return keras.Model(inputs, final_layer(logits))


def test_activation_layer_output_is_tapped_directly():
    model = _logits_then(keras.layers.Activation("softmax", name="probs"))
    lc = LayerCollection.from_model(model, "sparse_categorical_crossentropy")
    assert _summary(lc) == (
        [("logits", "DenseKind", 5, 3)],
        [("CategoricalLogits", "probs", None)],
    )
    with pytest.raises(ValueError, match="from_logits=True"):
        LayerCollection.from_model(
            _logits_then(keras.layers.Activation("sigmoid")),
            keras.losses.BinaryCrossentropy(from_logits=True),
        )


def test_softmax_layer_output_reads_logits_of_previous_layer():
    model = _logits_then(keras.layers.Softmax(name="probs"))
    lc = LayerCollection.from_model(model, "categorical_crossentropy")
    assert _summary(lc)[1] == [("CategoricalLogits", "logits", None)]
    last_axis = LayerCollection.from_model(_logits_then(keras.layers.Softmax(axis=1)), "categorical_crossentropy")
    assert _summary(last_axis)[1] == [("CategoricalLogits", "logits", None)]
    with pytest.raises(ValueError, match="softmax over axis 0"):
        LayerCollection.from_model(_logits_then(keras.layers.Softmax(axis=0)), "categorical_crossentropy")
    with pytest.raises(ValueError, match="mean squared error on probabilities"):
        LayerCollection.from_model(_logits_then(keras.layers.Softmax()), "mse")


@pytest.mark.parametrize("op,loss,labels", [
    (keras.ops.softmax, "sparse_categorical_crossentropy", np.array([0, 2, 1, 1, 0, 2, 2, 1])),
    (keras.activations.sigmoid, "binary_crossentropy", np.eye(3)[[0, 2, 1, 1, 0, 2, 2, 1]]),
])
def test_probability_operation_output_trains_as_the_layer_activation(op, loss, labels):
    """An output computed by keras.ops.softmax / a sigmoid on linear logits
    in a functional graph gets the distribution on the logits layer: the
    same collection and, step for step, the same weights as Dense with that
    activation (which the other tests check against brute force)."""
    x = np.random.RandomState(3).randn(8, 4).astype(np.float32)
    name = "softmax" if op is keras.ops.softmax else "sigmoid"
    weights = []
    for with_op in (True, False):
        keras.utils.set_random_seed(2)
        inputs = keras.Input((4,))
        hidden = keras.layers.Dense(5, activation="tanh", name="hidden")(inputs)
        if with_op:
            outputs = op(keras.layers.Dense(3, name="logits")(hidden))
        else:
            outputs = keras.layers.Dense(3, activation=name, name="logits")(hidden)
        model = keras.Model(inputs, outputs)
        initial = [w.numpy() for w in model.weights]
        lc = LayerCollection.from_model(model, loss)
        assert [d.layer.name for d in lc.distributions] == ["logits"]
        model.compile(optimizer=tkfac_tf.TKFAC(learning_rate=0.1, damping=0.05, layer_collection=lc,
                                               seed=1, inv_update_every=1), loss=loss)
        model.fit(x, labels, batch_size=4, epochs=2, shuffle=False, verbose=0)
        weights.append([w.numpy() for w in model.weights])
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert max(np.abs(a - b).max() for a, b in zip(weights[1], initial)) > 1e-2


def test_linear_activation_layer_is_looked_through():
    model = _logits_then(keras.layers.Activation("linear", name="identity"))
    lc = LayerCollection.from_model(model, "mse")
    assert _summary(lc)[1] == [("Normal", "logits", 1.5)]


def test_output_without_activation_is_a_clear_error():
    model = _logits_then(keras.layers.Reshape((3, 1)))
    with pytest.raises(ValueError, match=r"'reshape.*' \(Reshape\).*no activation"):
        LayerCollection.from_model(model, "mse")


# --- several outputs -------------------------------------------------------------
def _two_heads(as_dict):
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(6, activation="tanh", name="hidden")(inputs)
    classes = keras.layers.Dense(3, activation="softmax", name="classes")(hidden)
    value = keras.layers.Dense(2, name="value")(hidden)
    outputs = {"value": value, "classes": classes} if as_dict else [classes, value]
    return keras.Model(inputs, outputs)


_TWO_HEADS = (
    [("classes", "DenseKind", 7, 3), ("hidden", "DenseKind", 5, 6), ("value", "DenseKind", 7, 2)],
    [("CategoricalLogits", "classes", None), ("Normal", "value", 1.0)],
)


def test_multi_output_dict_loss():
    model = _two_heads(as_dict=True)
    loss = {"classes": "sparse_categorical_crossentropy", "value": keras.losses.MeanSquaredError()}
    assert _summary(LayerCollection.from_model(model, loss)) == _TWO_HEADS


def test_multi_output_list_loss_and_compiled_loss():
    model = _two_heads(as_dict=False)
    model.compile(loss=["sparse_categorical_crossentropy", "mse"])
    assert _summary(LayerCollection.from_model(model)) == _TWO_HEADS
    partial = LayerCollection.from_model(_two_heads(as_dict=False), [None, "mse"])
    assert _summary(partial)[1] == [("Normal", "value", 1.0)]


def test_multi_output_errors():
    with pytest.raises(ValueError, match=r"keys \['probs'\] that name no model output"):
        LayerCollection.from_model(_two_heads(as_dict=True), {"probs": "mse"})
    with pytest.raises(ValueError, match="1 entries but the model has 2 outputs"):
        LayerCollection.from_model(_two_heads(as_dict=False), ["mse"])
    with pytest.raises(ValueError, match="does not match output 'value'"):
        LayerCollection.from_model(_two_heads(as_dict=True), "categorical_crossentropy")


def test_loss_weights_become_each_outputs_fisher_coefficient():
    """The compiled loss_weights (read with the compiled loss) or from_model's
    own: each output's distribution takes its weight as coefficient, kept by
    the collection's config; a single number needs a single output."""
    model = _two_heads(as_dict=True)
    model.compile(loss={"classes": "sparse_categorical_crossentropy", "value": "mse"},
                  loss_weights={"value": 0.25})
    coefficients = {d.layer.name: d.coefficient for d in LayerCollection.from_model(model).distributions}
    assert coefficients == {"classes": 1.0, "value": 0.25}
    model = _two_heads(as_dict=False)
    collection = LayerCollection.from_model(model, ["sparse_categorical_crossentropy", "mse"],
                                            loss_weights=[4.0, 1.0])
    config = collection.get_config()
    assert {e["layer"]: e.get("coefficient") for e in config["distributions"]} == {"classes": 4.0, "value": None}
    collection.release()
    restored = LayerCollection.from_config(config, model)
    assert {d.layer.name: d.coefficient for d in restored.distributions} == {"classes": 4.0, "value": 1.0}
    zero = LayerCollection.from_model(_two_heads(as_dict=False), ["sparse_categorical_crossentropy", "mse"],
                                      loss_weights=[0.0, 2.0])
    assert {d.layer.name: d.coefficient for d in zero.distributions} == {"value": 2.0}
    with pytest.raises(ValueError, match="one number, but the model has 2 outputs"):
        LayerCollection.from_model(_two_heads(as_dict=False), ["sparse_categorical_crossentropy", "mse"],
                                   loss_weights=2.0)


@pytest.mark.parametrize("passed", [False, True])
def test_compiling_with_loss_weights_a_collection_built_without_them_warns(passed):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="logits")])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    collection = LayerCollection.from_model(model, loss, loss_weights=[3.0] if passed else None)
    with mock.patch("tkfac_tf.optimizer.logging.warning") as warning:
        model.compile(optimizer=tkfac_tf.TKFAC(layer_collection=collection), loss=loss, loss_weights=[3.0])
    warned = [c for c in warning.call_args_list if "loss_weights" in c[0][0]]
    assert bool(warned) != passed


@pytest.mark.parametrize("approximation", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
def test_a_loss_weight_multiplies_the_fisher(approximation):
    """compile(loss_weights=[c]) with the registration by compile: the
    exact-mode Fisher blocks of one step are c times the unweighted ones
    (K-FAC: G scales by c, A not; TKFAC keeps √δ·Φ and √δ·Ψ, δ ∝ c: both
    scale by √c)."""
    x, y = _data(n=16, seed=2)
    factors = {}
    for weight in (1.0, 4.0):
        keras.utils.set_random_seed(5)
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6, activation="tanh", name="hidden"),
                                  keras.layers.Dense(3, name="logits")])
        opt = approximation(learning_rate=0.01, estimation_mode="exact", seed=1)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      loss_weights=[weight])
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        factors[weight] = {name: [v.numpy() for v in block.factor_variables]
                           for name, block in opt.fisher_blocks.items()}
    for name in ("hidden", "logits"):
        for plain, weighted, variable in zip(factors[1.0][name], factors[4.0][name],
                                             opt.fisher_blocks[name].factor_variables):
            scale = {"cov_g": 4.0, "cov_a": 1.0}.get(variable.path[-5:], 2.0)  # TKFAC: √c
            np.testing.assert_allclose(weighted, scale * plain, rtol=1e-5, atol=1e-8)


def test_multi_output_model_trains():
    keras.utils.set_random_seed(12)
    model = _two_heads(as_dict=True)
    loss = {"classes": "sparse_categorical_crossentropy", "value": "mse"}
    lc = LayerCollection.from_model(model, loss)
    x, y = _data(n=64, seed=4)
    targets = {"classes": y, "value": x[:, :2] * 0.5}
    opt = tkfac_tf.TKFAC(learning_rate=0.1, damping=0.03, layer_collection=lc, seed=1)
    model.compile(optimizer=opt, loss=loss)
    losses = model.fit(x, targets, batch_size=16, epochs=4, verbose=0).history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses


# --- Conv2D ------------------------------------------------------------------------
def test_conv2d_layers_are_registered():
    keras.utils.set_random_seed(13)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, activation="relu", name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="softmax", name="out"),
        ]
    )
    lc = LayerCollection.from_model(model, "sparse_categorical_crossentropy")
    names = sorted(k.layer.name for k in lc.layer_kinds)
    assert names == ["conv", "out"]
    # A grouped convolution is registered too (one block per group).
    grouped = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(4, 3, groups=2, name="grouped"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="logits"),
        ]
    )
    with mock.patch.object(auto_registration.logging, "warning") as warning:
        lc_grouped = LayerCollection.from_model(grouped, "mse")
    assert [k.layer.name for k in lc_grouped.layer_kinds] == ["grouped", "logits"]
    assert lc_grouped.layer_kinds[0].groups == 2
    warning.assert_not_called()
    hand = LayerCollection()
    twin = keras.models.clone_model(model)
    twin.set_weights(model.get_weights())
    hand.register_conv2d(twin.get_layer("conv"))
    hand.register_dense(twin.get_layer("out"))
    hand.register_categorical_predictive_distribution(twin.get_layer("out"))
    assert _summary(lc) == _summary(hand)
    x = np.random.default_rng(14).normal(size=(32, 6, 6, 2)).astype("float32")
    y = np.arange(32) % 2
    auto_weights, _ = _train(model, lc, "sparse_categorical_crossentropy", x, y)
    hand_weights, _ = _train(twin, hand, "sparse_categorical_crossentropy", x, y)
    for a, h in zip(auto_weights, hand_weights):
        np.testing.assert_allclose(a, h, rtol=1e-5, atol=1e-6)
