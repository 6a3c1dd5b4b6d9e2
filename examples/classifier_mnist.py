r"""An MLP classifier (784-256-128-10, ReLU) on MNIST trained with TKFAC through model.fit.

  python -m examples.classifier_mnist --optimizer=tkfac --steps=300
"""

from absl import app

from examples import fit_example
from examples import mnist_data
from examples import models


def train(data, **options):
    """Fits the model on the training split; evaluates on the test split."""
    return fit_example.train_classifier(models.build_mlp, data, **options)


def main(argv):
    del argv
    train(mnist_data.from_flags(), **fit_example.options_from_flags())


if __name__ == "__main__":
    fit_example.define_flags(learning_rate=0.3, damping=0.03, norm_constraint=0.01, steps=300, batch_size=100)
    app.run(main)
