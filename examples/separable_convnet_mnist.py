r"""A small convnet of depthwise-separable blocks (SeparableConv2D + BatchNorm
+ ReLU, a DepthwiseConv2D, a grouped Conv2D) on the offline MNIST subset,
trained with TKFAC, K-FAC and Adam through model.fit. Reports the training
loss vs steps and seconds, steps / seconds to reach Adam's final loss, and
the share of parameters preconditioned by a Kronecker block.

  python -m examples.separable_convnet_mnist --steps=200
  python -m examples.separable_convnet_mnist --plot_dir=docs   # + two PNGs

BatchNormalization's scale and offset get a per-feature scale-and-shift
block (docs/layers.md), not counted in the Kronecker share.
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from examples import loss_plots
from examples import mnist_data
from examples import optimizers
import tkfac_tf

FLAGS = flags.FLAGS


def build_model(seed=0, batch_norm=True):
    keras.utils.set_random_seed(seed)
    L = keras.layers
    inputs = keras.Input((784,), name="pixels")
    h = L.Reshape((28, 28, 1))(inputs)
    h = L.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="stem")(h)  # 14x14
    for i, (filters, strides) in enumerate([(32, 1), (32, 2), (64, 2)]):
        h = L.SeparableConv2D(filters, 3, strides=strides, padding="same", use_bias=not batch_norm,
                              name=f"sep_{i}")(h)
        if batch_norm:
            h = L.BatchNormalization(name=f"bn_{i}")(h)
        h = L.Activation("relu")(h)
    h = L.DepthwiseConv2D(3, padding="same", activation="relu", name="depthwise")(h)
    h = L.Conv2D(64, 1, groups=4, activation="relu", name="grouped")(h)
    h = L.GlobalAveragePooling2D()(h)
    logits = L.Dense(10, name="logits")(h)
    return keras.Model(inputs, logits, name="separable_convnet")


class _LossTimer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.losses, self.seconds, self._start = [], [], time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))
        self.seconds.append(time.perf_counter() - self._start)


def preconditioned_share(model, opt):
    """Fraction of the model's trainable parameters in a Kronecker block."""
    if not isinstance(opt, (tkfac_tf.TKFAC, tkfac_tf.KFAC)):
        return 0.0
    covered = sum(int(np.prod(v.shape)) for k in opt.layer_collection.layer_kinds
                  if k.structure == "kronecker" for v in k.parameters)
    return covered / sum(int(np.prod(v.shape)) for v in model.trainable_variables)


def train(data, optimizer="tkfac", learning_rate=None, damping=0.03, steps=200, batch_size=100,
          inv_update_every=5, seed=0, batch_norm=True, verbose=0):
    """Fits for ``steps`` steps; returns the per-step training losses (the
    mean over the batches so far, as Keras logs it, turned back into per-batch
    values), cumulative seconds, the final test loss and the preconditioned share."""
    if learning_rate is None:
        learning_rate = 1e-3 if optimizer == "adam" else 0.1
    model = build_model(seed, batch_norm)
    opt = optimizers.make_optimizer(optimizer,  # compile() registers the model's layers
                                    learning_rate=learning_rate, damping=damping,
                                    inv_update_every=inv_update_every, norm_constraint=0.01, seed=seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=opt, loss=loss)
    batches = (tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
               .shuffle(len(data.x_train), seed=seed).repeat().batch(batch_size, drop_remainder=True))
    timer = _LossTimer()
    model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=verbose, callbacks=[timer])
    running = np.array(timer.losses)  # Keras logs the running mean over the epoch
    per_step = running * np.arange(1, len(running) + 1) - np.concatenate([[0.0], running[:-1] * np.arange(1, len(running))])
    test_loss = model.evaluate(data.x_test, data.y_test, batch_size=1000, verbose=0)
    return dict(losses=per_step, seconds=np.array(timer.seconds), test_loss=float(test_loss),
                share=preconditioned_share(model, opt))


def smoothed(losses, window=10):
    return np.convolve(losses, np.ones(window) / window, mode="valid")


def report(results, window=10):
    """Table rows: final smoothed training loss, seconds, steps and seconds
    to reach Adam's final smoothed loss."""
    target = smoothed(results["adam"]["losses"], window)[-1]
    rows = []
    for name, r in results.items():
        curve = smoothed(r["losses"], window)
        hit = np.nonzero(curve <= target)[0]
        step = int(hit[0]) + window if hit.size else None
        rows.append(dict(optimizer=name, final_train_loss=float(curve[-1]), test_loss=r["test_loss"],
                         seconds=float(r["seconds"][-1]), median_step_s=float(np.median(np.diff(r["seconds"]))),
                         steps_to_adam=step, seconds_to_adam=float(r["seconds"][step - 1]) if step else None,
                         seconds_to_adam_after_first=(float(r["seconds"][step - 1] - r["seconds"][0])
                                                      if step else None),
                         preconditioned=r["share"]))
    return rows


LABELS = {"tkfac": "TKFAC", "kfac": "K-FAC", "adam": "Adam"}


def plot(results, plot_dir, prefix="conv_separable", window=10):
    """Training loss (mean of the last ``window`` batches) vs steps and vs
    wall-clock seconds from the start of fit, one PNG each; returns the paths."""
    os.makedirs(plot_dir, exist_ok=True)
    reference = None
    if "adam" in results:
        reference = (smoothed(results["adam"]["losses"], window)[-1], "Adam's final loss")
    paths = []
    for suffix, xlabel, x_of in (
        ("loss_vs_steps", "step", lambda r: np.arange(window, len(r["losses"]) + 1)),
        ("loss_vs_seconds", "seconds from the start of fit (first step's tracing included)",
         lambda r: r["seconds"][window - 1:]),
    ):
        curves = [(LABELS.get(name, name), x_of(r), smoothed(r["losses"], window), {}) for name, r in results.items()]
        paths.append(loss_plots.save_loss_figure(
            os.path.join(plot_dir, f"{prefix}_{suffix}.png"), curves, xlabel,
            f"training loss (last {window} batches)", "depthwise-separable convnet, MNIST subset",
            reference=reference, log_scale=True))
    return paths


def main(argv):
    del argv
    data = mnist_data.from_flags()
    results = {name: train(data, optimizer=name, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
                           seed=FLAGS.seed, batch_norm=FLAGS.batch_norm)
               for name in FLAGS.optimizers}
    print("| optimizer | train loss (last 10) | test loss | seconds | median step | steps to Adam's loss | "
          "seconds to it | same, after the first step | params preconditioned (Kronecker) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in report(results):
        fmt = {k: (f"{v:.1f}" if isinstance(v, float) else str(v)) for k, v in row.items()
               if k.startswith("seconds_to")}
        print("| {optimizer} | {final_train_loss:.4f} | {test_loss:.4f} | {seconds:.1f} | {median_step_s:.3f} s | "
              "{steps_to_adam} | ".format(**row)
              + "{seconds_to_adam} | {seconds_to_adam_after_first} | ".format(**fmt)
              + "{preconditioned:.1%} |".format(**row))
    for name, r in results.items():
        print(name, "loss every 20 steps:", " ".join(f"{v:.3f}" for v in smoothed(r["losses"])[::20]))
    if "adam" in results:
        adam = results["adam"]
        for name, r in results.items():
            print(f"{name}: median step / Adam's {np.median(np.diff(r['seconds'])) / np.median(np.diff(adam['seconds'])):.2f}")
    if FLAGS.plot_dir:
        for path in plot(results, FLAGS.plot_dir, FLAGS.plot_prefix):
            print("wrote", path)


if __name__ == "__main__":
    mnist_data.define_flags()
    flags.DEFINE_list("optimizers", ["tkfac", "kfac", "adam"], "Optimizers to compare.")
    flags.DEFINE_integer("steps", 200, "Training steps.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 100, "Batch size.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed.", lower_bound=0)
    flags.DEFINE_bool("batch_norm", True, "BatchNormalization after each separable conv.")
    flags.DEFINE_string("plot_dir", None, "If set, write loss-vs-steps and loss-vs-seconds PNGs here.")
    flags.DEFINE_string("plot_prefix", "conv_separable", "File name prefix of the plots.")
    app.run(main)
