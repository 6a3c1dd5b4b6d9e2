r"""A small ConvNet (two 3x3 conv + max-pool stages, Dense 64, 10 logits) on
MNIST trained with TKFAC through model.fit. Conv2D layers get KFC blocks
(``LayerCollection.register_conv2d``).

  PYTHONPATH=. python examples/convnet_mnist.py --optimizer=tkfac --steps=300
"""

import keras
from absl import app
from absl import flags

import fit_example
import mnist_data
import models

FLAGS = flags.FLAGS


def train(data, **options):
    """Fits the ConvNet on the training split; evaluates on the test split."""
    model = models.build_convnet(seed=options.get("seed", 0))
    return fit_example.fit_and_report(
        model, "categorical", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        data.x_train, data.y_train, data.x_test, data.y_test,
        metrics=["sparse_categorical_accuracy"], **options,
    )


def main(argv):
    del argv
    train(mnist_data.from_flags(), **fit_example.options_from_flags())


if __name__ == "__main__":
    fit_example.define_flags(learning_rate=0.3, damping=0.03, norm_constraint=0.01, steps=300, batch_size=100)
    app.run(main)
