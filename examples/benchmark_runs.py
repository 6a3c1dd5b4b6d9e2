"""The benchmark's measurements, each run in a worker process by the driver
(examples/benchmark.py): one training run, a search over a grid, the
interleaved step timing of all optimizers, the profile of the parts of one
TKFAC step, and the machine's description.

Everything here returns plain Python data (lists, dicts, floats) so that it
travels back from a spawned process and into benchmark.json.
"""

import math
import os
import platform
import time

import numpy as np
from absl import logging


from examples import benchmark_metrics
from examples import mnist_data

# Per-step read-outs of an adaptive optimizer: key in the json -> attribute.
STEP_HYPERPARAMETERS = {
    "learning_rate": "step_learning_rate",  # α used by the step
    "momentum": "step_momentum",  # μ used by the step
    "damping": "damping",  # λ after the step
}


# --- memory -------------------------------------------------------------------
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("No VmHWM in /proc/self/status.")


# --- the cost-of-the-step settings ---------------------------------------------------
def native_bfloat16():
    """Whether this CPU multiplies bfloat16 natively under oneDNN (AVX512_BF16
    or AMX-BF16 in /proc/cpuinfo, oneDNN not switched off)."""
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") == "0":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def step_options(name, config):
    """The optimizer keyword arguments that set the cost of its step
    (``config['step_options']``: one dict for the fixed TKFAC / K-FAC rows,
    one for the adaptive rows); {} for first-order optimizers."""
    options = config.get("step_options") or {}
    if name in ("tkfac", "kfac"):
        return dict(options.get("fixed") or {})
    if name in ("tkfac_adaptive", "kfac_adaptive"):
        return dict(options.get("adaptive") or {})
    return {}


def _curvature_examples(name, config):
    """Examples of the adaptive step's loss re-evaluations (None: the batch)."""
    if name in ("tkfac_adaptive", "kfac_adaptive"):
        return config.get("curvature_examples")
    return None


# --- one training run -----------------------------------------------------------
def build_model(config):
    """The autoencoder, with ``config['autoencoder_sizes']`` hidden layers if
    given (a smaller one, e.g. for a quick check of the whole pipeline), else
    the papers' 1000-500-250-30-250-500-1000."""
    from examples import models

    return models.build_autoencoder(
        sizes=tuple(config.get("autoencoder_sizes") or models.AUTOENCODER_SIZES), seed=config["seed"])


def _setup(name, hparams, config, options=None):
    """Model and optimizer for one optimizer (adaptive ones: library defaults),
    with the step options of ``config`` (or ``options`` if given)."""
    from examples import optimizers

    model = build_model(config)
    optimizer = optimizers.make_optimizer(
        name,
        model=model,
        distribution="bernoulli",
        cov_update_every=config["cov_update_every"],
        inv_update_every=config["inv_update_every"],
        cov_ema_decay=config.get("cov_ema_decay", 0.95),
        seed=config["seed"],
        step_options=step_options(name, config) if options is None else options,
        **hparams,
    )
    optimizer.build(model.trainable_variables)
    return model, optimizer


def _schedule(optimizer):
    """The covariance / inverse intervals the optimizer really uses (None: not a K-FAC-family one)."""
    return {key: getattr(optimizer, key, None) for key in ("cov_update_every", "inv_update_every")}


def _warm_up(step, model, optimizer, xb):
    """Traces and runs one step, then restores every variable: tracing is not timed."""
    saved = [v.numpy() for v in model.variables + optimizer.variables]
    step(xb, xb)
    for variable, value in zip(model.variables + optimizer.variables, saved):
        variable.assign(value)


def train_run(name, hparams, config, steps, progress=False):
    """Trains one optimizer; returns per-step losses and times, memory figures,
    its schedule and, for an adaptive optimizer, α, μ and λ at every step."""
    import tensorflow as tf
    import keras
    from examples import models
    from examples import training

    data_x = mnist_data.load_mnist(config["data_source"], config["data_dir"], holdout=0).x_train
    rss_before = _rss_bytes()
    model, optimizer = _setup(name, hparams, config)
    adaptive = getattr(optimizer, "adaptive", False) is True  # not the classmethod of the same name
    step = training.make_train_step(model, optimizer, models.autoencoder_loss, config["jit_compile"],
                                    _curvature_examples(name, config))
    batch = lambda k: tf.constant(data_x[training.batch_indices(len(data_x), config["batch_size"], k, config["seed"])])
    _warm_up(step, model, optimizer, batch(0))
    bar = keras.utils.Progbar(steps, stateful_metrics=["loss"]) if progress else None
    losses, times = [], []
    trace = {key: [] for key in STEP_HYPERPARAMETERS} if adaptive else None
    for k in range(steps):
        xb = batch(k)
        start = time.perf_counter()
        loss = float(step(xb, xb))
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if adaptive:  # read after the timed step
            for key, attribute in STEP_HYPERPARAMETERS.items():
                trace[key].append(float(getattr(optimizer, attribute).numpy()))
        if bar is not None:
            bar.update(k + 1, [("loss", loss)])
        if not np.isfinite(loss):
            break
    result = {
        "name": name,
        "hparams": hparams,
        "adaptive": adaptive,
        "schedule": _schedule(optimizer),
        "losses": losses,
        "times": times,
        "peak_rss": _peak_rss_bytes(),
        "rss_rise": _peak_rss_bytes() - rss_before,
    }
    if adaptive:
        result["step_hyperparameters"] = trace
    return result


def search_runs(name, grid, config, steps):
    """Short runs over one optimizer's grid (one process); each result gets its score."""
    window = benchmark_metrics.epoch_batches(config)
    results = []
    for hparams in grid:
        result = train_run(name, hparams, config, steps)
        result["score"] = benchmark_metrics.final_loss(result["losses"], steps, window)
        logging.info("search %s %s: final loss %.3f", name, hparams, result["score"])
        results.append(result)
    return results


# --- interleaved timing ---------------------------------------------------------
def timing_runs(chosen, config, rounds):
    """Interleaved step timing of all optimizers in one process.

    Each round runs every optimizer for one cycle of its own schedule: the
    least common multiple of its covariance and inverse intervals (the
    benchmark's --inv_update_every for first-order optimizers), so every
    round does the same work."""
    import tensorflow as tf
    from examples import models
    from examples import training

    data_x = mnist_data.load_mnist(config["data_source"], config["data_dir"], holdout=0).x_train
    xb = tf.constant(data_x[: config["batch_size"]])
    steps, cycles = {}, {}
    for name, hparams in chosen.items():
        model, optimizer = _setup(name, hparams, config)
        steps[name] = training.make_train_step(model, optimizer, models.autoencoder_loss, config["jit_compile"],
                                               _curvature_examples(name, config))
        schedule = _schedule(optimizer)
        inverse_every = schedule["inv_update_every"] or config["inv_update_every"]
        cycles[name] = (inverse_every, math.lcm(inverse_every, schedule["cov_update_every"] or 1))
        _warm_up(steps[name], model, optimizer, xb)  # trace; iterations back at 0
    times = {name: [] for name in chosen}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(cycles[name][1]):
                start = time.perf_counter()
                float(step(xb, xb))
                times[name].append(time.perf_counter() - start)
    summary = {}
    for name, t in times.items():
        inverse_every, cycle = cycles[name]
        t = np.array(t).reshape(rounds, cycle)
        # Cycles start at an iteration k % cycle == 0; inverse updates at
        # k % inverse_every == 0.
        inverse = np.arange(cycle) % inverse_every == 0
        other = t[:, ~inverse] if inverse_every > 1 else t
        summary[name] = {
            "median_step": float(np.median(other.mean(axis=1))),  # over rounds: mean of the other steps
            "median_inverse_step": float(np.median(t[:, inverse])),
            "amortized_step": float(np.median(t.mean(axis=1))),
            "cycle": cycle,
        }
    return summary


# --- profile --------------------------------------------------------------------
def profile_tkfac(hparams, config, options=None, curvature_examples=None, repeats=5):
    """Times the parts of one TKFAC step, each as its own compiled function,
    with the optimizer options ``options`` (the step's cost settings:
    cov_batch_size, matmul_dtype, inverse_method) and the adaptive curvature
    products on the first ``curvature_examples`` examples (None: the batch).

    Returns {'options', 'curvature_examples', 'parts': {label: median
    seconds}, 'peak_rss_mb', 'rss_rise_mb'} (memory of this process, which
    should be a fresh one: the driver spawns it)."""
    import tensorflow as tf
    from examples import models
    from examples import optimizers
    from tkfac_tf import curvature
    from tkfac_tf import fisher_factors

    options = dict(options or {})
    data_x = mnist_data.load_mnist(config["data_source"], config["data_dir"], holdout=0).x_train
    xb = tf.constant(data_x[: config["batch_size"]])
    rss_before = _rss_bytes()
    model = build_model(config)
    opt = optimizers.make_optimizer(
        "tkfac", model=model, distribution="bernoulli", cov_update_every=None,
        inv_update_every=None, seed=config["seed"], step_options=options, **hparams
    )
    variables = model.trainable_variables
    opt.build(variables)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            loss = models.autoencoder_loss(xb, model(xb, training=False))
        return tape.gradient(loss, variables)

    @tf.function
    def forward_cov():
        model(xb, training=True)
        opt.cov_update_op()

    @tf.function
    def forward_only():
        return model(xb, training=False)

    @tf.function
    def inverse():
        opt.inv_update_op()

    grads = forward_backward()

    @tf.function
    def apply():
        opt.apply_gradients(zip(grads, variables))

    shapes = [(kind.input_size, kind.output_size) for kind in opt.layer_collection.layer_kinds]
    n = min(options.get("cov_batch_size") or config["batch_size"], config["batch_size"])
    dtype = options.get("matmul_dtype", "float32")
    stats_inputs = [(tf.random.normal((n, da)), tf.random.normal((1, n, dg))) for da, dg in shapes]

    @tf.function
    def statistics():
        return [fisher_factors.tkfac_sums(a, g, dtype) for a, g in stats_inputs]

    @tf.function
    def precondition():
        return [block.multiply_inverse(tf.ones((block.kind.input_size, block.kind.output_size)), opt.damping)
                for block in opt.fisher_blocks.values()]

    # The adaptive step's extra work: exact curvature products along two
    # directions (a re-evaluation of the loss and one forward-mode walk of
    # it; fit's own step walks its forward pass instead) and one loss
    # re-evaluation.
    collection = opt.layer_collection

    def loss_probe(n):
        return curvature.LossProbe(
            collection.recorder, {id(d.layer): d.tensor for d in collection.distributions}, variables,
            lambda: models.autoencoder_loss(xb[:n], model(xb[:n], training=True)))

    probe, batch_probe = loss_probe(curvature_examples), loss_probe(None)
    directions = [[tf.ones_like(v) for v in variables], [tf.ones_like(v) * 0.5 for v in variables]]

    @tf.function
    def curvature_products():
        return curvature.gauss_newton_gram(probe, [tf.convert_to_tensor(v) for v in variables], directions)

    @tf.function
    def loss_reevaluation():  # ρ's losses stay on the whole batch
        return batch_probe.loss([tf.convert_to_tensor(v) for v in variables])

    parts = {
        "forward + backward (gradient)": forward_backward,
        "forward only": forward_only,
        "forward + covariance update": forward_cov,
        "factor statistics matmuls alone": statistics,
        "inverse update (all blocks)": inverse,
        "apply_gradients (precondition + momentum)": apply,
        "preconditioning matmuls alone": precondition,
        "adaptive: exact curvature products (2 directions)": curvature_products,
        "adaptive: loss re-evaluation at θ + u (every 5th step)": loss_reevaluation,
    }
    for fn in parts.values():
        fn()  # trace
    timing = {}
    for _ in range(repeats):
        for label, fn in parts.items():
            start = time.perf_counter()
            result = fn()
            if result is not None:
                tf.nest.map_structure(lambda t: t.numpy(), result)
            timing.setdefault(label, []).append(time.perf_counter() - start)
    return {
        "options": options,
        "curvature_examples": curvature_examples,
        "parts": {label: float(np.median(t)) for label, t in timing.items()},
        "peak_rss_mb": _peak_rss_bytes() / 2**20,
        "rss_rise_mb": (_peak_rss_bytes() - rss_before) / 2**20,
    }


def machine_description():
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpus = len(tf.config.list_physical_devices("GPU"))
    accelerator = f"{gpus} GPU(s)" if gpus else "no GPU"
    return (f"{os.cpu_count()}-core CPU ({cpu}), {accelerator}; Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}, Keras {__import__('keras').__version__}")
