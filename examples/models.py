"""Models and losses of the examples (Keras 3 functional models)."""

import keras
import tensorflow as tf

AUTOENCODER_SIZES = (1000, 500, 250, 30, 250, 500, 1000)


def build_autoencoder(sizes=AUTOENCODER_SIZES, input_dim=784, seed=0):
    """The K-FAC papers' MNIST deep autoencoder (784-1000-500-250-30-250-500-1000-784).

    tanh hidden layers, a linear 30-unit code layer, and a linear output of
    784 logits (the sigmoid lives in the loss). Glorot-uniform initialisation
    seeded by ``seed``.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,), name="pixels")
    h = inputs
    code = len(sizes) // 2
    for i, units in enumerate(sizes):
        activation = "linear" if i == code else "tanh"
        h = keras.layers.Dense(units, activation=activation, name=f"dense_{i}")(h)
    logits = keras.layers.Dense(input_dim, name="logits")(h)
    return keras.Model(inputs, logits, name="autoencoder")


def autoencoder_loss(pixels, logits):
    """Sigmoid cross-entropy summed over pixels, averaged over the batch."""
    per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=pixels, logits=logits)
    return tf.reduce_mean(tf.reduce_sum(per_pixel, axis=-1))


def autoencoder_per_example_loss(pixels, logits):
    """Per-example sigmoid cross-entropy summed over pixels ([N]; Keras averages)."""
    per_pixel = tf.nn.sigmoid_cross_entropy_with_logits(labels=pixels, logits=logits)
    return tf.reduce_sum(per_pixel, axis=-1)


def build_mlp(hidden=(256, 128), num_classes=10, input_dim=784, seed=0):
    """MLP classifier: ReLU hidden layers, a linear output of class logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_dim,), name="pixels")
    h = inputs
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(units, activation="relu", name=f"dense_{i}")(h)
    logits = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, logits, name="mlp")


def build_convnet(filters=(16, 32), num_classes=10, seed=0):
    """Small ConvNet on [28, 28, 1] images: two 3x3 conv + 2x2 max-pool
    stages, a ReLU Dense layer and linear class logits."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((784,), name="pixels")
    h = keras.layers.Reshape((28, 28, 1))(inputs)
    for i, f in enumerate(filters):
        h = keras.layers.Conv2D(f, 3, padding="same", activation="relu", name=f"conv_{i}")(h)
        h = keras.layers.MaxPooling2D(2, name=f"pool_{i}")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu", name="dense_0")(h)
    logits = keras.layers.Dense(num_classes, name="logits")(h)
    return keras.Model(inputs, logits, name="convnet")


def classifier_loss(labels, logits):
    """Softmax cross-entropy with integer labels, averaged over the batch."""
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(labels, tf.int32), logits=logits)
    )


def accuracy(labels, logits):
    """Fraction of examples whose arg-max logit is the label."""
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return tf.reduce_mean(tf.cast(tf.equal(predicted, tf.cast(labels, tf.int32)), tf.float32))
