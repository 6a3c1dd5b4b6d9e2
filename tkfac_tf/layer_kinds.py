"""How each supported layer kind maps onto the Kronecker-factor layout.

A layer kind turns the recorded uses of a layer into the activation matrix
``a`` [M, d_a] and pre-activation gradients [M, d_g] of its samples, and
converts the layer's parameter gradients to and from the matrix ∇Θ
[d_a, d_g] whose row-major flatten is the order of ``full_fisher()``.
"""

import tensorflow as tf


def _append_homogeneous_coordinate(a):
    """[M, d] -> [M, d + 1] with a trailing column of ones."""
    return tf.concat([a, tf.ones_like(a[:, :1])], axis=-1)


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
            "layer": self.layer.name,
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
        rows = self.input_size - int(self.has_bias)
        kernel = tf.reshape(matrix[:rows], self.kernel_shape)
        return [kernel, matrix[-1]] if self.has_bias else [kernel]


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
        x = tf.cast(inputs, tf.float32)
        x = tf.reshape(x, tf.concat([[-1], tf.shape(x)[-3:]], axis=0))
        if self.channels_first:
            x = tf.transpose(x, [0, 2, 3, 1])
        kh, kw = self.kernel_shape[:2]
        return tf.image.extract_patches(
            x,
            sizes=[1, kh, kw, 1],
            strides=[1, *self.layer.strides, 1],
            rates=[1, *self.layer.dilation_rate, 1],
            padding=self.layer.padding.upper(),
        )

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
