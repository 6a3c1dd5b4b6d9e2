"""Conv2D blocks (KFC layout) against brute force on tiny layers.

Brute force: im2col in NumPy loops, per-(example, location) pre-activation
gradients from a GradientTape on each class's −log p_c (exact Fisher of the
categorical: weights p_c), and dense Kronecker products / solves in float64.

channels_first layers are checked twice: with TensorFlow's own NCHW kernel
(skipped where the CPU has none, i.e. without oneDNN) and with the layer's
convolution computed through the equivalent NHWC one (``*-via_nhwc``, runs
everywhere); see tests/nchw_support.py.
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import capture, fisher_blocks, layer_kinds
from tests import brute_force, nchw_support

N, H, W, C_IN, C_OUT, CLASSES = 3, 5, 6, 2, 5, 3
# C_OUT differs from every output width W' below: Keras 3's TF backend
# (ops.add, seen in 3.15) adds a channels_first conv's (1, C, 1, 1) bias as an
# NHWC bias_add, i.e. along W', whenever W' == C and the shape is static.
KERNEL = (2, 3)
DAMPING = 1e-2
FLOOR = 1e-6

GEOMETRIES = [
    (padding, strides, dilation)
    for padding in ("valid", "same")
    for strides in (1, 2)
    for dilation in (1, 2)
    if not (strides > 1 and dilation > 1)  # Keras refuses this combination
]
# forward: "tf" runs the layer's own convolution (TensorFlow's NCHW kernel for
# channels_first); "via_nhwc" computes a channels_first layer's convolution as
# the equivalent channels_last one, so its statistics are checked on every CPU.
COMBOS = [
    geometry + (data_format, forward)
    for geometry in GEOMETRIES
    for data_format, forward in (
        ("channels_last", "tf"), ("channels_first", "tf"), ("channels_first", "via_nhwc")
    )
]


def _combo_id(combo):
    padding, strides, dilation, data_format, forward = combo
    suffix = "" if forward == "tf" else f"-{forward}"
    return f"{padding}-s{strides}-d{dilation}-{data_format.split('_')[1]}{suffix}"


# --- brute force -------------------------------------------------------------
def im2col(x_nhwc, kernel_size, strides, dilation, padding):
    """NumPy loops: [N, H, W, C] -> [N, H'·W', kh·kw·C], patch index
    (i_h·kw + i_w)·C + c, TF's 'same' convention (extra padding at the end)."""
    n, h, w, c = x_nhwc.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, strides, dilation
    ekh, ekw = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    if padding == "valid":
        ho, wo, top, left = (h - ekh) // sh + 1, (w - ekw) // sw + 1, 0, 0
    else:
        ho, wo = math.ceil(h / sh), math.ceil(w / sw)
        top = max((ho - 1) * sh + ekh - h, 0) // 2
        left = max((wo - 1) * sw + ekw - w, 0) // 2
    out = np.zeros((n, ho, wo, kh, kw, c), np.float64)
    for oh in range(ho):
        for ow in range(wo):
            for i in range(kh):
                for j in range(kw):
                    r, q = oh * sh - top + i * dh, ow * sw - left + j * dw
                    if 0 <= r < h and 0 <= q < w:
                        out[:, oh, ow, i, j, :] = x_nhwc[:, r, q, :]
    return out.reshape(n, ho * wo, kh * kw * c)


def exact_class_gradients(model, conv, x, via_nhwc=False):
    """Per class c: p_c [N] and g_c = ∂(−log p_c)/∂s [N, T, c_out] (each
    example's own loss), with s the conv pre-activation computed by keras.ops
    (a channels_first one through the equivalent NHWC conv if ``via_nhwc``)."""
    if via_nhwc:
        s = nchw_support.nchw_conv2d_via_nhwc(
            x, conv.kernel, conv.strides, conv.padding, conv.dilation_rate
        )
    else:
        s = keras.ops.conv(
            x, conv.kernel, strides=conv.strides, padding=conv.padding,
            dilation_rate=conv.dilation_rate, data_format=conv.data_format,
        )
    bias_shape = (1, 1, 1, -1) if conv.data_format == "channels_last" else (1, -1, 1, 1)
    s = s + tf.reshape(conv.bias, bias_shape)
    probs, grads = None, []
    for c in range(CLASSES):
        with tf.GradientTape() as tape:
            tape.watch(s)
            h = conv.activation(s)
            for layer in model.layers[1:]:
                h = layer(h)
            log_p = tf.nn.log_softmax(h)
            loss = -tf.reduce_sum(log_p[:, c])
        g = tape.gradient(loss, s).numpy().astype(np.float64)
        if conv.data_format == "channels_first":
            g = g.transpose(0, 2, 3, 1)
        grads.append(g.reshape(x.shape[0], -1, C_OUT))
        probs = np.exp(log_p.numpy().astype(np.float64))
    return s.numpy(), probs, grads


def theta_matrix(conv):
    k = conv.kernel.numpy().astype(np.float64)
    return np.concatenate([k.reshape(-1, k.shape[-1]), conv.bias.numpy()[None, :]], axis=0)


# --- fixtures ------------------------------------------------------------------
def _register(model, layers):
    lc = tkfac_tf.LayerCollection()
    for layer in layers:
        if isinstance(layer, keras.layers.Conv2D):
            lc.register_conv2d(layer)
        else:
            lc.register_dense(layer)
    lc.register_categorical_predictive_distribution(model.layers[-1])
    return lc


def _exact_statistics(model, lc, x, conv_damping="plain", with_graph=False):
    """TKFAC and K-FAC optimizers after one exact cov update + inverse update
    (and, if ``with_graph``, the tf.Graph of that step)."""
    opts = [
        cls(learning_rate=0.1, damping=DAMPING, layer_collection=lc,
            estimation_mode="exact", cov_update_every=None, inv_update_every=None,
            conv_damping=conv_damping, conv_damping_floor=FLOOR)
        for cls in (tkfac_tf.TKFAC, tkfac_tf.KFAC)
    ]
    for opt in opts:
        opt.build(model.trainable_variables)

    def step(x):
        for opt in opts:
            model(x, training=True)
            opt.cov_update_op()
            opt.inv_update_op()

    step(x)  # eagerly
    if with_graph:  # traced, not run
        return opts, tf.function(step).get_concrete_function(x).graph
    return opts


@pytest.fixture(scope="module", params=COMBOS, ids=_combo_id)
def conv_case(request):
    padding, strides, dilation, data_format, forward = request.param
    via_nhwc = forward == "via_nhwc"
    if data_format == "channels_first" and not via_nhwc:
        nchw_support.require_nchw_conv2d()
    keras.utils.set_random_seed(1)
    shape = (H, W, C_IN) if data_format == "channels_last" else (C_IN, H, W)
    conv = keras.layers.Conv2D(
        C_OUT, KERNEL, strides=strides, padding=padding, dilation_rate=dilation,
        data_format=data_format, activation="tanh",
        bias_initializer=keras.initializers.RandomNormal(stddev=0.3),
    )
    model = keras.Sequential([keras.Input(shape), conv, keras.layers.Flatten(), keras.layers.Dense(CLASSES)])
    if via_nhwc:
        nchw_support.compute_via_nhwc(conv)
    x = np.random.RandomState(2).randn(N, *shape).astype(np.float32)
    lc = _register(model, [conv, model.layers[-1]])
    # Alternate the conv damping over the geometries so both modes meet every
    # data format and forward path.
    conv_damping = "trace_scaled" if GEOMETRIES.index(request.param[:3]) % 2 else "plain"
    (tk, kf), graph = _exact_statistics(model, lc, x, conv_damping, with_graph=True)
    # The whole step (forward, capture, statistics, inverses) has NCHW
    # convolutions exactly when TensorFlow's NCHW kernel is what we test.
    nchw_ops = nchw_support.nchw_conv_ops(graph)
    if data_format == "channels_first" and not via_nhwc:
        assert nchw_ops, "the channels_first layer should use TensorFlow's NCHW kernel"
    else:
        assert not nchw_ops, nchw_ops

    x_nhwc = x if data_format == "channels_last" else x.transpose(0, 2, 3, 1)
    patches = im2col(x_nhwc.astype(np.float64), KERNEL, (strides,) * 2, (dilation,) * 2, padding)
    a = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], axis=-1)  # [N, T, d_a]
    s, probs, grads = exact_class_gradients(model, conv, x, via_nhwc)
    return dict(
        conv=conv, x=x, patches=patches, a=a, s=s, probs=probs, grads=grads,
        tkfac=tk.fisher_blocks[conv.name], kfac=kf.fisher_blocks[conv.name],
        conv_damping=conv_damping,
    )


# --- the per-layout brute-force checks ----------------------------------------
def test_patches_match_numpy_im2col(conv_case):
    conv, x, expected = conv_case["conv"], conv_case["x"], conv_case["patches"]
    kind = layer_kinds.Conv2DKind(conv)
    eager = kind.patches(x).numpy()
    xla = tf.function(kind.patches, jit_compile=True)(x).numpy()
    s = conv_case["s"]  # the conv's own pre-activation
    s_nhwc = s if conv.data_format == "channels_last" else s.transpose(0, 2, 3, 1)
    assert eager.shape == s_nhwc.shape[:3] + (KERNEL[0] * KERNEL[1] * C_IN,)
    np.testing.assert_array_equal(eager.reshape(expected.shape), expected.astype(np.float32))
    np.testing.assert_array_equal(xla, eager)
    # The patch order is the kernel's row order: s = a Θ reproduces the conv.
    np.testing.assert_allclose(
        conv_case["a"] @ theta_matrix(conv), s_nhwc.reshape(N, -1, C_OUT), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("strides", [1, 2])
def test_pointwise_patches_are_the_inputs_at_the_strided_positions(data_format, strides):
    """A 1×1 convolution's im2col (MobileNet's expansions and projections) is
    the input at each output position, channels last, and (channels_last,
    where the CPU has the kernel) reproduces the layer's pre-activation."""
    conv = keras.layers.Conv2D(C_OUT, 1, strides=strides, data_format=data_format, use_bias=False)
    x_nhwc = np.random.default_rng(0).normal(size=(N, 5, 5, C_IN)).astype(np.float32)
    x = x_nhwc if data_format == "channels_last" else x_nhwc.transpose(0, 3, 1, 2)
    conv.build(x.shape)
    patches = layer_kinds.Conv2DKind(conv).patches(x).numpy()
    np.testing.assert_array_equal(patches, x_nhwc[:, ::strides, ::strides])
    if data_format == "channels_last":
        np.testing.assert_allclose(patches @ conv.kernel.numpy()[0, 0], conv(x).numpy(),
                                   rtol=1e-5, atol=1e-5)


def _brute_force_samples(case):
    """Every (example, location, class): a [S, d_a], √p_c·g [S, c_out]
    (float64: the reference's own sums add no round-off)."""
    a, probs, grads = (np.asarray(case[k], np.float64) for k in ("a", "probs", "grads"))
    d_a = a.shape[-1]
    a_all = np.concatenate([a.reshape(-1, d_a)] * CLASSES)
    g_all = np.concatenate(
        [(np.sqrt(probs[:, c])[:, None, None] * grads[c]).reshape(-1, C_OUT) for c in range(CLASSES)]
    )
    return a_all, g_all


def test_tkfac_trace_and_factors(conv_case):
    block = conv_case["tkfac"]
    a, g = _brute_force_samples(conv_case)
    a_sq, g_sq = (a**2).sum(1), (g**2).sum(1)
    # δ = E_i[Σ_t Σ_c p_c ‖a_{i,t}‖² ‖g_{i,t,c}‖²]
    delta = (a_sq * g_sq).sum() / N
    np.testing.assert_allclose(block.delta.numpy(), delta, rtol=1e-5)
    np.testing.assert_allclose(np.trace(block.full_fisher().numpy()), delta, rtol=1e-5)
    phi = (a * g_sq[:, None]).T @ a / (N * delta)
    psi = (g * a_sq[:, None]).T @ g / (N * delta)
    np.testing.assert_allclose(block.phi.numpy(), phi, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(block.psi.numpy(), psi, rtol=1e-4, atol=1e-7)


def test_kfac_factors(conv_case):
    block = conv_case["kfac"]
    a = conv_case["a"].reshape(-1, conv_case["a"].shape[-1]).astype(np.float64)
    t = conv_case["a"].shape[1]
    _, g = _brute_force_samples(conv_case)
    np.testing.assert_allclose(block.cov_a.numpy(), a.T @ a / N, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(block.cov_g.numpy(), g.T @ g / (N * t), rtol=1e-4, atol=1e-8)


def _expected_damping(case, trace, n):
    if case["conv_damping"] == "plain":
        return DAMPING
    return max(trace / n, FLOOR)


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
def test_preconditioned_step_is_dense_solve(conv_case, approximation):
    block = conv_case[approximation]
    a, g = _brute_force_samples(conv_case)
    d_a, n_params = a.shape[1], a.shape[1] * C_OUT
    t = conv_case["a"].shape[1]
    if approximation == "tkfac":
        a_sq, g_sq = (a**2).sum(1), (g**2).sum(1)
        delta = (a_sq * g_sq).sum() / N
        lam = _expected_damping(conv_case, delta, n_params)
        left = (a * g_sq[:, None]).T @ a / (N * np.sqrt(delta)) + np.sqrt(lam) * np.eye(d_a)
        right = (g * a_sq[:, None]).T @ g / (N * np.sqrt(delta)) + np.sqrt(lam) * np.eye(C_OUT)
    else:
        cov_a = a.T @ a / (N * CLASSES)  # a_all repeats each sample once per class
        cov_g = g.T @ g / (N * t)
        lam = _expected_damping(conv_case, np.trace(cov_a) * np.trace(cov_g), n_params)
        pi = np.sqrt((np.trace(cov_a) / d_a) / (np.trace(cov_g) / C_OUT))
        left = cov_a + pi * np.sqrt(lam) * np.eye(d_a)
        right = cov_g + np.sqrt(lam) / pi * np.eye(C_OUT)
    np.testing.assert_allclose(block.effective_damping(DAMPING).numpy(), lam, rtol=1e-5)
    if block.damping_mode == "trace_scaled":  # the floor ν wins when above δ_l / n_l
        floor, block.damping_floor = block.damping_floor, 10.0 * lam
        try:
            np.testing.assert_allclose(block.effective_damping(DAMPING).numpy(), 10.0 * lam, rtol=1e-6)
        finally:
            block.damping_floor = floor
    vector = np.random.RandomState(3).randn(d_a, C_OUT)
    expected = np.linalg.solve(np.kron(left, right), vector.ravel()).reshape(d_a, C_OUT)
    got = block.multiply_inverse(tf.constant(vector, tf.float32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


# --- tkfac_tf's own code needs no NCHW kernel ------------------------------------
def test_channels_first_statistics_need_no_nchw_conv():
    """The library's statistics of a channels_first layer (patches, rows of
    a and g, TKFAC / K-FAC factors) from NCHW tensors made without any
    convolution: the graph has no convolution op at all (so it runs on every
    CPU), and eager and graph results match the brute force."""
    kh, kw = KERNEL
    conv = keras.layers.Conv2D(
        C_OUT, KERNEL, strides=(2, 1), padding="same", data_format="channels_first"
    )
    conv.build((None, C_IN, H, W))
    kind = layer_kinds.Conv2DKind(conv)
    rng = np.random.RandomState(9)
    x = rng.randn(N, C_IN, H, W).astype(np.float32)
    ho, wo = math.ceil(H / 2), W
    # Pre-activation gradients for CLASSES backward vectors, NCHW.
    grads = rng.randn(CLASSES, N, C_OUT, ho, wo).astype(np.float32)

    def make_variable(shape, initializer, name):
        return tf.Variable(keras.initializers.get(initializer)(shape), name=name)

    blocks = []
    for cls in (fisher_blocks.TKFACBlock, fisher_blocks.KFACBlock):
        block = cls(conv.name, kind.input_size, kind.output_size, make_variable)
        block.bind(kind)
        blocks.append(block)

    def statistics(x, grads):
        use = capture.LayerUse(x, tf.zeros([N, C_OUT, ho, wo]), None)
        samples = (kind.activations(use), kind.preactivation_gradients(use, grads[0]))
        factors = [block.statistics([use], [[g] for g in tf.unstack(grads)]) for block in blocks]
        return samples, factors

    graph_fn = tf.function(statistics)
    op_types = {op for op, _ in nchw_support.graph_op_types(
        graph_fn.get_concrete_function(x, grads).graph).values()}
    assert "ExtractImagePatches" in op_types and "Transpose" in op_types, op_types
    assert not [op for op in op_types if "Conv" in op], op_types

    patches = im2col(x.transpose(0, 2, 3, 1).astype(np.float64), KERNEL, (2, 1), (1, 1), "same")
    a = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], axis=-1).reshape(-1, kh * kw * C_IN + 1)
    gs = grads.astype(np.float64).transpose(0, 1, 3, 4, 2).reshape(CLASSES, -1, C_OUT)
    weights = np.ones(gs.shape[:2])
    delta, phi, psi = brute_force.tkfac_reference(a, gs, weights, N)
    cov_a, cov_g = brute_force.kfac_reference(a, gs, weights, N)
    cov_g /= ho * wo  # K-FAC's G of a conv averages over the N·T samples
    # TKFAC blocks keep √δ Φ and √δ Ψ (the seed's averaged quantities).
    for (got_a, got_g), ((got_left, got_right), (got_cov_a, got_cov_g)) in (
        statistics(x, grads), graph_fn(x, grads)
    ):
        np.testing.assert_allclose(got_a.numpy(), a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_g.numpy(), gs[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got_left.numpy(), np.sqrt(delta) * phi, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got_right.numpy(), np.sqrt(delta) * psi, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got_cov_a.numpy(), cov_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got_cov_g.numpy(), cov_g, rtol=1e-5, atol=1e-6)


# --- a conv with a 1×1 output is a Dense layer -----------------------------------
def test_conv_with_1x1_output_equals_dense():
    keras.utils.set_random_seed(4)
    kh, kw = 3, 2
    conv = keras.layers.Conv2D(C_OUT, (kh, kw), activation="tanh")
    conv_model = keras.Sequential(
        [keras.Input((kh, kw, C_IN)), conv, keras.layers.Flatten(), keras.layers.Dense(CLASSES)]
    )
    dense = keras.layers.Dense(C_OUT, activation="tanh")
    dense_model = keras.Sequential(
        [keras.Input((kh, kw, C_IN)), keras.layers.Flatten(), dense, keras.layers.Dense(CLASSES)]
    )
    dense.set_weights([conv.kernel.numpy().reshape(-1, C_OUT), conv.bias.numpy() + 0.1])
    conv.bias.assign(conv.bias.numpy() + 0.1)
    dense_model.layers[-1].set_weights(conv_model.layers[-1].get_weights())
    x = np.random.RandomState(5).randn(4, kh, kw, C_IN).astype(np.float32)

    conv_opts = _exact_statistics(conv_model, _register(conv_model, [conv]), x)
    dense_opts = _exact_statistics(dense_model, _register(dense_model, [dense]), x)
    for conv_opt, dense_opt in zip(conv_opts, dense_opts):
        conv_block = conv_opt.fisher_blocks[conv.name]
        dense_block = dense_opt.fisher_blocks[dense.name]
        assert conv_block.kind.name == "conv2d" and dense_block.kind.name == "dense"
        for left, right in zip(conv_block.factor_variables, dense_block.factor_variables):
            np.testing.assert_allclose(left.numpy(), right.numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            conv_block.full_fisher().numpy(), dense_block.full_fisher().numpy(), rtol=1e-5, atol=1e-7
        )
        vector = tf.constant(np.random.RandomState(6).randn(kh * kw * C_IN + 1, C_OUT), tf.float32)
        got = conv_block.multiply_inverse(vector).numpy()
        want = dense_block.multiply_inverse(vector).numpy()
        # Two inverses of the same factors: each ≈ κ·ε off (κ ≲ 1e2 here).
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


# --- training ---------------------------------------------------------------------
def _digits_convnet():
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def _convnet_collection(model):
    return _register(model, [layer for layer in model.layers if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))])


def test_convnet_on_digits_beats_sgd_momentum():
    """28 steps (2 epochs, batch 128) of fit on scikit-learn's 8×8 digits.

    SGD-m's learning rate is the best of {0.03, 0.1, 0.2} at this budget
    (training losses 2.09, 1.48, 1.89); K-FAC-family runs reach ≈0.2–0.3.
    """
    from sklearn import datasets
    digits = datasets.load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)

    def train(make_optimizer):
        model = _digits_convnet()
        model.compile(
            optimizer=make_optimizer(model),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        model.fit(x, y, batch_size=128, epochs=2, verbose=0)
        return model.evaluate(x, y, batch_size=len(x), verbose=0)

    sgd = train(lambda m: keras.optimizers.SGD(0.1, momentum=0.9))
    losses = {
        name: train(
            lambda m, cls=cls, cd=cd: cls(
                learning_rate=0.03, damping=0.1, momentum=0.9, inv_update_every=5,
                layer_collection=_convnet_collection(m), seed=0, conv_damping=cd,
            )
        )
        for name, cls, cd in [
            ("tkfac", tkfac_tf.TKFAC, "plain"),
            ("kfac", tkfac_tf.KFAC, "plain"),
            ("tkfac_trace_scaled", tkfac_tf.TKFAC, "trace_scaled"),
        ]
    }
    assert 0.5 < sgd < 2.3, sgd
    for name, loss in losses.items():
        assert loss < 0.5 * sgd, (name, loss, sgd)


# --- execution modes -----------------------------------------------------------------
@pytest.mark.parametrize("forward", ["tf", "via_nhwc"])
def test_eager_graph_and_xla_give_the_same_weights(forward):
    """A channels_last and a channels_first conv trained by fit; the
    channels_first one's convolution is TensorFlow's NCHW kernel ('tf',
    skipped where there is none) or the equivalent NHWC one ('via_nhwc')."""
    if forward == "tf":
        nchw_support.require_nchw_conv2d()
    rng = np.random.RandomState(7)
    x = rng.rand(32, 6, 6, 2).astype(np.float32)
    y = rng.randint(0, 4, size=32)

    def train(**compile_kwargs):
        keras.utils.set_random_seed(8)
        model = keras.Sequential([
            keras.Input((6, 6, 2)),
            keras.layers.Conv2D(3, 3, padding="same", activation="tanh"),
            keras.layers.AveragePooling2D(2),
            keras.layers.Permute((3, 1, 2)),
            keras.layers.Conv2D(4, 2, strides=1, data_format="channels_first", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ])
        if forward == "via_nhwc":
            nchw_support.compute_via_nhwc(model.layers[3])
        # Both convs registered, the Dense left to the plain momentum update
        # (each registered block adds several seconds of XLA compile time).
        lc = _register(model, [model.layers[0], model.layers[3]])
        opt = tkfac_tf.TKFAC(
            learning_rate=0.05, damping=0.1, inv_update_every=2, seed=3,
            layer_collection=lc, conv_damping="trace_scaled",
        )
        model.compile(
            optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **compile_kwargs,
        )
        initial = [w.numpy() for w in model.weights]
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        for before, w in zip(initial, model.weights):
            assert np.abs(w.numpy() - before).max() > 1e-3, w.path  # it trained
        return [w.numpy() for w in model.weights]

    eager = train(run_eagerly=True)
    for other in (train(), train(jit_compile=True)):
        for a, b in zip(eager, other):
            # float32 round-off grown over 4 fixed steps (XLA vs eager: up to
            # 2.3e-6 measured): the tolerance of tests/test_modes.py.
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


# --- errors ------------------------------------------------------------------------
def test_register_conv2d_errors():
    lc = tkfac_tf.LayerCollection()
    dense = keras.layers.Dense(2, name="my_dense")
    dense.build((None, 3))
    with pytest.raises(TypeError, match="my_dense.*not keras.layers.Conv2D"):
        lc.register_conv2d(dense)
    with pytest.raises(TypeError, match="keras.layers.Layer"):
        lc.register_conv2d("conv")
    with pytest.raises(ValueError, match="'my_conv' is not built"):
        lc.register_conv2d(keras.layers.Conv2D(2, 3, name="my_conv"))
    grouped = keras.layers.Conv2D(4, 3, groups=2, name="grouped")
    grouped.build((None, 5, 5, 4))
    lc.register_conv2d(grouped)  # one block per group (tests/test_conv_kinds.py)
    assert lc.layer_kinds[-1].groups == 2
    conv = keras.layers.Conv2D(2, 3, name="ok_conv")
    conv.build((None, 5, 5, 1))
    lc.register_conv2d(conv)
    with pytest.raises(ValueError, match="already registered"):
        lc.register_conv2d(conv)
    with pytest.raises(ValueError, match="conv_damping must be one of"):
        tkfac_tf.TKFAC(layer_collection=lc, conv_damping="scaled")
    with pytest.raises(ValueError, match="conv_damping_floor"):
        tkfac_tf.KFAC(layer_collection=lc, conv_damping_floor=0.0)
