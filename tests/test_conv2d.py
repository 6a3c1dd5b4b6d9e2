"""Conv2D blocks (KFC layout) against brute force on tiny layers.

Brute force: im2col in NumPy loops, per-(example, location) pre-activation
gradients from a GradientTape on each class's −log p_c (exact Fisher of the
categorical: weights p_c), and dense Kronecker products / solves in float64.
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import layer_kinds

N, H, W, C_IN, C_OUT, CLASSES = 3, 5, 6, 2, 3, 3
KERNEL = (2, 3)
DAMPING = 1e-2
FLOOR = 1e-6

COMBOS = [
    (padding, strides, dilation, data_format)
    for padding in ("valid", "same")
    for strides in (1, 2)
    for dilation in (1, 2)
    for data_format in ("channels_last", "channels_first")
    if not (strides > 1 and dilation > 1)  # Keras refuses this combination
]


def _combo_id(combo):
    padding, strides, dilation, data_format = combo
    return f"{padding}-s{strides}-d{dilation}-{data_format.split('_')[1]}"


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


def exact_class_gradients(model, conv, x):
    """Per class c: p_c [N] and g_c = ∂(−log p_c)/∂s [N, T, c_out] (each
    example's own loss), with s the conv pre-activation computed by keras.ops."""
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


def _exact_statistics(model, lc, x, conv_damping="plain"):
    """TKFAC and K-FAC optimizers after one exact cov update + inverse update."""
    opts = [
        cls(learning_rate=0.1, damping=DAMPING, layer_collection=lc,
            estimation_mode="exact", cov_update_every=None, inv_update_every=None,
            conv_damping=conv_damping, conv_damping_floor=FLOOR)
        for cls in (tkfac_tf.TKFAC, tkfac_tf.KFAC)
    ]
    for opt in opts:
        opt.build(model.trainable_variables)

    @tf.function
    def step(x):
        for opt in opts:
            model(x, training=True)
            opt.cov_update_op()
            opt.inv_update_op()

    step(x)
    return opts


@pytest.fixture(scope="module", params=COMBOS, ids=_combo_id)
def conv_case(request):
    padding, strides, dilation, data_format = request.param
    keras.utils.set_random_seed(1)
    shape = (H, W, C_IN) if data_format == "channels_last" else (C_IN, H, W)
    conv = keras.layers.Conv2D(
        C_OUT, KERNEL, strides=strides, padding=padding, dilation_rate=dilation,
        data_format=data_format, activation="tanh",
        bias_initializer=keras.initializers.RandomNormal(stddev=0.3),
    )
    model = keras.Sequential([keras.Input(shape), conv, keras.layers.Flatten(), keras.layers.Dense(CLASSES)])
    x = np.random.RandomState(2).randn(N, *shape).astype(np.float32)
    lc = _register(model, [conv, model.layers[-1]])
    # Alternate the conv damping so both modes meet every layout family.
    conv_damping = "trace_scaled" if COMBOS.index(request.param) % 2 else "plain"
    tk, kf = _exact_statistics(model, lc, x, conv_damping)

    x_nhwc = x if data_format == "channels_last" else x.transpose(0, 2, 3, 1)
    patches = im2col(x_nhwc.astype(np.float64), KERNEL, (strides,) * 2, (dilation,) * 2, padding)
    a = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], axis=-1)  # [N, T, d_a]
    s, probs, grads = exact_class_gradients(model, conv, x)
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


def _brute_force_samples(case):
    """Every (example, location, class): a [S, d_a], √p_c·g [S, c_out]."""
    a, probs, grads = case["a"], case["probs"], case["grads"]
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
    a = conv_case["a"].reshape(-1, conv_case["a"].shape[-1])
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
    vector = np.random.RandomState(3).randn(d_a, C_OUT)
    expected = np.linalg.solve(np.kron(left, right), vector.ravel()).reshape(d_a, C_OUT)
    got = block.multiply_inverse(tf.constant(vector, tf.float32)).numpy()
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())
