"""forward_mode.jvp against independent Jacobian-vector products: every
hand-written rule and the generic rule, in float64, against TensorFlow's own
``ForwardAccumulator`` run eagerly (which transposes each op's gradient) and
against dense Jacobians; in a graph and under XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tkfac_tf import forward_mode

RNG = np.random.RandomState(0)


@pytest.fixture(autouse=True)
def _same_values_in_any_test_order():
    RNG.seed(0)


def _tensor(*shape, positive=False):
    value = RNG.randn(*shape)
    return tf.constant(np.abs(value) + 0.5 if positive else value, tf.float64)


def _walked(fn, primals, tangent_sets, jit_compile=False):
    """fn's outputs' tangents by forward_mode.jvp inside a tf.function."""

    @tf.function(jit_compile=jit_compile)
    def run(*values):
        sources = [tf.identity(v) for v in values]
        return forward_mode.jvp(sources, tangent_sets, tf.nest.flatten(fn(*sources)))

    return [[t.numpy() for t in ts] for ts in run(*primals)]


def _accumulated(fn, primals, tangents):
    """The same tangents from an eager ForwardAccumulator (None -> zeros)."""
    tangents = [tf.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
    with tf.autodiff.ForwardAccumulator(list(primals), tangents) as accumulator:
        outputs = tf.nest.flatten(fn(*primals))
    return [
        np.zeros(o.shape) if accumulator.jvp(o) is None else accumulator.jvp(o).numpy()
        for o in outputs
    ]


def _conv(x, w):
    return tf.nn.conv2d(x, w, strides=2, padding="SAME")


def _depthwise(x, w):
    return tf.nn.depthwise_conv2d(x, w, strides=[1, 1, 1, 1], padding="VALID")


def _transposed_conv(x, w):
    return tf.nn.conv2d_transpose(x, w, output_shape=[2, 6, 6, 3], strides=2, padding="SAME")


# (name, fn of the primals, primal shapes): each case's ops have the rule named.
CASES = [
    ("matmul", lambda a, b: [tf.matmul(a, b), tf.matmul(a, b, transpose_a=True, transpose_b=True)],
     [(3, 4), (4, 3)]),
    ("batch_matmul_einsum", lambda a, b: [tf.matmul(a, b, adjoint_b=True),
                                          tf.einsum("bij,bkj->bik", a, b)], [(2, 3, 4), (2, 5, 4)]),
    ("convolutions", lambda x, w: [_conv(x, w), _depthwise(x, w[..., :1]),
                                   _transposed_conv(_conv(x, w)[..., :3], w)],
     [(2, 6, 6, 3), (3, 3, 3, 3)]),
    ("bias_add_broadcasts", lambda x, b: [tf.nn.bias_add(x, b), x * b, x + b, b - x, x / b, b / x,
                                          tf.math.squared_difference(x, b), x * x],
     [(4, 3), (3,)]),
    ("one_sided_sums", lambda x, b: [x + tf.constant(1.0, tf.float64), tf.zeros_like(x) + x,
                                     tf.nn.bias_add(tf.ones([4, 3], tf.float64), b)], [(4, 3), (3,)]),
    ("shapes", lambda x, y: [tf.reshape(x, [6, 4]), tf.transpose(x, [2, 0, 1]),
                             tf.expand_dims(x, 1), tf.squeeze(x[:, :1], 1), x[1:, ::2],
                             tf.slice(x, [0, 1, 0], [2, 1, 4]), tf.gather(x, [2, 0], axis=1),
                             tf.pad(x, [[1, 0], [0, 2], [0, 0]]), tf.tile(x, [1, 2, 1]),
                             tf.concat([x, y], 0), tf.stack([x, y]), tf.unstack(x)[1],
                             tf.split(x, 2, axis=2)[1], tf.split(x, [1, 3], axis=2)[0],
                             tf.broadcast_to(x[:1], [3, 3, 4]), tf.reverse(x, [1]),
                             tf.roll(x, 1, axis=2), tf.cumsum(x, axis=1)],
     [(2, 3, 4), (2, 3, 4)]),
    ("reductions_select", lambda x, y: [tf.reduce_sum(x, 1), tf.reduce_mean(x, [0, 1], keepdims=True),
                                        -x, tf.add_n([x, y, x]), tf.where(x > 0, x, y),
                                        tf.linalg.band_part(x, -1, 0), tf.nn.avg_pool2d(
                                            tf.reshape(x, [1, 4, 6, 1]), 2, 2, "VALID")],
     [(4, 6), (4, 6)]),
    ("elementwise", lambda x, p: [tf.nn.relu(x), tf.nn.relu6(3 * x), tf.nn.elu(x), tf.nn.selu(x),
                                  tf.nn.softplus(x), tf.sigmoid(x), tf.tanh(x), tf.math.rsqrt(p),
                                  tf.sqrt(p), tf.math.reciprocal(p), tf.exp(x), tf.math.log(p),
                                  tf.math.log1p(p), tf.square(x), tf.abs(x), tf.math.erf(x),
                                  tf.math.erfc(x), tf.sin(x), tf.cos(x), tf.nn.softmax(x),
                                  tf.nn.log_softmax(x), keras.activations.gelu(x)],
     [(3, 5), (3, 5)]),
    # Where y has x's shape (stride 1, or dimensions of size 1) the pooled tangent is a computed
    # tensor of the output's shape (x * w).
    ("max_pool", lambda x, w: [tf.nn.max_pool2d(x, 2, 2, "VALID"), tf.nn.max_pool2d(x * w, 3, 1, "SAME"),
                               tf.nn.max_pool2d(x * w, [2, 3], 1, "SAME"), tf.nn.max_pool2d(x * w, 1, 1, "VALID"),
                               tf.nn.max_pool2d((x * w)[:, :1, :1], 2, 2, "SAME"),
                               tf.nn.max_pool2d((x * w)[:, :1], 2, [2, 1], "SAME")],
     [(2, 4, 4, 2), (2, 4, 4, 2)]),
    ("generic_rule", lambda x, w: [tf.nn.leaky_relu(x, 0.3),
                                   tf.maximum(x, w), tf.pow(tf.abs(x) + 1, w), tf.math.cumprod(x, 1),
                                   tf.reduce_max(x, 1), tf.image.resize(x, [6, 6]), tf.math.atan(x),
                                   tf.cond(tf.reduce_sum(x) > 0, lambda: tf.sin(x) * w,
                                           lambda: tf.cos(x) * w)],
     [(2, 4, 4, 2), (2, 4, 4, 2)]),
    # The generic rule takes the op's partial derivatives even where one
    # input depends on another: y = op(x, f(x)).
    ("generic_rule_dependent_inputs", lambda x, w: [
        tf.maximum(x, 0.3 * x), tf.pow(tf.abs(x) + 1, x * w),
        tf.math.divide_no_nan(x, tf.reduce_sum(x * x)),
        tf.raw_ops.TanhGrad(y=tf.tanh(x), dy=x * w)], [(2, 4), (2, 4)]),
    ("while_loop", lambda x, w: [tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, tf.tanh(h @ w)),
                                               (tf.constant(0), x))[1]], [(2, 3), (3, 3)]),
    ("constant_outputs", lambda x, y: [tf.stop_gradient(x) * 2, tf.ones_like(x), tf.sign(x) + y,
                                       tf.cast(tf.shape(x)[0], tf.float64)], [(3, 2), (3, 2)]),
]


@pytest.mark.parametrize("name,fn,shapes", CASES, ids=[c[0] for c in CASES])
def test_rules_equal_forward_accumulator(name, fn, shapes):
    primals = [_tensor(*s, positive=name == "elementwise" and i == 1) for i, s in enumerate(shapes)]
    tangent_sets = [[_tensor(*s) for s in shapes], [_tensor(*shapes[0]), None]]
    walked = _walked(fn, primals, tangent_sets)
    for tangents, got in zip(tangent_sets, walked):
        expected = _accumulated(fn, primals, tangents)
        assert len(got) == len(expected)
        for index, (g, e) in enumerate(zip(got, expected)):
            np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12, err_msg=f"{name} output {index}")


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_max_pool_rule_in_16_bits_compiles_with_xla(dtype):
    """XLA on CPU has no 16-bit MaxPoolGradGrad kernel (mixed precision): the
    rule computes it in float32; the tangents are the float32 walk's, rounded."""
    x, t = _tensor(2, 4, 4, 3), _tensor(2, 4, 4, 3)
    fn = lambda v: [tf.nn.max_pool2d(v, 2, 2, "SAME")]
    want = _walked(fn, [tf.cast(x, tf.float32)], [[tf.cast(t, tf.float32)]])[0][0]
    got = _walked(fn, [tf.cast(x, dtype)], [[tf.cast(t, dtype)]], jit_compile=True)[0][0]
    assert got.dtype == dtype.as_numpy_dtype
    np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-2, atol=1e-2)
    assert np.abs(want).max() > 0.5


def _convnext_block():
    """Depthwise conv, LayerNorm, GELU MLP, residual (float64)."""
    inputs = keras.Input((4, 4, 2), dtype="float64")
    h = keras.layers.DepthwiseConv2D(3, padding="same", dtype="float64")(inputs)
    h = keras.layers.LayerNormalization(dtype="float64")(h)
    h = keras.layers.Dense(6, activation="gelu", dtype="float64")(h)
    h = keras.layers.Dense(2, dtype="float64")(h)
    return keras.Model(inputs, keras.layers.Add(dtype="float64")([inputs, h])), _tensor(2, 4, 4, 2)


def _recurrent():
    """LSTM then GRU: while loops whose outputs are TensorLists (float64)."""
    inputs = keras.Input((5, 3), dtype="float64")
    h = keras.layers.LSTM(4, return_sequences=True, dtype="float64")(inputs)
    return keras.Model(inputs, keras.layers.GRU(3, dtype="float64")(h)), _tensor(2, 5, 3)


@pytest.mark.parametrize("build,modes", [(_convnext_block, (False, True)), (_recurrent, (False,))],
                         ids=["convnext_block", "lstm_gru"])
def test_walk_equals_dense_jacobian_of_keras_models(build, modes):
    """J v by the walk equals the dense Jacobian (tape.jacobian) times v, in
    a graph (and compiled with XLA: the ConvNeXt block)."""
    keras.utils.set_random_seed(1)
    model, x = build()
    variables = model.trainable_variables
    values = [tf.convert_to_tensor(v) for v in variables]
    directions = [[_tensor(*v.shape) for v in variables] for _ in range(2)]

    def output(*vals):
        with keras.StatelessScope(state_mapping=list(zip(variables, vals))):
            return model(x, training=True)

    with tf.GradientTape() as tape:
        tape.watch(values)
        out = output(*values)
    jacobians = tape.jacobian(out, values)
    for jit_compile in modes:
        walked = _walked(output, values, directions, jit_compile=jit_compile)
        for direction, got in zip(directions, walked):
            expected = sum(
                np.tensordot(j.numpy(), d.numpy(), axes=d.shape.rank) for j, d in zip(jacobians, direction)
            )
            np.testing.assert_allclose(got[0], expected, rtol=1e-9, atol=1e-12)
            assert np.abs(expected).max() > 0.1


def test_targets_independent_of_the_sources_get_zero_tangents():
    @tf.function
    def run():
        source = tf.identity(tf.ones([2], tf.float64))
        other = tf.constant([1.0, 2.0], tf.float64) * 3
        return forward_mode.jvp([source], [[tf.ones([2], tf.float64)]], [other, source * 2])

    (unrelated, doubled), = run()
    np.testing.assert_array_equal(unrelated.numpy(), [0.0, 0.0])
    np.testing.assert_array_equal(doubled.numpy(), [2.0, 2.0])
