r"""Data-parallel TKFAC / K-FAC on MNIST with tf.distribute.

  # 2 replicas on this machine (logical CPU devices; GPUs if there are any)
  python -m examples.distributed_mnist --strategy=mirrored --num_replicas=2

  # the benchmark table: 1 vs 2 replicas, inverses replicated vs distributed
  python -m examples.distributed_mnist --benchmark

  # several workers: set TF_CONFIG on each (cluster + this task), then
  python -m examples.distributed_mnist --strategy=multi_worker

Training is a custom loop with ``strategy.run``: each replica's loss is its
share of the mean over the global batch (``tf.nn.compute_average_loss``),
the Keras contract that ``model.fit`` follows too under MirroredStrategy.
(Keras 3.15's ``fit`` stops before its first step under
MultiWorkerMirroredStrategy, with Keras' own optimizers as well.)
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

from examples import mnist_data

FLAGS = flags.FLAGS
CONFIGURATIONS = ((1, "replicated"), (2, "replicated"), (2, "distributed"))


def define_flags():
    mnist_data.define_flags()
    flags.DEFINE_enum("strategy", "mirrored", ["mirrored", "multi_worker"], "tf.distribute strategy.")
    flags.DEFINE_integer("num_replicas", 2, "Replicas of MirroredStrategy (>= 1): GPUs if there are "
                         "that many, else logical CPU devices.", lower_bound=1)
    flags.DEFINE_enum("optimizer", "tkfac", ["tkfac", "kfac", "tkfac_adaptive", "kfac_adaptive"],
                      "Optimizer (the adaptive ones use the library defaults).")
    flags.DEFINE_enum("inverse_placement", "distributed", ["distributed", "replicated"],
                      "Each block inverted on one replica, or on every replica.")
    flags.DEFINE_enum("model", "convnet", ["mlp", "convnet"], "Model (examples/models.py).")
    flags.DEFINE_integer("steps", 100, "Training steps (>= 1).", lower_bound=1)
    flags.DEFINE_integer("global_batch_size", 256, "Global batch size (a multiple of the replicas).",
                         lower_bound=1)
    flags.DEFINE_float("learning_rate", 0.3, "α (tkfac / kfac).", lower_bound=0.0)
    flags.DEFINE_float("damping", 0.03, "λ > 0 (tkfac / kfac).")
    flags.DEFINE_float("norm_constraint", 0.01, "KL clipping (tkfac / kfac); 0 turns it off.",
                       lower_bound=0.0)
    flags.DEFINE_integer("inv_update_every", 5, "Inverse-update interval (>= 1).", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and Fisher samples.", lower_bound=0)
    flags.DEFINE_string("json_out", None, "Write the run's measurements here (JSON).")
    flags.DEFINE_bool("benchmark", False, "Run every configuration of CONFIGURATIONS in a subprocess "
                      "and print the table.")
    flags.DEFINE_string("report", None, "With --benchmark: also write the table (Markdown) here.")
    mnist_data.register_open_bounds(FLAGS, greater_than_zero=["damping"])


def make_strategy(kind, num_replicas):
    """MirroredStrategy over ``num_replicas`` GPUs (or logical CPU devices,
    configured here before TensorFlow initialises), or
    MultiWorkerMirroredStrategy from TF_CONFIG."""
    import tensorflow as tf

    if kind == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs TF_CONFIG (cluster and task) on every worker.")
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= num_replicas:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(num_replicas)])
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas
    )
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(num_replicas)])


def build_optimizer(name, model, inverse_placement, seed, learning_rate, damping,
                    norm_constraint, inv_update_every):
    import keras

    import tkfac_tf

    collection = tkfac_tf.LayerCollection.from_model(
        model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    cls = tkfac_tf.TKFAC if name.startswith("tkfac") else tkfac_tf.KFAC
    if name.endswith("_adaptive"):
        return cls.adaptive(layer_collection=collection, seed=seed,
                            inverse_placement=inverse_placement)
    return cls(learning_rate=learning_rate, damping=damping, layer_collection=collection,
               norm_constraint=norm_constraint or None, inv_update_every=inv_update_every,
               seed=seed, inverse_placement=inverse_placement)


def train(strategy, data, optimizer="tkfac", model_name="convnet", steps=100,
          global_batch_size=256, inverse_placement="distributed", seed=0, learning_rate=0.3,
          damping=0.03, norm_constraint=0.01, inv_update_every=5):
    """Trains under ``strategy``; returns the measurements (dict): losses,
    median step seconds, steps per second and bytes all-reduced per step."""
    import keras
    import tensorflow as tf

    from examples import models
    from tkfac_tf import distribution

    replicas = strategy.num_replicas_in_sync
    if global_batch_size % replicas:
        raise ValueError(f"global_batch_size {global_batch_size} is not a multiple of the "
                         f"{replicas} replicas.")
    build_model = {"mlp": models.build_mlp, "convnet": models.build_convnet}[model_name]
    with strategy.scope():
        model = build_model(seed=seed)
        opt = build_optimizer(optimizer, model, inverse_placement, seed, learning_rate, damping,
                              norm_constraint, inv_update_every)
        opt.build(model.trainable_variables)
    per_example_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    adaptive = optimizer.endswith("_adaptive")

    def replica_step(x, y):
        def loss_fn():
            logits = model(x, training=True)
            return tf.nn.compute_average_loss(per_example_loss(y, logits),
                                              global_batch_size=global_batch_size)

        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables),
                            loss_fn=loss_fn if adaptive else None)
        return loss

    @tf.function
    def step(x, y):
        losses = strategy.run(replica_step, args=(x, y))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)

    dataset = (
        tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train))
        .shuffle(len(data.x_train), seed=seed)
        .repeat()
        .batch(global_batch_size, drop_remainder=True)
    )
    iterator = iter(strategy.experimental_distribute_dataset(dataset))
    losses, seconds = [], []
    for index in range(steps):
        batch = next(iterator)
        start = time.perf_counter()
        losses.append(float(step(*batch).numpy()))
        seconds.append(time.perf_counter() - start)
        if index % max(1, steps // 10) == 0 or index == steps - 1:
            logging.info("step %d/%d: loss %.4f (%.3f s)", index + 1, steps, losses[-1], seconds[-1])
    bytes_per_step = distribution.communication_per_step(opt)
    every_step = bytes_per_step["gradients"] + bytes_per_step["curvature"]
    every_step += bytes_per_step["statistics"] / (opt.cov_update_every or steps)
    median = float(np.median(seconds[1:] if len(seconds) > 1 else seconds))
    return {
        "replicas": replicas,
        "inverse_placement": inverse_placement,
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "first_step_seconds": seconds[0],
        "median_step_seconds": median,
        "steps_per_second": 1.0 / median,
        "bytes_per_step": bytes_per_step,
        "amortised_bytes_per_step": (every_step + bytes_per_step["inverses"] / (opt.inv_update_every or steps))
        if replicas > 1 else 0,
    }


def run_benchmark():
    """Each configuration in its own process (logical devices are fixed when
    TensorFlow starts); prints and optionally writes the table."""
    rows = []
    for replicas, placement in CONFIGURATIONS:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [sys.executable, "-m", "examples.distributed_mnist", f"--num_replicas={replicas}",
                       f"--inverse_placement={placement}", f"--json_out={out.name}"]
            command += [f"--{name}={FLAGS[name].value}" for name in
                        ("optimizer", "model", "steps", "global_batch_size", "seed", "data_source",
                         "learning_rate", "damping", "norm_constraint", "inv_update_every")]
            logging.info("running %s", " ".join(command[1:]))
            subprocess.run(command, check=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
            with open(out.name) as f:
                rows.append(json.load(f))
    table = format_table(rows)
    print(table)
    if FLAGS.report:
        with open(FLAGS.report, "w") as f:
            f.write(table + "\n")


def format_table(rows):
    base = rows[0]["median_step_seconds"]
    lines = [
        f"{FLAGS.model}, {FLAGS.optimizer}, global batch {FLAGS.global_batch_size}, "
        f"{FLAGS.steps} steps, inverses every {FLAGS.inv_update_every}",
        "",
        "| replicas | inverses | median step (s) | steps/s | vs 1 replica | final loss | "
        "all-reduced per step (KiB, amortised) | of it: inverses per update (KiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = [
        "",
        "2 logical CPU devices share the same cores: the ratio measures the distributed "
        "step's overhead, not a speed-up. Final losses (last batch) differ between 1 and 2 "
        "replicas because 'gradients' mode draws other targets per replica (stream step·R + r); "
        "with 'exact' or 'empirical' the runs agree to float round-off (tests/test_distribute.py).",
    ]
    for row in rows:
        lines.append(
            f"| {row['replicas']} | {row['inverse_placement']} | {row['median_step_seconds']:.4f} | "
            f"{row['steps_per_second']:.1f} | {base / row['median_step_seconds']:.2f}× | "
            f"{row['final_loss']:.4f} | {row['amortised_bytes_per_step'] / 1024:.0f} | "
            f"{(row['bytes_per_step']['inverses'] / 1024 if row['replicas'] > 1 else 0):.0f} |"
        )
    return "\n".join(lines + notes)


def main(argv):
    del argv
    if FLAGS.benchmark:
        run_benchmark()
        return
    strategy = make_strategy(FLAGS.strategy, FLAGS.num_replicas)
    result = train(
        strategy, mnist_data.from_flags(), optimizer=FLAGS.optimizer, model_name=FLAGS.model,
        steps=FLAGS.steps, global_batch_size=FLAGS.global_batch_size,
        inverse_placement=FLAGS.inverse_placement, seed=FLAGS.seed,
        learning_rate=FLAGS.learning_rate, damping=FLAGS.damping,
        norm_constraint=FLAGS.norm_constraint, inv_update_every=FLAGS.inv_update_every,
    )
    logging.info("result: %s", json.dumps(result))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    define_flags()
    app.run(main)
