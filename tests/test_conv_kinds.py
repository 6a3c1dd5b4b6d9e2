"""Conv1D, grouped Conv2D, DepthwiseConv2D and SeparableConv2D blocks against
brute force on tiny layers.

Brute force (independent of the library's code paths):
* patches by NumPy loops (``test_conv2d.im2col``; Conv1D as a 1-row image,
  causal padding applied in NumPy), split into groups by NumPy indexing;
* the pre-activation s recomputed with keras.ops (``conv``, ``depthwise_conv``;
  always channels_last, so no NCHW kernel is needed) and its gradient per
  class c of the categorical (exact Fisher: weights p_c) by a GradientTape;
  for SeparableConv2D also the depthwise output u and ∂ℓ/∂u;
* per-example parameter gradients by a GradientTape per example and class,
  and from them the exact Fisher block.

Checks: Σ_t a_t g_tᵀ of the samples equals the per-example gradient (so the
samples and the Θ layout are right); δ, Φ, Ψ, A, G per group from their
definitions; tr F_exact = δ where the output has one location; the
preconditioned step equals a dense solve with the damped Kronecker matrix;
``full_fisher`` / ``multiply_fisher``; eager / tf.function / XLA equality;
save / resume. channels_first layers whose TensorFlow kernel needs oneDNN
(Conv1D) compute their convolution as the channels_last one
(``_conv1d_via_nwc``) where that kernel is missing.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import keras_compat
from tkfac_tf import layer_kinds
from tests import nchw_support
from tests.test_conv2d import im2col

N, CLASSES = 3, 3
DAMPING = 1e-2
L = keras.layers


# --- cases ----------------------------------------------------------------------
CASES = {
    # name: (layer factory, channels_last input shape)
    "conv1d-valid": (lambda df: L.Conv1D(5, 3, data_format=df), (7, 2)),
    "conv1d-causal-d2-g2": (lambda df: L.Conv1D(4, 2, padding="causal", dilation_rate=2, groups=2, data_format=df), (6, 4)),
    "conv1d-one-step": (lambda df: L.Conv1D(3, 4, data_format=df), (4, 2)),
    "grouped-same-s2": (lambda df: L.Conv2D(4, (2, 3), strides=2, padding="same", groups=2, data_format=df), (5, 4, 4)),
    "grouped-valid-d2-nobias": (lambda df: L.Conv2D(6, 2, dilation_rate=2, groups=3, use_bias=False, data_format=df), (4, 5, 3)),
    "depthwise-same": (lambda df: L.DepthwiseConv2D((2, 3), depth_multiplier=2, padding="same", data_format=df), (4, 5, 3)),
    "depthwise-one-location": (lambda df: L.DepthwiseConv2D(2, depth_multiplier=3, data_format=df), (2, 2, 2)),
    "separable-same-s2": (lambda df: L.SeparableConv2D(4, (2, 3), strides=2, depth_multiplier=2, padding="same", data_format=df), (5, 4, 3)),
    "separable-valid-nobias": (lambda df: L.SeparableConv2D(3, 2, use_bias=False, data_format=df), (4, 3, 2)),
    "separable-one-location": (lambda df: L.SeparableConv2D(3, 2, depth_multiplier=2, data_format=df), (2, 2, 2)),
}
PARAMS = [
    (name, df) for name in CASES for df in ("channels_last", "channels_first")
    # channels_first on a subset: Conv1D (no NCW kernel on every CPU: the
    # NWC route) and a grouped Conv2D; depthwise and separable share the
    # patch code of the grouped case.
    if df == "channels_last" or name in ("conv1d-causal-d2-g2", "grouped-same-s2")
]


def _conv1d_nchw_supported():
    try:
        tf.nn.conv1d(tf.ones([1, 1, 3]), tf.ones([2, 1, 1]), 1, "VALID", data_format="NCW")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def _conv1d_via_nwc(conv):
    """A channels_first Conv1D computing its convolution as the channels_last
    one (TensorFlow's CPU NCW kernel needs oneDNN). Inputs, pre-activation
    and gradients stay NCW, exactly what the NCW kernel would give."""
    def call(inputs):
        x = keras.ops.transpose(inputs, (0, 2, 1))
        if conv.padding == "causal":
            x = keras.ops.pad(x, [[0, 0], [conv.dilation_rate[0] * (conv.kernel_size[0] - 1), 0], [0, 0]])
        s = keras.ops.conv(x, conv.kernel, strides=list(conv.strides),
                           padding="valid" if conv.padding == "causal" else conv.padding,
                           dilation_rate=conv.dilation_rate, data_format="channels_last")
        if conv.use_bias:
            s = s + conv.bias
        return conv.activation(keras.ops.transpose(s, (0, 2, 1)))

    keras_compat.set_untracked(conv, "call", call)


def _kind_of(layer):
    if isinstance(layer, L.SeparableConv2D):
        return "separable"
    if isinstance(layer, L.DepthwiseConv2D):
        return "depthwise"
    return "conv1d" if isinstance(layer, L.Conv1D) else "conv2d"


def _cf_shape(shape):
    return (shape[-1],) + tuple(shape[:-1])


# --- brute force ------------------------------------------------------------------
def _patches(layer, x_cl):
    """NumPy im2col [N, T, window·C] of the channels_last input."""
    x = x_cl.astype(np.float64)
    if isinstance(layer, L.Conv1D):
        k, s, d = layer.kernel_size[0], layer.strides[0], layer.dilation_rate[0]
        padding = layer.padding
        if padding == "causal":
            x = np.pad(x, [(0, 0), (d * (k - 1), 0), (0, 0)])
            padding = "valid"
        return im2col(x[:, None], (1, k), (1, s), (1, d), padding)
    return im2col(x, layer.kernel_size, layer.strides, layer.dilation_rate, layer.padding)


def _forward_cl(layer, x_cl, u=None):
    """channels_last pre-activation (and, separable, depthwise output u) by keras.ops."""
    kind = _kind_of(layer)
    opts = dict(strides=tuple(layer.strides), dilation_rate=layer.dilation_rate, data_format="channels_last")
    if kind == "conv1d" and layer.padding == "causal":
        x_cl = keras.ops.pad(x_cl, [[0, 0], [layer.dilation_rate[0] * (layer.kernel_size[0] - 1), 0], [0, 0]])
        opts["padding"] = "valid"
    else:
        opts["padding"] = layer.padding
    if kind == "separable":
        if u is None:
            u = keras.ops.depthwise_conv(x_cl, layer.depthwise_kernel, **opts)
        s = keras.ops.conv(u, layer.pointwise_kernel, strides=1, padding="valid", data_format="channels_last")
    elif kind == "depthwise":
        s = keras.ops.depthwise_conv(x_cl, layer.kernel, **opts)
    elif layer.groups > 1:  # group by group (Keras' grouped CPU conv is an XLA call)
        xs = tf.split(x_cl, layer.groups, axis=-1)
        ks = tf.split(layer.kernel, layer.groups, axis=-1)
        s = tf.concat([keras.ops.conv(xg, kg, **opts) for xg, kg in zip(xs, ks)], axis=-1)
    else:
        s = keras.ops.conv(x_cl, layer.kernel, **opts)
    if layer.bias is not None:
        s = s + layer.bias
    return s, u


def _rest(model, layer, s_cl):
    """Logits from the channels_last pre-activation."""
    if layer.data_format == "channels_first":
        s_cl = keras.ops.moveaxis(s_cl, -1, 1)
    h = layer.activation(s_cl)
    for other in model.layers[1:]:
        h = other(h)
    return h


def _theta(layer, grads):
    """NumPy: parameter gradients -> ∇Θ per block ([G, d_a, d_g] arrays)."""
    kind = _kind_of(layer)
    bias = grads[-1] if layer.bias is not None else None
    if kind == "separable":
        dk, pk = grads[0], grads[1]
        kh, kw, c, m = dk.shape
        dw = dk.reshape(kh * kw, c, m).transpose(1, 0, 2)
        pw = pk.reshape(c * m, -1)
        if bias is not None:
            pw = np.concatenate([pw, bias[None]], axis=0)
        return [dw, pw[None]]
    k = grads[0]
    if kind == "depthwise":
        groups, out_g = k.shape[-2], k.shape[-1]
    else:
        groups = layer.groups
        out_g = k.shape[-1] // groups
    rows = int(np.prod(k.shape)) // (groups * out_g)
    th = k.reshape(rows, groups, out_g).transpose(1, 0, 2)
    if bias is not None:
        th = np.concatenate([th, bias.reshape(groups, 1, out_g)], axis=1)
    return [th]


def _brute_force(model, layer, x):
    """Samples per block: list of (a [G, N, T, d_a], gs [C, G, N, T, d_g]),
    class probabilities p [N, C], per-example ∇Θ per block [C, N, ...]."""
    cf = layer.data_format == "channels_first"
    x_cl = np.moveaxis(x, 1, -1) if cf else x
    kind = _kind_of(layer)
    patches = _patches(layer, x_cl)  # [N, T, window·C]
    n, t = patches.shape[:2]
    c_in = x_cl.shape[-1]
    window = patches.shape[-1] // c_in
    s0, u0 = _forward_cl(layer, tf.constant(x_cl))
    grads_s, grads_u = [], []
    for c in range(CLASSES):
        with tf.GradientTape(persistent=True) as tape:
            u = None
            if u0 is not None:
                u = tf.identity(u0)
                tape.watch(u)
            s, _ = _forward_cl(layer, tf.constant(x_cl), u)
            tape.watch(s)
            log_p = tf.nn.log_softmax(_rest(model, layer, s))
            loss = -tf.reduce_sum(log_p[:, c])
        grads_s.append(tape.gradient(loss, s).numpy().astype(np.float64).reshape(n, t, -1))
        if u is not None:
            grads_u.append(tape.gradient(loss, u).numpy().astype(np.float64).reshape(n, t, -1))
        probs = np.exp(log_p.numpy().astype(np.float64))
    gs = np.stack(grads_s)  # [C, N, T, c_out]
    ones = np.ones((n, t, 1))
    bias = layer.bias is not None
    if kind == "separable":
        c_m = grads_u[0].shape[-1]
        m = c_m // c_in
        dw_a = patches.reshape(n, t, window, c_in).transpose(3, 0, 1, 2)  # [C, N, T, window]
        dw_g = np.stack(grads_u).reshape(CLASSES, n, t, c_in, m).transpose(0, 3, 1, 2, 4)
        u_np = u0.numpy().astype(np.float64).reshape(n, t, c_m)
        pw_a = np.concatenate([u_np, ones], -1) if bias else u_np
        blocks = [(dw_a, dw_g), (pw_a[None], gs[:, None])]
    else:
        if kind == "depthwise":
            groups, in_g = c_in, 1
        else:
            groups = layer.groups
            in_g = c_in // groups
        a = patches.reshape(n, t, window, groups, in_g).transpose(3, 0, 1, 2, 4).reshape(groups, n, t, window * in_g)
        if bias:
            a = np.concatenate([a, np.ones(a.shape[:-1] + (1,))], -1)
        g = gs.reshape(CLASSES, n, t, groups, -1).transpose(0, 3, 1, 2, 4)
        blocks = [(a, g)]
    # Per-example parameter gradients, one GradientTape per example and class.
    params = [v for v in ([layer.depthwise_kernel, layer.pointwise_kernel] if kind == "separable" else [layer.kernel])]
    if bias:
        params.append(layer.bias)
    per_example = [[[] for _ in range(n)] for _ in range(CLASSES)]
    for i in range(n):
        for c in range(CLASSES):
            with tf.GradientTape() as tape:
                s, _ = _forward_cl(layer, tf.constant(x_cl[i : i + 1]))
                loss = -tf.nn.log_softmax(_rest(model, layer, s))[0, c]
            per_example[c][i] = _theta(layer, [g.numpy().astype(np.float64) for g in tape.gradient(loss, params)])
    return blocks, probs, per_example


def _opts(model, lc, x, conv_damping, conv_statistics="expand"):
    opts = [
        cls(learning_rate=0.1, damping=DAMPING, layer_collection=lc, estimation_mode="exact",
            cov_update_every=None, inv_update_every=None, conv_damping=conv_damping,
            conv_statistics=conv_statistics)
        for cls in (tkfac_tf.TKFAC, tkfac_tf.KFAC)
    ]
    for opt in opts:
        opt.build(model.trainable_variables)

    # Eagerly (the graph and XLA steps: test_eager_graph_and_xla_give_the_same_weights).
    for opt in opts:
        model(x, training=True)
        opt.cov_update_op()
        opt.inv_update_op()
    return opts


def _param_id(param):
    return f"{param[0]}-{param[1].split('_')[1]}"


ONE_LOCATION = [p for p in PARAMS if p[0].endswith(("one-location", "one-step"))]


@pytest.fixture(scope="module", params=PARAMS, ids=_param_id)
def case(request):
    name, data_format = request.param
    factory, shape = CASES[name]
    keras.utils.set_random_seed(3)
    layer = factory(data_format)
    layer.activation = keras.activations.get("tanh")
    in_shape = _cf_shape(shape) if data_format == "channels_first" else shape
    model = keras.Sequential([keras.Input(in_shape), layer, L.Flatten(), L.Dense(CLASSES)])
    if layer.bias is not None:
        layer.bias.assign(np.random.RandomState(4).randn(*layer.bias.shape) * 0.3)
    if isinstance(layer, L.Conv1D) and data_format == "channels_first" and not _conv1d_nchw_supported():
        _conv1d_via_nwc(layer)
    x = np.random.RandomState(5).randn(N, *in_shape).astype(np.float32)
    lc = tkfac_tf.LayerCollection.from_model(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert lc.layer_kinds[0].layer is layer
    conv_damping = "trace_scaled" if PARAMS.index(request.param) % 2 else "plain"
    tk, kf = _opts(model, lc, x, conv_damping)
    tk_reduce, kf_reduce = _opts(model, lc, x, conv_damping, conv_statistics="reduce")
    blocks, probs, per_example = _brute_force(model, layer, x)
    return dict(layer=layer, name=name, blocks=blocks, probs=probs, per_example=per_example,
                tkfac=tk.fisher_blocks[layer.name], kfac=kf.fisher_blocks[layer.name],
                tkfac_reduce=tk_reduce.fisher_blocks[layer.name],
                kfac_reduce=kf_reduce.fisher_blocks[layer.name], conv_damping=conv_damping)


def _parts(block):
    return list(getattr(block, "parts", [block]))


def _as_groups(value):
    value = np.asarray(value)
    return value if value.ndim == 3 else value[None]


def _weighted(a, g, probs):
    """Flat samples for the exact Fisher of the categorical: every
    (class, example, location): a, √p_c g."""
    groups = a.shape[0]
    a_all = np.concatenate([a.reshape(groups, -1, a.shape[-1])] * CLASSES, axis=1)
    g_all = (np.sqrt(probs.T)[:, None, :, None, None] * g).transpose(1, 0, 2, 3, 4).reshape(groups, -1, g.shape[-1])
    return a_all, g_all


# --- checks ---------------------------------------------------------------------------
def test_samples_reproduce_per_example_gradients(case):
    """Σ_t a_t g_tᵀ (brute-force samples) = the per-example gradient from a
    GradientTape: validates the patches, the gradients and the Θ layout
    that the other checks rely on."""
    for b, (a, g) in enumerate(case["blocks"]):
        for c in range(CLASSES):
            for i in range(N):
                expected = case["per_example"][c][i][b]
                got = np.einsum("gta,gtb->gab", a[:, i], g[c, :, i])
                np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def _reduced(blocks):
    """conv_statistics='reduce': one sample per example, the patches
    averaged and the gradients summed over its T locations (a [G, N, 1, d_a],
    gs [C, G, N, 1, d_g])."""
    return [(a.mean(axis=2, keepdims=True), g.sum(axis=3, keepdims=True)) for a, g in blocks]


@pytest.mark.parametrize("conv_statistics", ["expand", "reduce"])
def test_tkfac_trace_and_factors(case, conv_statistics):
    block = case["tkfac" if conv_statistics == "expand" else "tkfac_reduce"]
    samples = case["blocks"] if conv_statistics == "expand" else _reduced(case["blocks"])
    for part, (a, g) in zip(_parts(block), samples):
        a_all, g_all = _weighted(a, g, case["probs"])
        a_sq, g_sq = (a_all**2).sum(-1), (g_all**2).sum(-1)  # [G, S]
        delta = (a_sq * g_sq).sum(-1) / N  # [G]
        np.testing.assert_allclose(np.reshape(part.delta.numpy(), [-1]), delta, rtol=1e-4)
        np.testing.assert_allclose(np.trace(part.full_fisher().numpy()), delta.sum(), rtol=1e-4)
        phi = np.einsum("gs,gsi,gsj->gij", g_sq, a_all, a_all) / (N * delta[:, None, None])
        psi = np.einsum("gs,gsi,gsj->gij", a_sq, g_all, g_all) / (N * delta[:, None, None])
        np.testing.assert_allclose(_as_groups(part.phi.numpy()), phi, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(_as_groups(part.psi.numpy()), psi, rtol=1e-4, atol=1e-6)
    assert np.isclose(block.trace().numpy(), sum(
        ((_weighted(a, g, case["probs"])[0] ** 2).sum(-1) * (_weighted(a, g, case["probs"])[1] ** 2).sum(-1)).sum() / N
        for a, g in samples), rtol=1e-4)


@pytest.mark.parametrize("case", ONE_LOCATION, ids=_param_id, indirect=True)
def test_exact_fisher_trace_is_delta_with_one_location(case):
    """One output location: the exact Fisher block (per-example gradients)
    has trace δ (TKFAC's trace restriction), per block and per group. (With
    several locations tr F_exact = E‖Σ_t a_t g_tᵀ‖² ≠ δ: KFC's spatially
    uncorrelated assumption; the other tests check δ = Σ_t ‖a_t‖²‖g_t‖².)"""
    for b, part in enumerate(_parts(case["tkfac"])):
        v = np.stack([[case["per_example"][c][i][b] for i in range(N)] for c in range(CLASSES)])  # [C, N, G, d_a, d_g]
        groups = v.shape[2]
        v = v.reshape(CLASSES, N, groups, -1)
        fisher = np.einsum("nc,cngp,cngq->gpq", case["probs"], v, v) / N
        delta = part.delta.numpy()
        np.testing.assert_allclose(np.trace(fisher, axis1=1, axis2=2), np.reshape(delta, [-1]), rtol=1e-4)
        # ... and the TKFAC block is exactly δ Φ ⊗ Ψ of it (here both are the
        # same single-batch quantities; the exact block's diagonal blocks
        # agree in trace, not in general in their entries).
        np.testing.assert_allclose(np.trace(part.full_fisher().numpy()), np.trace(fisher, axis1=1, axis2=2).sum(), rtol=1e-4)


@pytest.mark.parametrize("conv_statistics", ["expand", "reduce"])
def test_kfac_factors(case, conv_statistics):
    block = case["kfac" if conv_statistics == "expand" else "kfac_reduce"]
    samples = case["blocks"] if conv_statistics == "expand" else _reduced(case["blocks"])
    for part, (a, g) in zip(_parts(block), samples):
        t = a.shape[2]
        groups = a.shape[0]
        a_flat = a.reshape(groups, -1, a.shape[-1])
        _, g_all = _weighted(a, g, case["probs"])
        np.testing.assert_allclose(_as_groups(part.cov_a.numpy()), np.einsum("gsi,gsj->gij", a_flat, a_flat) / N, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_as_groups(part.cov_g.numpy()), np.einsum("gsi,gsj->gij", g_all, g_all) / (N * t), rtol=1e-4, atol=1e-7)


CONSTANT_PATCH_CASES = {
    "conv2d": (lambda: L.Conv2D(3, 2), (4, 4, 2)),
    "grouped": (lambda: L.Conv2D(4, (2, 3), groups=2, use_bias=False), (4, 5, 4)),
    "depthwise": (lambda: L.DepthwiseConv2D(2, depth_multiplier=2), (3, 4, 2)),
    "conv1d-s2": (lambda: L.Conv1D(3, 2, strides=2), (7, 2)),
    "separable": (lambda: L.SeparableConv2D(3, 2, depth_multiplier=2), (4, 4, 2)),
}


@pytest.mark.parametrize("name", list(CONSTANT_PATCH_CASES))
def test_reduce_is_the_exact_fisher_of_one_example_with_equal_patches(name):
    """One example whose input is the same at every spatial position, 'valid'
    padding: every output location sees the same patch a, so the example's
    gradient Σ_t a g_tᵀ = a (Σ_t g_t)ᵀ is the reduced sample, and both
    reduced blocks (TKFAC δ Φ ⊗ Ψ and K-FAC A ⊗ G) equal the exact Fisher
    block Σ_c p_c vec(∇Θ_c) vec(∇Θ_c)ᵀ from per-class GradientTape
    gradients (per group; per part of a separable layer). The expanded
    blocks (a sample per location) do not."""
    factory, shape = CONSTANT_PATCH_CASES[name]
    keras.utils.set_random_seed(7)
    layer = factory()
    layer.activation = keras.activations.get("tanh")
    model = keras.Sequential([keras.Input(shape), layer, L.Flatten(), L.Dense(CLASSES)])
    channels = np.random.RandomState(8).randn(shape[-1]).astype(np.float32)
    x = np.broadcast_to(channels, (1, *shape)).copy()
    lc = tkfac_tf.LayerCollection.from_model(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    params = [v for v in layer.trainable_weights]
    probs = tf.nn.softmax(model(x)).numpy()[0].astype(np.float64)
    thetas = []
    for c in range(CLASSES):
        with tf.GradientTape() as tape:
            loss = -tf.nn.log_softmax(model(x))[0, c]
        grads = tape.gradient(loss, params)
        by_name = {id(v): g.numpy().astype(np.float64) for v, g in zip(params, grads)}
        ordered = [by_name[id(v)] for v in _kind_parameters(layer)]
        thetas.append(_theta(layer, ordered))
    for conv_statistics, equal in (("reduce", True), ("expand", False)):
        for opt in _opts(model, lc, x, "plain", conv_statistics):
            for b, part in enumerate(_parts(opt.fisher_blocks[layer.name])):
                v = np.stack([theta[b] for theta in thetas])  # [C, G, d_a, d_g]
                v = v.reshape(CLASSES, v.shape[1], -1)
                exact = np.einsum("c,cgp,cgq->gpq", probs, v, v)
                got = part.full_fisher().numpy()
                size = exact.shape[-1]
                diagonal = np.stack([got[g * size:(g + 1) * size, g * size:(g + 1) * size]
                                     for g in range(exact.shape[0])])
                close = np.allclose(diagonal, exact, rtol=1e-4, atol=1e-7 * np.abs(exact).max())
                assert close == equal, (conv_statistics, type(opt).__name__, b)


@pytest.mark.parametrize("name", list(CASES))
def test_mean_patches_eagerly_in_graphs_under_xla_and_with_unknown_sizes(name):
    """``convolution_mean_patches`` (selection-matrix contractions, no
    im2col) = the brute-force NumPy patches averaged over each example's
    locations, for every padding, stride, dilation and data format of the
    cases; eagerly, in a tf.function, under XLA and with unknown spatial
    sizes (the im2col fallback)."""
    factory, shape = CASES[name]
    layer = factory("channels_last")
    x = np.random.RandomState(9).randn(2, *shape).astype(np.float32)
    layer(x)
    rank = len(shape) - 1
    kernel_size = (layer.depthwise_kernel if isinstance(layer, L.SeparableConv2D) else layer.kernel).shape[:rank]
    expected = _patches(layer, x).mean(axis=1)

    def mean_patches(inputs):
        return layer_kinds.convolution_mean_patches(inputs, layer, rank, kernel_size)

    unknown = tf.TensorSpec([None] * (rank + 1) + [shape[-1]], tf.float32)
    for fn in (mean_patches, tf.function(mean_patches), tf.function(mean_patches, jit_compile=True),
               tf.function(mean_patches, input_signature=[unknown])):
        np.testing.assert_allclose(fn(tf.constant(x)).numpy(), expected, rtol=1e-5, atol=1e-6)


def _kind_parameters(layer):
    if isinstance(layer, L.SeparableConv2D):
        return [layer.depthwise_kernel, layer.pointwise_kernel] + ([layer.bias] if layer.bias is not None else [])
    return [layer.kernel] + ([layer.bias] if layer.bias is not None else [])


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
def test_preconditioned_step_is_dense_solve(case, approximation):
    rng = np.random.RandomState(6)
    block = case[approximation]
    vectors, expected_all = [], []
    for part, (a, g) in zip(_parts(block), case["blocks"]):
        groups, d_a, d_g = a.shape[0], a.shape[-1], g.shape[-1]
        a_all, g_all = _weighted(a, g, case["probs"])
        t = a.shape[2]
        vector = rng.randn(groups, d_a, d_g)
        expected = np.zeros_like(vector)
        for k in range(groups):
            ak, gk = a_all[k], g_all[k]
            if approximation == "tkfac":
                a_sq, g_sq = (ak**2).sum(-1), (gk**2).sum(-1)
                delta = (a_sq * g_sq).sum() / N
                lam = DAMPING if case["conv_damping"] == "plain" else max(delta / (d_a * d_g), 1e-6)
                left = (ak * g_sq[:, None]).T @ ak / (N * np.sqrt(delta)) + np.sqrt(lam) * np.eye(d_a)
                right = (gk * a_sq[:, None]).T @ gk / (N * np.sqrt(delta)) + np.sqrt(lam) * np.eye(d_g)
            else:
                cov_a = ak.T @ ak / (N * CLASSES)
                cov_g = gk.T @ gk / (N * t)
                lam = DAMPING if case["conv_damping"] == "plain" else max(np.trace(cov_a) * np.trace(cov_g) / (d_a * d_g), 1e-6)
                pi = np.sqrt((np.trace(cov_a) / d_a) / (np.trace(cov_g) / d_g))
                left = cov_a + pi * np.sqrt(lam) * np.eye(d_a)
                right = cov_g + np.sqrt(lam) / pi * np.eye(d_g)
            expected[k] = np.linalg.solve(np.kron(left, right), vector[k].ravel()).reshape(d_a, d_g)
        vectors.append(vector if groups > 1 else vector[0])
        expected_all.append(expected if groups > 1 else expected[0])
    got = block.multiply_inverse(tuple(tf.constant(v, tf.float32) for v in vectors)) if len(vectors) > 1 else [
        block.multiply_inverse(tf.constant(vectors[0], tf.float32))]
    for g, e in zip(got, expected_all):
        np.testing.assert_allclose(g.numpy(), e, rtol=2e-3, atol=1e-4 * np.abs(e).max())
    # multiply_fisher is full_fisher times the row-major concatenation.
    matrices = tuple(tf.constant(v, tf.float32) for v in vectors)
    products = block.multiply_fisher(matrices if len(vectors) > 1 else matrices[0])
    products = products if len(vectors) > 1 else [products]
    flat_v = np.concatenate([v.ravel() for v in vectors])
    flat_p = np.concatenate([p.numpy().ravel() for p in products])
    np.testing.assert_allclose(flat_p, block.full_fisher().numpy() @ flat_v, rtol=1e-4, atol=1e-6)


def test_parameter_layout_round_trip(case):
    kind = case["tkfac"].kind
    params = kind.parameters
    values = [tf.random.stateless_normal(p.shape, [1, i]) for i, p in enumerate(params)]
    for before, after in zip(values, kind.from_matrix(kind.to_matrix(values))):
        np.testing.assert_array_equal(after.numpy(), before.numpy())
    expected = _theta(case["layer"], [v.numpy() for v in values])
    got = kind.to_matrix(values)
    got = list(got) if isinstance(got, tuple) else [got]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(_as_groups(g.numpy()), e, rtol=1e-6)
    assert kind.num_parameters == sum(int(np.prod(p.shape)) for p in params)


# --- execution modes, save / resume ------------------------------------------------------
def _all_kinds_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        L.SeparableConv2D(4, 3, depth_multiplier=2, padding="same", activation="relu", name="sep"),
        L.DepthwiseConv2D(3, strides=2, padding="same", activation="tanh", name="dw"),
        L.Conv2D(4, 2, groups=2, activation="relu", name="grouped"),
        L.Reshape((4, 4)),
        L.Conv1D(3, 2, padding="causal", activation="relu", name="c1d"),
        L.Flatten(),
        L.Dense(3, name="logits"),
    ])


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RNG = np.random.RandomState(7)
X = RNG.rand(16, 6, 6, 2).astype(np.float32)
Y = RNG.randint(0, 3, size=16)
XLA_STEPS = 2  # batches of 8 per fit in the execution-mode test


def _compiled(opt_class=tkfac_tf.TKFAC, seed=0, **compile_kwargs):
    model = _all_kinds_model(seed)
    lc = tkfac_tf.LayerCollection.from_model(model, loss=LOSS)
    assert sorted(k.name for k in lc.layer_kinds) == [
        "conv1d", "conv2d", "dense", "depthwise_conv2d", "separable_conv2d"]
    opt = opt_class(learning_rate=0.05, damping=0.05, inv_update_every=2, seed=3,
                    layer_collection=lc, conv_damping="trace_scaled")
    model.compile(optimizer=opt, loss=LOSS, **compile_kwargs)
    return model, opt


def _fit(model, epochs=1):
    model.fit(X, Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)


def test_eager_graph_and_xla_give_the_same_weights():
    weights = []
    for kwargs in (dict(run_eagerly=True), {}, dict(jit_compile=True)):
        model, _ = _compiled(**kwargs)
        initial = [w.numpy() for w in model.trainable_weights]
        model.fit(X[: 8 * XLA_STEPS], Y[: 8 * XLA_STEPS], batch_size=8, shuffle=False, verbose=0)
        for before, w in zip(initial, model.trainable_weights):
            assert np.abs(w.numpy() - before).max() > 1e-4, w.path
        weights.append([w.numpy() for w in model.weights])
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opt_class,route", [(tkfac_tf.TKFAC, "keras_file"), (tkfac_tf.KFAC, "checkpoint")])
def test_save_and_resume_exactly(tmp_path, opt_class, route):
    """.keras + load_model + attach (TKFAC), tf.train.Checkpoint into a
    fresh model and optimizer (K-FAC): training continues exactly."""
    reference, ref_opt = _compiled(opt_class)
    _fit(reference, epochs=2)
    expected = [w.numpy() for w in reference.trainable_weights] + [v.numpy() for v in ref_opt.variables]

    model, opt = _compiled(opt_class)
    _fit(model)
    if route == "keras_file":
        path = str(tmp_path / "model.keras")
        model.save(path)
        resumed = keras.models.load_model(path)
        resumed.optimizer.attach(resumed)
        resumed_opt = resumed.optimizer
    else:
        ckpt = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))
        resumed, resumed_opt = _compiled(opt_class, seed=9)
        resumed_opt.build(resumed.trainable_variables)
        tf.train.Checkpoint(model=resumed, optimizer=resumed_opt).restore(ckpt).assert_consumed()
    _fit(resumed)
    for m, o in ((resumed, resumed_opt),):
        got = [w.numpy() for w in m.trainable_weights] + [v.numpy() for v in o.variables]
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_grouped_state_shapes_and_errors():
    model, opt = _compiled()
    opt.build(model.trainable_variables)
    blocks = opt.fisher_blocks
    assert blocks["dw"].left_factor.shape == (4, 10, 10)  # C = 4 channels, 3·3 + 1
    assert blocks["grouped"].right_inverse.shape == (2, 2, 2)
    np.testing.assert_array_equal(blocks["grouped"].left_inverse.numpy(), np.stack([np.eye(9)] * 2))
    assert [tuple(v.shape) for v in blocks["sep"].factor_variables] == [(2, 9, 9), (2, 2, 2), (5, 5), (4, 4)]
    lc = tkfac_tf.LayerCollection()
    with pytest.raises(TypeError, match="register_depthwise_conv2d"):
        lc.register_depthwise_conv2d(model.get_layer("grouped"))
    with pytest.raises(TypeError, match="not keras.layers.SeparableConv2D"):
        lc.register_separable_conv2d(model.get_layer("dw"))
    with pytest.raises(TypeError, match="not keras.layers.Conv1D"):
        lc.register_conv1d(model.get_layer("grouped"))
