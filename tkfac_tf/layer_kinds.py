"""How each supported layer kind maps onto the Kronecker-factor layout.

A layer kind turns the recorded uses of a layer into the activation matrix
``a`` [M, d_a] and pre-activation gradients [M, d_g] of its samples, and
converts the layer's parameter gradients to and from the matrix ∇Θ
[d_a, d_g] whose row-major flatten is the order of ``full_fisher()``.
"""

import math

import keras
import numpy as np
import tensorflow as tf


def _append_homogeneous_coordinate(a):
    """[..., M, d] -> [..., M, d + 1] with a trailing column of ones."""
    return tf.concat([a, tf.ones_like(a[..., :1])], axis=-1)


class KroneckerLayerKind:
    """Shared layout of a layer with kernel W and optional bias b:
    Θ = [reshape(W, [d_a − has_bias, d_g]); b], d_a = input_size,
    d_g = output_size. Subclasses define ``name``, ``register_method`` and
    the samples (``activations`` / ``preactivation_gradients``)."""

    name = None
    register_method = None
    is_convolution = False

    def __init__(self, layer, input_size, output_size):
        self.layer = layer
        self.has_bias = layer.bias is not None
        self.kernel_shape = tuple(int(d) for d in layer.kernel.shape)
        self.input_size = input_size + int(self.has_bias)
        self.output_size = output_size

    @property
    def parameters(self):
        """The layer's variables in Θ order: [kernel] or [kernel, bias]."""
        return [self.layer.kernel] + ([self.layer.bias] if self.has_bias else [])

    @property
    def num_parameters(self):
        return self.input_size * self.output_size

    def get_config(self):
        """JSON-able description used to re-register and to size the block."""
        return {
            "layer": self.block_name,
            "register": self.register_method,
            "input_size": self.input_size,
            "output_size": self.output_size,
            "is_convolution": self.is_convolution,
        }

    def num_examples(self, use):
        return tf.shape(use.inputs)[0]

    def to_matrix(self, grads):
        """[grad W, (grad b [d_g])] -> ∇Θ [d_a, d_g]."""
        rows = self.input_size - int(self.has_bias)
        kernel = tf.reshape(tf.cast(grads[0], tf.float32), [rows, self.output_size])
        if self.has_bias:
            return tf.concat([kernel, tf.cast(grads[1], tf.float32)[None, :]], axis=0)
        return kernel

    def from_matrix(self, matrix):
        """∇Θ [d_a, d_g] -> list shaped like ``parameters``."""
        if not self.has_bias:
            return [tf.reshape(matrix, self.kernel_shape)]
        kernel, bias = tf.split(matrix, [self.input_size - 1, 1])
        return [tf.reshape(kernel, self.kernel_shape), tf.squeeze(bias, 0)]


class DenseKind(KroneckerLayerKind):
    """keras.layers.Dense with Keras layout: s = x W + b, W [d_in, d_out].

    With a bias, a = [x, 1] and Θ = [W; b] of shape [d_in + 1, d_out]. Inputs
    of rank > 2 ([N, ..., d_in]) give one sample per leading position.
    """

    name = "dense"
    register_method = "register_dense"

    def __init__(self, layer):
        d_in, d_out = layer.kernel.shape
        super().__init__(layer, int(d_in), int(d_out))

    def activations(self, use):
        """a [M, d_a] (float32) of one recorded use."""
        x = tf.reshape(tf.cast(use.inputs, tf.float32), [-1, self.kernel_shape[0]])
        return _append_homogeneous_coordinate(x) if self.has_bias else x

    def preactivation_gradients(self, use, grad):
        """g [M, d_g] from d(loss)/d(pre-activation) of the same use."""
        del use
        return tf.reshape(tf.cast(grad, tf.float32), [-1, self.output_size])


class Conv2DKind(KroneckerLayerKind):
    """keras.layers.Conv2D (groups = 1) in the KFC layout (Grosse & Martens 2016).

    Kernel K [kh, kw, c_in, c_out]. Each (example, output location t) is one
    sample: a_{i,t} is the input patch the kernel sees at t (im2col, zeros
    where 'same' padding reaches outside the image), plus the homogeneous 1
    with a bias; g_{i,t} [c_out] is the pre-activation gradient at t.

    Order of the patch vector (and of the rows of ∇Θ): row-major over
    (kernel row i_h, kernel column i_w, input channel c), i.e. index
    (i_h·kw + i_w)·c_in + c, for either data_format, which is exactly
    ``reshape(K, [kh·kw·c_in, c_out])``; the bias is the last row. So
    Θ = [reshape(K, [kh·kw·c_in, c_out]); b], d_a = kh·kw·c_in (+1),
    d_g = c_out, and s_{i,t} = a_{i,t}ᵀ Θ.
    """

    name = "conv2d"
    register_method = "register_conv2d"
    is_convolution = True

    def __init__(self, layer):
        kh, kw, c_in, c_out = (int(d) for d in layer.kernel.shape)
        self.patch_size = kh * kw * c_in
        super().__init__(layer, self.patch_size, c_out)
        self.channels_first = layer.data_format == "channels_first"

    def patches(self, inputs):
        """im2col: inputs [N, H, W, c_in] (or [N, c_in, H, W]; extra leading
        batch axes are flattened into N) -> float32
        [N, H', W', kh·kw·c_in], with the layer's kernel size, strides,
        padding and dilation; H', W' are the layer's output sizes.

        channels_first inputs are transposed to NHWC first: no NCHW kernel
        is needed, so this runs on every CPU (TensorFlow's CPU Conv2D has
        NCHW kernels only with oneDNN)."""
        return convolution_patches(inputs, self.layer, 2, self.kernel_shape[:2])

    def activations(self, use):
        """a [M, d_a] (float32), M = N·H'·W', rows in (n, h', w') order."""
        a = tf.reshape(self.patches(use.inputs), [-1, self.patch_size])
        return _append_homogeneous_coordinate(a) if self.has_bias else a

    def preactivation_gradients(self, use, grad):
        """g [M, c_out] from d(loss)/d(pre-activation) [N, H', W', c_out]
        (or [N, c_out, H', W']), rows in the same (n, h', w') order as a."""
        del use
        g = tf.cast(grad, tf.float32)
        if self.channels_first:
            g = tf.reshape(g, [-1, self.output_size, tf.reduce_prod(tf.shape(g)[-2:])])
            g = tf.transpose(g, [0, 2, 1])
        return tf.reshape(g, [-1, self.output_size])

    def mean_activations(self, use):
        """â [N, d_a] (float32): a averaged over each example's output
        positions (``convolution_mean_patches``; the homogeneous 1 stays 1)."""
        a = convolution_mean_patches(use.inputs, self.layer, 2, self.kernel_shape[:2])
        return _append_homogeneous_coordinate(a) if self.has_bias else a

    def summed_preactivation_gradients(self, use, grad):
        """ĝ [N, c_out]: g summed over each example's output positions."""
        del use
        return _summed_output_gradients(grad, self.output_size, self.channels_first, 2)


# --- the convolution family: Conv1D, grouped Conv2D, DepthwiseConv2D,
# SeparableConv2D -----------------------------------------------------------------
def _channels_last(x, rank, channels_first):
    """float32 [N, *spatial, C] from a layer input [..., *spatial, C] (or
    [..., C, *spatial]); extra leading batch axes are flattened into N (a
    static reshape where the trailing sizes are known)."""
    x = tf.cast(x, tf.float32)
    trailing = x.shape[-(rank + 1):]
    if trailing.is_fully_defined():
        x = tf.reshape(x, [-1, *trailing.as_list()])
    else:
        x = tf.reshape(x, tf.concat([[-1], tf.shape(x)[-(rank + 1):]], axis=0))
    if channels_first:
        x = tf.transpose(x, [0, *range(2, rank + 2), 1])
    return x


def convolution_patches(inputs, layer, rank, kernel_size):
    """im2col of a rank-1 or rank-2 convolution ``layer`` (its strides,
    dilation rate, padding 'valid' / 'same' / 'causal' and data format):
    float32 [N, H', W', window·C] (rank 1: H' = 1), patch index
    (kernel position)·C + c, kernel positions row-major. No convolution op
    is used (channels_first inputs are transposed), so it runs on every CPU.
    A 1×1 kernel at stride 1 reads each position alone: its patches are
    the (channels-last) inputs."""
    channels_first = layer.data_format == "channels_first"
    x = _channels_last(inputs, rank, channels_first)
    padding = layer.padding
    kernel_size = list(kernel_size)
    strides, rates = list(layer.strides), list(layer.dilation_rate)
    if all(k == 1 for k in kernel_size) and all(s == 1 for s in strides):
        return x[:, None] if rank == 1 else x
    if padding == "causal":  # Conv1D: left padding (k − 1)·d, then 'valid'
        left = rates[0] * (kernel_size[0] - 1)
        x = tf.pad(x, [[0, 0], [left, 0], [0, 0]])
        padding = "valid"
    if rank == 1:
        x = x[:, None]
        kernel_size, strides, rates = [1] + kernel_size, [1] + strides, [1] + rates
    return tf.image.extract_patches(
        x,
        sizes=[1, *kernel_size, 1],
        strides=[1, *strides, 1],
        rates=[1, *rates, 1],
        padding=padding.upper(),
    )


def convolution_mean_patches(inputs, layer, rank, kernel_size):
    """The mean over output positions of ``convolution_patches``: float32
    [N, window·C] (same patch index), â_n = (1/P) Σ_t patch_{n,t}, without
    forming the patches. Along each spatial axis the positions a kernel
    offset j reads are i = t·s + j·r − (padding before) for the P_axis output
    positions t, so the sum over positions is x contracted with a 0/1
    selection matrix S [size, k] per axis (S[i, j] = 1 iff some t reads x_i
    at offset j; padding reads zeros and adds nothing): cost ∝ N·H·W·C·k
    instead of N·P·window·C, one matrix product per axis with S broadcast
    over the other axes (x viewed as [rows, size, columns]: no transpose; 3–5×
    faster on CPU than the same contraction as an einsum). Inputs with
    unknown spatial sizes fall back to the mean of ``convolution_patches``."""
    channels_first = layer.data_format == "channels_first"
    x = _channels_last(inputs, rank, channels_first)
    spatial = x.shape[1:-1]
    if not spatial.is_fully_defined():
        patches = convolution_patches(inputs, layer, rank, kernel_size)
        count = tf.shape(patches)[1] * tf.shape(patches)[2]
        patches = tf.reshape(patches, [tf.shape(patches)[0], count, -1])
        return tf.reduce_mean(patches, axis=1)
    x = tf.cast(x, tf.float32)
    padding, positions = layer.padding, 1
    for axis, (size, k, stride, rate) in enumerate(
        zip(spatial.as_list(), kernel_size, layer.strides, layer.dilation_rate)
    ):
        selection_t, outputs = _position_selection(int(size), int(k), int(stride), int(rate), padding)
        positions *= outputs
        # Contract spatial axis ``axis + 1`` with S: [.., size, ..] -> [.., k, ..].
        shape = x.shape.as_list()
        columns = math.prod(shape[axis + 2 :])
        contracted = tf.matmul(selection_t, tf.reshape(x, [-1, int(size), columns]))
        x = tf.reshape(contracted, [-1, *shape[1 : axis + 1], int(k), *shape[axis + 2 :]])
    return tf.reshape(x, [-1, x.shape[1:].num_elements()]) / float(positions)


def _position_selection(size, k, stride, rate, padding):
    """(Sᵀ [1, k, size] float32, P_axis): S[i, j] = 1 iff an output position t
    reads input i at kernel offset j (i = t·stride + j·rate − before), for
    Keras' 'valid', 'same' (TensorFlow's split: the smaller half before)
    and 'causal' (all (k − 1)·rate before) padding."""
    span = (k - 1) * rate + 1
    if padding == "valid":
        outputs, before = (size - span) // stride + 1, 0
    elif padding == "same":
        outputs = -(-size // stride)
        before = max((outputs - 1) * stride + span - size, 0) // 2
    else:  # causal
        outputs, before = (size - 1) // stride + 1, span - 1
    selection = np.zeros([size, k], np.float32)
    for t in range(outputs):
        for j in range(k):
            i = t * stride + j * rate - before
            if 0 <= i < size:
                selection[i, j] = 1.0
    return tf.constant(selection.T[None]), outputs


def _summed_output_gradients(grad, channels, channels_first, spatial_rank):
    """Σ over output positions of d/ds [..., *spatial, C] (or [..., C,
    *spatial]; ``spatial_rank`` spatial axes, extra leading batch axes
    flattened into N): float32 [N, C]."""
    g = tf.cast(grad, tf.float32)
    rank = g.shape.rank
    last = rank if channels_first else rank - 1
    return tf.reshape(tf.reduce_sum(g, axis=list(range(last - spatial_rank, last))), [-1, channels])


def _samples_by_group(samples, groups, window, per_group):
    """[M, window·groups·per_group] (channel index g·per_group + c) ->
    [groups, M, window·per_group]."""
    x = tf.reshape(samples, [-1, window, groups, per_group])
    x = tf.transpose(x, [2, 0, 1, 3])
    return tf.reshape(x, [groups, -1, window * per_group])


def _output_gradients(grad, channels, channels_first):
    """d/ds [N, *spatial, C] (or [N, C, *spatial]) -> float32 [M, C], rows in
    (n, spatial positions) order, as the patches."""
    g = tf.cast(grad, tf.float32)
    if channels_first:
        g = tf.reshape(g, [-1, channels, tf.reduce_prod(tf.shape(g)[2:])])
        g = tf.transpose(g, [0, 2, 1])
    return tf.reshape(g, [-1, channels])


class ConvolutionKind(KroneckerLayerKind):
    """Conv1D / Conv2D with any ``groups``, and DepthwiseConv2D: G groups,
    each a KFC block of its own (group g's output channels see only its
    input channels, so the Fisher of the layer's kernel is block-diagonal
    over groups in exact form, and one Kronecker block per group is the
    exact-form K-FAC / TKFAC of the layer).

    Per group g and (example, output location) sample:
    a_g = [patch of group g's input channels, 1] (d_a = window·c_in/G + 1,
    row order (kernel position, input channel of the group)), and g_g the
    pre-activation gradient of group g's output channels (d_g = c_out / G).
    Θ_g = [rows of the kernel's group-g slice; bias of group g]. With G = 1
    this is the plain KFC layout (a [M, d_a], g [M, d_g], ∇Θ [d_a, d_g]);
    with G > 1 samples are [G, M, d] and ∇Θ is [G, d_a, d_g] (row-major
    flatten of that for ``full_fisher``).

    Kernel layouts: Conv [*k, c_in/G, c_out] (output channel g·(c_out/G) + j
    is group g's j-th); DepthwiseConv2D [*k, C, m] (G = C groups of one input
    channel and m = depth_multiplier outputs, output channel c·m + j). Both
    reshape to [window·c_in/G, G, c_out/G], which is how Θ_g is read.
    """

    is_convolution = True
    rank = None

    def __init__(self, layer):
        kernel_shape = [int(d) for d in layer.kernel.shape]
        window_dims = kernel_shape[: self.rank]
        self.kernel_size = tuple(window_dims)
        self.window = 1
        for d in window_dims:
            self.window *= d
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            channels, multiplier = kernel_shape[-2:]
            self.groups, self.in_per_group, self.out_per_group = channels, 1, multiplier
        else:
            self.groups = int(layer.groups)
            self.in_per_group = kernel_shape[-2]
            self.out_per_group = kernel_shape[-1] // self.groups
        self.in_channels = self.in_per_group * self.groups
        self.out_channels = self.out_per_group * self.groups
        self.rows = self.window * self.in_per_group
        self.patch_size = self.window * self.in_channels
        super().__init__(layer, self.rows, self.out_per_group)
        self.channels_first = layer.data_format == "channels_first"

    @property
    def depthwise(self) -> bool:
        """Whether every group reads one input channel (DepthwiseConv2D, or
        groups = input channels)."""
        return self.groups > 1 and self.in_per_group == 1

    @property
    def num_parameters(self):
        return self.groups * self.input_size * self.output_size

    def get_config(self):
        config = super().get_config()
        if self.groups > 1:
            config["groups"] = self.groups
        return config

    def patches(self, inputs):
        """im2col [N, H', W', window·c_in] (rank 1: H' = 1); see
        ``convolution_patches``."""
        return convolution_patches(inputs, self.layer, self.rank, self.kernel_size)

    def activations(self, use):
        """a [M, d_a] (G = 1) or [G, M, d_a], M = N·(output locations)."""
        return self._activation_samples(tf.reshape(self.patches(use.inputs), [-1, self.patch_size]))

    def preactivation_gradients(self, use, grad):
        """g [M, d_g] (G = 1) or [G, M, d_g], rows in the order of a."""
        del use
        return self._gradient_samples(_output_gradients(grad, self.out_channels, self.channels_first))

    def mean_activations(self, use):
        """â [N, d_a] (G = 1) or [G, N, d_a]: a averaged over each example's
        output positions (``convolution_mean_patches``)."""
        return self._activation_samples(
            convolution_mean_patches(use.inputs, self.layer, self.rank, self.kernel_size)
        )

    def summed_preactivation_gradients(self, use, grad):
        """ĝ [N, d_g] (G = 1) or [G, N, d_g]: g summed over each example's
        output positions."""
        del use
        return self._gradient_samples(
            _summed_output_gradients(grad, self.out_channels, self.channels_first, self.rank)
        )

    def _activation_samples(self, patches):
        """[M, window·c_in] patches -> a (grouped, with the homogeneous 1)."""
        a = patches
        if self.groups > 1:
            a = _samples_by_group(a, self.groups, self.window, self.in_per_group)
        return _append_homogeneous_coordinate(a) if self.has_bias else a

    def _gradient_samples(self, g):
        """[M, c_out] -> g (grouped)."""
        return _samples_by_group(g, self.groups, 1, self.out_per_group) if self.groups > 1 else g

    def to_matrix(self, grads):
        """[grad K, (grad b)] -> ∇Θ [d_a, d_g] (G = 1) or [G, d_a, d_g]."""
        if self.groups == 1:
            return super().to_matrix(grads)
        kernel = tf.reshape(
            tf.cast(grads[0], tf.float32), [self.rows, self.groups, self.out_per_group]
        )
        kernel = tf.transpose(kernel, [1, 0, 2])
        if self.has_bias:
            bias = tf.reshape(tf.cast(grads[1], tf.float32), [self.groups, 1, self.out_per_group])
            return tf.concat([kernel, bias], axis=1)
        return kernel

    def from_matrix(self, matrix):
        """∇Θ -> list shaped like ``parameters``."""
        if self.groups == 1:
            return super().from_matrix(matrix)
        if not self.has_bias:
            return [tf.reshape(tf.transpose(matrix, [1, 0, 2]), self.kernel_shape)]
        kernel, bias = tf.split(matrix, [self.rows, 1], axis=1)
        return [tf.reshape(tf.transpose(kernel, [1, 0, 2]), self.kernel_shape), tf.reshape(bias, [-1])]


class Conv1DKind(ConvolutionKind):
    """keras.layers.Conv1D (any groups; padding 'valid', 'same', 'causal'):
    kernel [k, c_in/G, c_out], one sample per (example, output step)."""

    name = "conv1d"
    register_method = "register_conv1d"
    rank = 1


class GroupedConv2DKind(ConvolutionKind):
    """keras.layers.Conv2D with groups > 1 (registered by register_conv2d;
    groups = 1 uses ``Conv2DKind``)."""

    name = "conv2d"
    register_method = "register_conv2d"
    rank = 2


class DepthwiseConv2DKind(ConvolutionKind):
    """keras.layers.DepthwiseConv2D: kernel [kh, kw, C, m]; G = C groups,
    a_c = [patch of channel c (kh·kw values), 1], g_c = the m pre-activation
    gradients of channel c's outputs (output channels c·m … c·m + m − 1)."""

    name = "depthwise_conv2d"
    register_method = "register_depthwise_conv2d"
    rank = 2


class _SeparablePart:
    """One Kronecker factorisation of a SeparableConv2D (see
    ``SeparableConv2DKind``): its samples and sizes."""

    def __init__(self, kind, which):
        self.kind = kind
        self.which = which
        self.layer = kind.layer
        if which == "depthwise":
            self.groups = kind.in_channels
            self.input_size, self.output_size = kind.window, kind.multiplier
            self.has_bias = False
        else:
            self.groups = 1
            self.input_size = kind.in_channels * kind.multiplier + int(kind.has_bias)
            self.output_size = kind.filters
            self.has_bias = kind.has_bias

    @property
    def depthwise(self) -> bool:
        return self.which == "depthwise"

    @property
    def parameters(self):
        """This part's variables: [depthwise_kernel], or [pointwise_kernel]
        and the bias."""
        if self.depthwise:
            return [self.layer.depthwise_kernel]
        return [self.layer.pointwise_kernel] + ([self.layer.bias] if self.has_bias else [])

    def num_examples(self, use):
        return self.kind.num_examples(use)

    def activations(self, use):
        return self.kind.part_activations(self.which, use)

    def preactivation_gradients(self, use, grad):
        return self.kind.part_gradients(self.which, grad)

    def mean_activations(self, use):
        return self.kind.part_activations(self.which, use, mean=True)

    def summed_preactivation_gradients(self, use, grad):
        return self.kind.part_gradients(self.which, grad, summed=True)

    def get_config(self):
        return {"input_size": self.input_size, "output_size": self.output_size,
                "groups": self.groups}


class SeparableConv2DKind:
    """keras.layers.SeparableConv2D: s = pointwise(depthwise(x)) + b, one
    activation after both. Two Kronecker blocks on the same layer (the
    Fisher's cross terms between the two kernels are dropped, as between
    layers):

    * depthwise part, kernel D [kh, kw, C, m], no bias: C groups as for
      DepthwiseConv2D; a_c = the patch of channel c, g_c = ∂ℓ/∂u of the
      depthwise output u at channel c's m outputs;
    * pointwise part, kernel P [1, 1, C·m, F], bias b [F]: a = [u, 1] at
      each output location, g = ∂ℓ/∂s.

    The layer's call never exposes u, but u and its gradient follow exactly
    from what the tap records: u_t = Σ_k patch_{t,k,c} D[k, c, :] (computed
    from the recorded input and D), and since s_t = u_t P + b,
    ∂ℓ/∂u_t = P ∂ℓ/∂s_t (P the current pointwise kernel, unchanged between
    the forward pass and the statistics). So both blocks see their exact
    samples; nothing about the capture is approximate.

    ∇Θ is a pair: (depthwise [C, kh·kw, m], pointwise [C·m (+1), F]);
    ``full_fisher`` is block-diagonal in that order (each row-major).
    """

    name = "separable_conv2d"
    register_method = "register_separable_conv2d"
    is_convolution = True
    rank = 2

    def __init__(self, layer):
        self.layer = layer
        self.has_bias = layer.bias is not None
        kh, kw, channels, multiplier = (int(d) for d in layer.depthwise_kernel.shape)
        self.kernel_size = (kh, kw)
        self.window = kh * kw
        self.in_channels, self.multiplier = channels, multiplier
        self.filters = int(layer.pointwise_kernel.shape[-1])
        self.channels_first = layer.data_format == "channels_first"
        self.depthwise_shape = (kh, kw, channels, multiplier)
        self.pointwise_shape = tuple(int(d) for d in layer.pointwise_kernel.shape)
        self.parts = [_SeparablePart(self, "depthwise"), _SeparablePart(self, "pointwise")]

    @property
    def parameters(self):
        return [self.layer.depthwise_kernel, self.layer.pointwise_kernel] + (
            [self.layer.bias] if self.has_bias else []
        )

    @property
    def num_parameters(self):
        return sum(p.groups * p.input_size * p.output_size for p in self.parts)

    def get_config(self):
        pointwise = self.parts[1]
        return {
            "layer": self.block_name,
            "register": self.register_method,
            "input_size": pointwise.input_size,
            "output_size": pointwise.output_size,
            "is_convolution": True,
            "parts": [p.get_config() for p in self.parts],
        }

    def num_examples(self, use):
        return tf.shape(use.inputs)[0]

    def _patches(self, use):
        """[M, kh·kw, C]."""
        patches = convolution_patches(use.inputs, self.layer, 2, self.kernel_size)
        return tf.reshape(patches, [-1, self.window, self.in_channels])

    def _pointwise_matrix(self):
        """P as [C·m, F]."""
        return tf.reshape(
            tf.cast(self.layer.pointwise_kernel, tf.float32),
            [self.in_channels * self.multiplier, self.filters],
        )

    def _mean_patches(self, use):
        """[N, kh·kw, C]: the patches averaged over each example's positions."""
        patches = convolution_mean_patches(use.inputs, self.layer, 2, self.kernel_size)
        return tf.reshape(patches, [-1, self.window, self.in_channels])

    def part_activations(self, which, use, mean=False):
        """A part's samples, one per (example, position) row, or with
        ``mean`` one row per example averaged over its positions (u is
        linear in the patches, so the mean patch gives the mean u)."""
        patches = self._mean_patches(use) if mean else self._patches(use)
        if which == "depthwise":
            return tf.transpose(patches, [2, 0, 1])  # [C, M, kh·kw]
        depthwise = tf.reshape(
            tf.cast(self.layer.depthwise_kernel, tf.float32),
            [self.window, self.in_channels, self.multiplier],
        )
        u = tf.einsum("mkc,kcj->mcj", patches, depthwise)
        u = tf.reshape(u, [-1, self.in_channels * self.multiplier])
        return _append_homogeneous_coordinate(u) if self.has_bias else u

    def part_gradients(self, which, grad, summed=False):
        """A part's gradient samples in the rows of ``part_activations``
        (``summed``: summed over each example's positions; ∂ℓ/∂u is linear
        in ∂ℓ/∂s)."""
        if summed:
            g = _summed_output_gradients(grad, self.filters, self.channels_first, 2)  # [N, F]
        else:
            g = _output_gradients(grad, self.filters, self.channels_first)  # [M, F]
        if which == "pointwise":
            return g
        g_u = tf.matmul(g, self._pointwise_matrix(), transpose_b=True)  # [M, C·m]
        g_u = tf.reshape(g_u, [-1, self.in_channels, self.multiplier])
        return tf.transpose(g_u, [1, 0, 2])  # [C, M, m]

    def to_matrix(self, grads):
        """[grad D, grad P, (grad b)] -> (∇Θ_depthwise [C, kh·kw, m],
        ∇Θ_pointwise [C·m (+1), F])."""
        depthwise = tf.reshape(
            tf.cast(grads[0], tf.float32), [self.window, self.in_channels, self.multiplier]
        )
        depthwise = tf.transpose(depthwise, [1, 0, 2])
        pointwise = tf.reshape(
            tf.cast(grads[1], tf.float32), [self.in_channels * self.multiplier, self.filters]
        )
        if self.has_bias:
            pointwise = tf.concat([pointwise, tf.cast(grads[2], tf.float32)[None, :]], axis=0)
        return depthwise, pointwise

    def from_matrix(self, matrices):
        depthwise, pointwise = matrices
        out = [
            tf.reshape(tf.transpose(depthwise, [1, 0, 2]), self.depthwise_shape),
            tf.reshape(pointwise[: self.in_channels * self.multiplier], self.pointwise_shape),
        ]
        if self.has_bias:
            out.append(pointwise[-1])
        return out


# --- layer kinds beyond Dense / Conv2D -----------------------------------------
#
# Every kind names its ``structure`` (which block family holds its curvature,
# see fisher_blocks.block_class), its ``tap`` (how capture records a use:
# 'activation' swaps the layer's activation, 'output' records the call's
# output as the "pre-activation", 'variables' feeds the call read tensors of
# the layer's variables) and ``block_name`` (the key of its block: the
# layer's path, e.g. 'multi_head_attention/query', so that the sublayers of
# several attention layers, all named 'query', get distinct blocks; Dense and
# convolutions: the layer's name, or its path once the collection sets
# ``keyed_by_path`` because another registered layer has the same name).
for _kind in (KroneckerLayerKind, SeparableConv2DKind):
    _kind.structure = "kronecker"
    _kind.tap = "activation"
    _kind.keyed_by_path = False
    _kind.block_name = property(
        lambda self: layer_path(self.layer) if self.keyed_by_path else self.layer.name)


def layer_path(layer):
    """The layer's Keras path (unique inside a model, stable under save /
    load), or its name when it has none."""
    return getattr(layer, "path", None) or layer.name


def _split_einsum(equation):
    if "->" not in equation or equation.count(",") != 1:
        raise ValueError(f"Unsupported EinsumDense equation {equation!r}.")
    operands, output = equation.split("->")
    inputs, kernel = operands.split(",")
    return inputs.strip(), kernel.strip(), output.strip()


class EinsumDenseKind(KroneckerLayerKind):
    """keras.layers.EinsumDense (and so MultiHeadAttention's query / key /
    value / output projections): s = einsum(eq, x, W) + b.

    The equation's letters fall into three groups: contracted (in x and W,
    not in s), kernel-output (in W and s) and positions (in x and s, not in
    W; '...' counts as positions). A sample is one position:
    a = x at that position flattened over the contracted letters (in the
    kernel's order), plus the homogeneous 1 with a bias; g = ∂L/∂s there,
    flattened over the kernel-output letters (in the output's order). So
    Θ = [reshape(transpose(W, contracted + kernel-output), [d_in, d_out]); b]
    and s = aᵀ Θ at every position, exactly the layout of Dense on rank-3
    inputs. Refused (UnsupportedLayerError): a letter in x, W and s at once
    (a per-position kernel, not a Kronecker product), a letter summed out of
    x or W alone, a bias over a strict subset of the kernel-output letters.
    """

    name = "einsum_dense"
    register_method = "register_einsum_dense"

    def __init__(self, layer):
        from tkfac_tf.errors import UnsupportedLayerError

        self.layer = layer
        x_spec, w_spec, out_spec = _split_einsum(layer.equation.replace(" ", ""))
        if "." in w_spec:
            raise UnsupportedLayerError(
                f"Layer '{layer.name}': EinsumDense equation {layer.equation!r} "
                "has '...' in the kernel; tkfac_tf supports it in the input only."
            )
        x_letters = x_spec.replace("...", "")
        out_letters = out_spec.replace("...", "")
        bad = [c for c in w_spec if c in x_letters and c in out_letters]
        bad += [c for c in x_letters if c not in w_spec and c not in out_letters]
        bad += [c for c in w_spec if c not in x_letters and c not in out_letters]
        if bad or len(set(w_spec)) != len(w_spec):
            raise UnsupportedLayerError(
                f"Layer '{layer.name}': EinsumDense equation {layer.equation!r} "
                f"is not a Kronecker-factored map (letters {sorted(set(bad))} are "
                "shared by input, kernel and output, or summed out of one "
                "operand); it is left to a generic diagonal block."
            )
        self.x_spec, self.w_spec, self.out_spec = x_spec, w_spec, out_spec
        self.contracted = [c for c in w_spec if c in x_letters]
        self.kernel_out = [c for c in out_letters if c in w_spec]
        w_shape = [int(d) for d in layer.kernel.shape]
        size = dict(zip(w_spec, w_shape))
        d_in = math.prod(size[c] for c in self.contracted)
        d_out = math.prod(size[c] for c in self.kernel_out)
        self.kernel_perm = [w_spec.index(c) for c in self.contracted + self.kernel_out]
        self.permuted_kernel_shape = [w_shape[i] for i in self.kernel_perm]
        self.kernel_inverse_perm = [self.kernel_perm.index(i) for i in range(len(w_spec))]
        self.bias_shape = None
        if layer.bias is not None:
            bias_axes = layer.bias_axes or ""
            if sorted(bias_axes) != sorted(self.kernel_out):
                raise UnsupportedLayerError(
                    f"Layer '{layer.name}': EinsumDense bias_axes={bias_axes!r} do "
                    f"not cover exactly the kernel's output letters "
                    f"{''.join(self.kernel_out)!r}; it is left to a generic "
                    "diagonal block."
                )
            self.bias_shape = tuple(int(d) for d in layer.bias.shape)
        super().__init__(layer, d_in, d_out)

    @property
    def block_name(self):
        return layer_path(self.layer)

    def get_config(self):
        config = super().get_config()
        config["layer"] = self.block_name
        return config

    def _expand(self, spec, rank):
        """spec with '...' replaced by fresh upper-case letters for ``rank``."""
        if "..." not in spec:
            return spec
        explicit = len(spec) - 3
        fill = "".join("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: rank - explicit])
        return spec.replace("...", fill)

    def activations(self, use):
        x = tf.cast(use.inputs, tf.float32)
        spec = self._expand(self.x_spec, x.shape.rank)
        positions = [c for c in spec if c not in self.contracted]
        perm = [spec.index(c) for c in positions + self.contracted]
        a = tf.reshape(tf.transpose(x, perm), [-1, self.input_size - int(self.has_bias)])
        return _append_homogeneous_coordinate(a) if self.has_bias else a

    def preactivation_gradients(self, use, grad):
        del use
        g = tf.cast(grad, tf.float32)
        spec = self._expand(self.out_spec, g.shape.rank)
        positions = [c for c in spec if c not in self.kernel_out]
        perm = [spec.index(c) for c in positions + self.kernel_out]
        return tf.reshape(tf.transpose(g, perm), [-1, self.output_size])

    def to_matrix(self, grads):
        rows = self.input_size - int(self.has_bias)
        kernel = tf.transpose(tf.cast(grads[0], tf.float32), self.kernel_perm)
        kernel = tf.reshape(kernel, [rows, self.output_size])
        if self.has_bias:
            # The bias is laid out in output order (size-1 axes for positions).
            bias = tf.reshape(tf.cast(grads[1], tf.float32), [1, self.output_size])
            return tf.concat([kernel, bias], axis=0)
        return kernel

    def from_matrix(self, matrix):
        if self.has_bias:
            matrix, bias = tf.split(matrix, [self.input_size - 1, 1])
        kernel = tf.transpose(tf.reshape(matrix, self.permuted_kernel_shape), self.kernel_inverse_perm)
        return [kernel, tf.reshape(bias, self.bias_shape)] if self.has_bias else [kernel]


class _LayerBlockKind:
    """Shared parts of the kinds outside the Kronecker layout (Embedding,
    scale-and-shift, generic variables): keyed by layer path, sized
    input_size × output_size, one example per row of the input."""

    is_convolution = False

    @property
    def block_name(self):
        return layer_path(self.layer)

    @property
    def num_parameters(self):
        return self.input_size * self.output_size

    def get_config(self):
        return {
            "layer": self.block_name,
            "register": self.register_method,
            "structure": self.structure,
            "input_size": self.input_size,
            "output_size": self.output_size,
            "is_convolution": False,
        }

    def num_examples(self, use):
        return tf.shape(use.inputs)[0]


class EmbeddingKind(_LayerBlockKind):
    """keras.layers.Embedding: out = W[token], W [vocab, dim].

    Each (example, position) is one sample with a = one-hot(token) [vocab]
    and g = ∂L/∂out there [dim]; ∇Θ = ∇W [vocab, dim] (row-major). The
    input factor E[a aᵀ] of one-hot inputs is diagonal (token counts), so the
    block stores it as a vector (``fisher_blocks.EmbeddingTKFACBlock`` /
    ``EmbeddingKFACBlock``). The use is tapped at the layer's output (the
    lookup result is the "pre-activation")."""

    name = "embedding"
    register_method = "register_embedding"
    structure = "embedding"
    tap = "output"

    def __init__(self, layer):
        self.layer = layer
        vocab, dim = (int(d) for d in layer.embeddings.shape)
        self.input_size, self.output_size = vocab, dim
        self.kernel_shape = (vocab, dim)

    @property
    def parameters(self):
        return [self.layer.embeddings]

    def tokens(self, use):
        """Token ids [M] (int32) of one recorded use."""
        return tf.reshape(tf.cast(use.inputs, tf.int32), [-1])

    def preactivation_gradients(self, use, grad):
        del use
        return tf.reshape(tf.cast(grad, tf.float32), [-1, self.output_size])

    def to_matrix(self, grads):
        return tf.reshape(tf.cast(tf.convert_to_tensor(grads[0]), tf.float32), self.kernel_shape)

    def from_matrix(self, matrix):
        return [matrix]


class ScaleAndShiftKind(_LayerBlockKind):
    """keras.layers.LayerNormalization / BatchNormalization: y = γ ⊙ x̂ + β
    per feature c, with x̂ the normalised input (LayerNorm: over the layer's
    axes, per position; BatchNorm in training: with the batch's moments).

    Per-example gradients are exact and cheap: with g = ∂ℓ_i/∂y,
    ∂ℓ_i/∂γ_c = Σ_t g_{i,t,c} x̂_{i,t,c} and ∂ℓ_i/∂β_c = Σ_t g_{i,t,c}
    (t: the example's other positions), so the block
    (``fisher_blocks.ScaleAndShiftBlock``) keeps the exact per-feature
    E_i[v_{i,c} v_{i,c}ᵀ], v = (∂γ_c, ∂β_c) (2×2, or 1×1 without γ or β), as
    kfac-jax's ScaleAndShift blocks. ∇Θ is [d, p], columns (γ, β). The use is
    tapped at the layer's output; the moments behind x̂ are taken from the
    recorded input as the layer takes them (in a graph the same ops as its
    forward pass's, which Grappler merges; only on covariance-update steps).
    Approximate for BatchNorm: the batch moments are treated as constants
    (an example's loss also depends on the others' through them), and a
    mask is ignored.
    """

    name = "scale_and_shift"
    structure = "scale_and_shift"
    tap = "output"

    def __init__(self, layer):
        from tkfac_tf.errors import UnsupportedLayerError

        self.layer = layer
        self.is_batch_norm = isinstance(layer, keras_layers().BatchNormalization)
        self.register_method = (
            "register_batch_normalization" if self.is_batch_norm else "register_layer_normalization"
        )
        if self.is_batch_norm and getattr(layer, "renorm", False):
            raise UnsupportedLayerError(
                f"Layer '{layer.name}' uses batch renormalization; its scale "
                "and shift are left to a generic diagonal block."
            )
        scale = layer.gamma if getattr(layer, "scale", True) else None
        center = layer.beta if getattr(layer, "center", True) else None
        if getattr(layer, "rms_scaling", False):
            center = None  # rms_scaling applies no β (its gradient is zero)
        self._parameters = [v for v in (scale, center) if v is not None]
        if not self._parameters:
            raise UnsupportedLayerError(
                f"Layer '{layer.name}' has neither scale nor center; nothing to register."
            )
        self.has_scale, self.has_shift = scale is not None, center is not None
        self.param_shape = tuple(int(d) for d in self._parameters[0].shape)
        self.input_size = math.prod(self.param_shape)
        self.output_size = len(self._parameters)

    @property
    def parameters(self):
        return list(self._parameters)

    def _feature_axes(self, rank):
        axis = self.layer.axis
        axes = [axis] if isinstance(axis, int) else list(axis)
        return sorted(a % rank for a in axes)

    def normalized_inputs(self, use):
        """(z, μ, r) with x̂ = (z − μ)·r, float32: BatchNorm: z = x, the
        input, and μ, r = 1/√(σ² + ε) the batch's per-feature moments [d]
        (an inference use: the moving mean and variance; x̂ itself is never
        formed, see ``per_example_gradients``); LayerNorm: z = x̂, shaped
        like the input, μ = r = None."""
        x = tf.cast(use.inputs, tf.float32)
        epsilon = float(self.layer.epsilon)
        mean, variance = self._layer_moments(x, use.training)
        if self.is_batch_norm:
            return x, mean, tf.math.rsqrt(variance + epsilon)
        if getattr(self.layer, "rms_scaling", False):
            return x * tf.math.rsqrt(variance + epsilon), None, None
        return (x - mean) * tf.math.rsqrt(variance + epsilon), None, None

    def _layer_moments(self, x, training=True):
        """The mean and variance the layer normalises x with: BatchNorm's
        per-feature batch moments [d] (in an inference call, ``training``
        False: its moving mean and variance), LayerNorm's per position (kept
        dims). Built as the layer's forward pass builds them (the same
        reduction axes, as the layer spells them) and outside any control
        dependencies of the caller, so that graph optimisation merges them
        with the forward pass's own moments instead of computing them again."""
        if self.is_batch_norm and not training:
            return tuple(tf.reshape(tf.cast(v, tf.float32), [-1])
                         for v in (self.layer.moving_mean, self.layer.moving_variance))
        rank = x.shape.rank
        with tf.control_dependencies(None):
            if self.is_batch_norm:
                features = self._feature_axes(rank)
                return tf.nn.moments(x, [a for a in range(rank) if a not in features])
            axis = self.layer.axis  # LayerNorm spells it [-1]: kept, for the merge
            return tf.nn.moments(x, [axis] if isinstance(axis, int) else sorted(axis), keepdims=True)

    def _per_feature(self, tensor, rank):
        """[N, ...] -> [N, T, d], feature axes last (in sorted order)."""
        axes = self._feature_axes(rank)
        order = [0] + [a for a in range(1, rank) if a not in axes] + axes
        moved = tensor if order == list(range(rank)) else tf.transpose(tensor, order)
        return tf.reshape(moved, [tf.shape(tensor)[0], -1, self.input_size])

    def per_example_gradients(self, use, grad, normalized):
        """The p columns [N, d] (∂ℓ_i/∂γ_c, ∂ℓ_i/∂β_c; p = 1 without γ or
        β) from g = ∂ℓ/∂y of the use and ``normalized`` =
        ``normalized_inputs(use)``:
        ∂ℓ_i/∂γ_c = Σ_t g x̂ = r_c (Σ_t g z − μ_c Σ_t g), ∂ℓ_i/∂β_c = Σ_t g."""
        z, mean, inverse_std = normalized
        g = tf.cast(grad, tf.float32)
        rank = g.shape.rank
        g = self._per_feature(g, rank)
        shift = tf.reduce_sum(g, axis=1) if self.has_shift or mean is not None else None
        columns = []
        if self.has_scale:
            scale = tf.reduce_sum(g * self._per_feature(z, rank), axis=1)
            if mean is not None:
                scale = inverse_std * (scale - mean * shift)
            columns.append(scale)
        if self.has_shift:
            columns.append(shift)
        return columns

    def to_matrix(self, grads):
        return tf.stack(
            [tf.reshape(tf.cast(g, tf.float32), [self.input_size]) for g in grads], axis=-1
        )

    def from_matrix(self, matrix):
        return [tf.reshape(column, self.param_shape) for column in tf.unstack(matrix, axis=1)]


# Largest variable group (in scalars) a full generic block takes: its
# [n, n] state (two matrices) and O(n³) inverse stay small.
MAX_FULL_BLOCK_SIZE = 1024
GENERIC_STRUCTURES = ("diagonal", "full")


def generic_variables(layer):
    """The trainable variables a generic block of ``layer`` takes by
    default: its own (not its sublayers'), or for a recurrent layer
    (``keras.layers.RNN``) all of them, its cell's, whose calls run inside
    the recurrent layer's loop."""
    if isinstance(layer, keras.layers.RNN):
        return list(layer.trainable_variables)
    return list(getattr(layer, "_trainable_variables", []) or [])


class VariablesKind(_LayerBlockKind):
    """Any trainable variables of one layer (or of the model itself) that no
    other kind covers: a diagonal block (``fisher_blocks.DiagonalBlock``,
    ``structure='diagonal'``) or, for at most MAX_FULL_BLOCK_SIZE scalars, a
    full one (``fisher_blocks.FullBlock``, ``structure='full'``).

    Capture: on a training call the layer runs with these variables replaced
    (``keras.StatelessScope``) by read tensors, which are the taps, so the
    sampled backward pass gives ∂L̂/∂θ of the batch in the same pass as every
    other block's g. ∇Θ is the concatenation of the flattened variables [n].
    """

    name = "variables"
    register_method = "register_generic"
    tap = "variables"

    def __init__(self, layer, variables, structure="diagonal"):
        if structure not in GENERIC_STRUCTURES:
            raise ValueError(
                f"register_generic(layer '{layer.name}'): structure must be one of "
                f"{GENERIC_STRUCTURES}; got {structure!r}."
            )
        self.layer = layer
        self.variables = list(variables)
        self.shapes = [tuple(int(d) for d in v.shape) for v in self.variables]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.input_size, self.output_size = sum(self.sizes), 1
        if structure == "full" and self.input_size > MAX_FULL_BLOCK_SIZE:
            raise ValueError(
                f"register_generic(layer '{layer.name}', structure='full'): its "
                f"{self.input_size} scalars exceed MAX_FULL_BLOCK_SIZE = "
                f"{MAX_FULL_BLOCK_SIZE} (an [n, n] block); use structure='diagonal'."
            )
        self.structure = structure

    @property
    def parameters(self):
        return list(self.variables)

    def get_config(self):
        return dict(super().get_config(), variables=[v.path for v in self.variables])

    def num_examples(self, use):
        from keras import tree

        return tf.shape(tree.flatten(use.inputs)[0])[0]

    def to_matrix(self, grads):
        return tf.concat(
            [tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1]) for g in grads], axis=0
        )

    def from_matrix(self, matrix):
        parts = tf.split(matrix, self.sizes)
        return [tf.reshape(p, s) for p, s in zip(parts, self.shapes)]


def keras_layers():
    import keras

    return keras.layers
