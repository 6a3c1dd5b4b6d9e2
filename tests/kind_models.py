"""Small models that together hold one layer of every registered kind
(shared by the cov_batch_size and tf.distribute tests)."""

import keras


@keras.saving.register_keras_serializable(package="tkfac_tf_tests")
class ScaleLayer(keras.layers.Layer):
    """y = x ⊙ w: a layer no kind covers (a generic diagonal block)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def image_and_token_models(image_size):
    """(images, tokens), built with seed 0:
    images [N, s, s, 4] → grouped Conv2D → DepthwiseConv2D → SeparableConv2D →
      Conv1D → LayerNormalization (random γ) → Dense(3), s = ``image_size`` ≥ 5;
    tokens int [N, 5] in [0, 7) → Embedding → EinsumDense → ScaleLayer → Dense(3)."""
    keras.utils.set_random_seed(0)
    side = image_size - 4  # after the 3×3, 2×2 and 2×2 valid convolutions
    images = keras.Sequential([
        keras.Input((image_size, image_size, 4)),
        keras.layers.Conv2D(4, 3, groups=2, activation="tanh"),
        keras.layers.DepthwiseConv2D(2, activation="tanh"),
        keras.layers.SeparableConv2D(3, 2, activation="tanh"),
        keras.layers.Reshape((side * side, 3)),
        keras.layers.Conv1D(4, 2, activation="tanh"),
        keras.layers.LayerNormalization(gamma_initializer="random_normal"),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    tokens = keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(7, 4),
        keras.layers.EinsumDense("btd,de->bte", output_shape=(5, 6), bias_axes="e",
                                 activation="tanh"),
        ScaleLayer(),
        keras.layers.Flatten(),
        keras.layers.Dense(3),
    ])
    return images, tokens
