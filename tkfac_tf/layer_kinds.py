"""How each supported layer kind maps onto the Kronecker-factor layout.

A layer kind turns the recorded uses of a layer into the activation matrix
``a`` [M, d_a] and pre-activation gradients [M, d_g] of its samples, and
converts the layer's parameter gradients to and from the matrix ∇Θ
[d_a, d_g] whose row-major flatten is the order of ``full_fisher()``.
"""

import keras
import tensorflow as tf


def _append_homogeneous_coordinate(a):
    """[M, d] -> [M, d + 1] with a trailing column of ones."""
    return tf.concat([a, tf.ones_like(a[:, :1])], axis=-1)


class DenseKind:
    """keras.layers.Dense with Keras layout: s = x W + b, W [d_in, d_out].

    With a bias, a = [x, 1] and Θ = [W; b] of shape [d_in + 1, d_out]. Inputs
    of rank > 2 ([N, ..., d_in]) give one sample per leading position.
    """

    name = "dense"
    register_method = "register_dense"

    def __init__(self, layer):
        self.layer = layer
        self.has_bias = layer.bias is not None
        d_in, d_out = layer.kernel.shape
        self.input_size = int(d_in) + int(self.has_bias)
        self.output_size = int(d_out)

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
        }

    def num_examples(self, use):
        return tf.shape(use.inputs)[0]

    def activations(self, use):
        """a [M, d_a] (float32) of one recorded use."""
        x = tf.reshape(tf.cast(use.inputs, tf.float32), [-1, self.input_size - self.has_bias])
        return _append_homogeneous_coordinate(x) if self.has_bias else x

    def preactivation_gradients(self, use, grad):
        """g [M, d_g] from d(loss)/d(pre-activation) of the same use."""
        del use
        return tf.reshape(tf.cast(grad, tf.float32), [-1, self.output_size])

    def to_matrix(self, grads):
        """[grad W [d_in, d_out], (grad b [d_out])] -> ∇Θ [d_a, d_g]."""
        kernel = tf.cast(grads[0], tf.float32)
        if self.has_bias:
            return tf.concat([kernel, tf.cast(grads[1], tf.float32)[None, :]], axis=0)
        return kernel

    def from_matrix(self, matrix):
        """∇Θ [d_a, d_g] -> list shaped like ``parameters``."""
        if self.has_bias:
            return [matrix[:-1], matrix[-1]]
        return [matrix]


def kind_for_layer(layer):
    """The layer kind object for a registered layer (validated)."""
    if isinstance(layer, keras.layers.Dense):
        return DenseKind(layer)
    raise TypeError(
        f"Layer '{layer.name}' is a {type(layer).__name__}; tkfac_tf supports "
        "keras.layers.Dense here. Leave other layers unregistered: they get "
        "the plain momentum update."
    )
