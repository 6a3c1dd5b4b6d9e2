"""One training run of the optimizer suite (examples/suite.py), as plain data.

A run trains one optimizer on one workload (examples/workloads.py) with
``model.compile`` + ``train_on_batch``, from the workload's seeded weights
and batch order, and records per step its wall-clock seconds (the step
returns its loss to Python, so the time includes the whole step) and, every
``eval_every`` steps, the held-out loss (evaluation is not timed). It stops
at the step budget, at the first evaluation at or below ``target``, or when
its clock passes ``max_seconds``.

Optimizers:
  adam             keras Adam, ``learning_rate`` with a linear warm-up over
                   the first 5 % of the budget and a cosine decay to 0 at its
                   end (``schedule='cosine'``) or constant
                   (``schedule='constant'``).
  tkfac_adaptive   TKFAC.adaptive() with library defaults, every layer of the
                   model registered by LayerCollection.from_model.
  kfac_adaptive    the same with K-FAC's factors.
  adamw, sgd_nesterov   keras AdamW (its default weight decay) and SGD with
                   Nesterov momentum 0.9, ``learning_rate`` warm-up + cosine
                   as Adam's;
  preconditioned_adamw, preconditioned_sgd_nesterov
                   the same wrapped in tkfac_tf.Preconditioned (TKFAC's
                   preconditioner, library defaults).
The last four are tuned like Adam, each on its own grid (``TUNED_GRIDS``).
An adaptive run may override defaults (``options``; named in its row, e.g.
``tkfac_adaptive[cov_batch_size=32]``): measurements of what a default
change would do, never the suite's headline rows.
"""

import resource
import time

import numpy as np

ADAPTIVE_OPTIMIZERS = ("tkfac_adaptive", "kfac_adaptive")
"""The optimizers that run with library defaults (no learning rate)."""
TUNED_GRIDS = {
    "adamw": None,  # None: the workload's Adam grid
    "preconditioned_adamw": None,
    "sgd_nesterov": (1e-3, 1e-2, 1e-1),
    "preconditioned_sgd_nesterov": (1e-2, 1e-1, 1.0),
}
"""The optimizers that take a learning rate from a grid (warm-up + cosine)."""
OPTIMIZERS = ("adam", *ADAPTIVE_OPTIMIZERS, *TUNED_GRIDS)
WARMUP_FRACTION = 0.05


def adam_learning_rate(learning_rate, schedule, steps):
    """Adam's learning rate: ``learning_rate`` ('constant') or a schedule
    rising linearly from 0 over the first 5 % of ``steps`` and decaying as a
    cosine to 0 at ``steps`` ('cosine')."""
    import keras

    if schedule == "constant":
        return learning_rate
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'cosine' or 'constant'; got {schedule!r}.")
    warmup = max(1, int(WARMUP_FRACTION * steps))
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=steps - warmup, warmup_target=learning_rate, warmup_steps=warmup)


def row_name(optimizer, options=None):
    """The report's name of a run: the optimizer, and the options that
    override its defaults, e.g. ``tkfac_adaptive[cov_batch_size=32]``."""
    if not options:
        return optimizer
    return optimizer + "[" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) + "]"


def make_optimizer(name, model, workload, learning_rate=None, schedule="cosine", steps=None, seed=0,
                   options=None):
    """The optimizer of one run (see the module docstring); ``options``:
    keyword arguments that override the adaptive optimizers' defaults."""
    import keras
    import tkfac_tf

    if name == "adam":
        return keras.optimizers.Adam(adam_learning_rate(learning_rate, schedule, steps))
    if name in ADAPTIVE_OPTIMIZERS:
        cls = tkfac_tf.TKFAC if name == "tkfac_adaptive" else tkfac_tf.KFAC
        return cls.adaptive(layer_collection=workload.layer_collection(model), seed=seed, **(options or {}))
    if name in TUNED_GRIDS:
        rate = adam_learning_rate(learning_rate, schedule, steps)
        base = name.removeprefix("preconditioned_")
        plain = (keras.optimizers.AdamW(rate) if base == "adamw"
                 else keras.optimizers.SGD(rate, momentum=0.9, nesterov=True))
        if base == name:
            return plain
        return tkfac_tf.Preconditioned(plain, layer_collection=workload.layer_collection(model), seed=seed,
                                       **(options or {}))
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {name!r}.")


def batch_order(num_examples, batch_size, step, seed):
    """Indices of batch ``step`` (seeded epoch permutations; examples/training.py)."""
    from examples import training

    return training.batch_indices(num_examples, batch_size, step, seed)


def run(workload_name, optimizer, learning_rate=None, schedule="cosine", steps=None, target=None,
        max_seconds=None, seed=0, data_source="auto", data_dir=None, eval_every=None, jit_compile="auto",
        options=None, batch_size=None, deterministic=False):
    """Trains one (workload, optimizer) run; returns a dict of plain data:
    settings, ``curve`` [(step, seconds, held-out loss)], ``step_seconds``
    (every step, the first included), ``train_losses``, ``peak_memory_bytes``
    (the process's peak RSS), ``stopped`` ('budget' | 'target' | 'time' |
    'non-finite'), and for adaptive runs ``step_hyperparameters`` (α, μ, λ
    and the last adaptation's ρ, per step). ``batch_size``: None for the
    workload's own. ``deterministic``: turn on TensorFlow's op determinism
    first, so that a re-run gives the same steps bit for bit; it stays on in
    the calling process."""
    import tensorflow as tf

    from examples import workloads

    if deterministic:
        tf.config.experimental.enable_op_determinism()
    workload = workloads.WORKLOADS[workload_name]
    steps = steps or workload.steps
    batch_size = batch_size or workload.batch_size
    eval_every = eval_every or workload.eval_every
    data = workload.load(data_source, data_dir)
    model = workload.build(seed)
    opt = make_optimizer(optimizer, model, workload, learning_rate, schedule, steps, seed, options)
    model.compile(optimizer=opt, loss=workload.loss, jit_compile=jit_compile)
    x_eval = tf.constant(data.x_eval)
    y_eval = tf.constant(data.y_eval)
    evaluate = tf.function(lambda: workload.loss(y_eval, model(x_eval, training=False)))
    adaptive = optimizer in ADAPTIVE_OPTIMIZERS

    curve = [(0, 0.0, float(evaluate()))]
    step_seconds, train_losses, hyper = [], [], {"learning_rate": [], "momentum": [], "damping": [],
                                          "reduction_ratio": []}
    seconds, stopped = 0.0, "budget"
    for step in range(steps):
        index = batch_order(len(data.x_train), batch_size, step, seed)
        x, y = data.x_train[index], data.y_train[index]
        start = time.perf_counter()
        loss = float(model.train_on_batch(x, y))
        elapsed = time.perf_counter() - start
        seconds += elapsed
        step_seconds.append(elapsed)
        train_losses.append(loss)
        if adaptive:
            hyper["learning_rate"].append(float(opt.step_learning_rate))
            hyper["momentum"].append(float(opt.step_momentum))
            hyper["damping"].append(float(opt.damping))
            hyper["reduction_ratio"].append(float(opt.reduction_ratio))
        done = step + 1
        if not np.isfinite(loss):
            stopped = "non-finite"
        elif done % eval_every == 0 or done == steps:
            curve.append((done, seconds, float(evaluate())))
            if target is not None and curve[-1][2] <= target:
                stopped = "target"
        if stopped == "budget" and max_seconds is not None and seconds > max_seconds:
            stopped = "time"
        if stopped != "budget":
            if curve[-1][0] != done:
                curve.append((done, seconds, float(evaluate())))
            break
    return {
        "workload": workload_name, "optimizer": row_name(optimizer, options), "options": options or {},
        "learning_rate": learning_rate,
        "schedule": schedule if learning_rate is not None else None, "steps": steps, "seed": seed,
        "batch_size": batch_size, "eval_every": eval_every, "target": target,
        "max_seconds": max_seconds, "data_source": data.source, "train_examples": int(len(data.x_train)),
        "eval_examples": int(len(data.x_eval)), "parameters": int(model.count_params()),
        "jit_compile": bool(model.jit_compile), "deterministic": deterministic,
        "curve": curve, "step_seconds": step_seconds, "train_losses": train_losses,
        "step_hyperparameters": hyper if adaptive else None,
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "skipped_steps": int(opt.skipped_steps.numpy()) if adaptive else None,
        "rejected_steps": int(opt.rejected_steps.numpy()) if adaptive else None,
        "stopped": stopped,
    }
