"""channels_first (NCHW) convolutions in tests, on every CPU TensorFlow supports.

TensorFlow's CPU Conv2D kernels (forward and backward) accept the NCHW layout
only when oneDNN is on. Without oneDNN (CPUs without AVX-512 features, where
oneDNN is off by default, or ``TF_ENABLE_ONEDNN_OPTS=0``) a channels_first
``keras.layers.Conv2D`` cannot run at all on the CPU: "The Conv2D op currently
only supports the NHWC tensor format on the CPU". GPUs have NCHW kernels.

tkfac_tf itself runs no convolution (its statistics need the layer's input,
transposed to NHWC for the patches, and the pre-activation gradients), so
tests check its channels_first statistics on every platform by computing the
layer's convolution as the equivalent channels_last one
(:func:`compute_via_nhwc`); only what needs TensorFlow's own NCHW kernel is
skipped (:func:`require_nchw_conv2d`) where :func:`nchw_conv2d_supported` is
False.
"""

import functools

import keras
import pytest
import tensorflow as tf

from tkfac_tf import keras_compat

SKIP_REASON = (
    "needs TensorFlow's NCHW Conv2D kernel, which this platform lacks (CPU "
    "without oneDNN: 'The Conv2D op currently only supports the NHWC tensor "
    "format on the CPU'); the same channels_first statistics are checked "
    "through the NHWC path (the via_nhwc cases)"
)


@functools.lru_cache(maxsize=None)
def nchw_conv2d_supported():
    """Whether a tiny NCHW conv2d and its gradients run on the default device
    (where the tests' ops run: the CPU, or the GPU if there is one). Tried
    once per process."""
    x = tf.ones([1, 1, 3, 3])
    kernel = tf.ones([2, 2, 1, 1])
    try:
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            y = tf.nn.conv2d(x, kernel, strides=1, padding="VALID", data_format="NCHW")
        tape.gradient(y, [x, kernel])
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def require_nchw_conv2d():
    """Skips the calling test (or fixture) where there is no NCHW kernel."""
    if not nchw_conv2d_supported():
        pytest.skip(SKIP_REASON)


def nchw_conv2d_via_nhwc(x, kernel, strides, padding, dilation_rate):
    """The channels_first convolution of x [N, C, H, W] with ``kernel``
    [kh, kw, c_in, c_out], computed as the channels_last one of the
    transposed input and transposed back to [N, c_out, H', W']."""
    y = keras.ops.conv(
        keras.ops.transpose(x, (0, 2, 3, 1)), kernel, strides=list(strides),
        padding=padding, dilation_rate=dilation_rate, data_format="channels_last",
    )
    return keras.ops.transpose(y, (0, 3, 1, 2))


def compute_via_nhwc(conv):
    """Makes a built channels_first ``keras.layers.Conv2D`` compute its
    convolution through :func:`nchw_conv2d_via_nhwc`. The layer stays
    channels_first: its input, pre-activation and their gradients are NCHW
    tensors, so tkfac_tf sees exactly what TensorFlow's NCHW kernel would give
    it, on any CPU."""
    assert conv.data_format == "channels_first", conv.data_format

    def convolution_op(inputs, kernel):
        return nchw_conv2d_via_nhwc(inputs, kernel, conv.strides, conv.padding, conv.dilation_rate)

    keras_compat.set_untracked(conv, "convolution_op", convolution_op)
    return conv


def graph_op_types(graph):
    """{node name: (op type, data_format attr or None)} of a tf.Graph and of
    every function in its library (tf.cond / tf.while_loop bodies)."""
    graph_def = graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    out = {}
    for node in nodes:
        data_format = node.attr["data_format"].s.decode() if "data_format" in node.attr else None
        out[node.name] = (node.op, data_format)
    return out


def nchw_conv_ops(graph):
    """Names of the convolution ops (forward or backward) of ``graph`` that
    use the NCHW layout."""
    return sorted(
        name for name, (op, data_format) in graph_op_types(graph).items()
        if "Conv" in op and data_format == "NCHW"
    )
