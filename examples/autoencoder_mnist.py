r"""The K-FAC papers' MNIST deep autoencoder trained with TKFAC through model.fit.

784-1000-500-250-30-250-500-1000-784, tanh, sigmoid cross-entropy summed over
pixels (a multi-Bernoulli predictive distribution on the logits).

  python -m examples.autoencoder_mnist --optimizer=tkfac --steps=100
"""

from absl import app
from absl import flags

from examples import fit_example
from examples import mnist_data
from examples import models

FLAGS = flags.FLAGS


def train(data, **options):
    """Fits the autoencoder on data.x_train; evaluates the training loss."""
    model = models.build_autoencoder(seed=options.get("seed", 0))
    return fit_example.fit_and_report(
        model, "bernoulli", models.autoencoder_per_example_loss,
        data.x_train, data.x_train, data.x_train, data.x_train, **options,
    )


def main(argv):
    del argv
    train(mnist_data.from_flags(holdout=0), **fit_example.options_from_flags())


if __name__ == "__main__":
    fit_example.define_flags(learning_rate=1.0, damping=1.0, norm_constraint=0.1, steps=100, batch_size=1000)
    app.run(main)
