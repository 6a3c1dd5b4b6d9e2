"""The optimizer suite: adaptive TKFAC with library defaults against a tuned
Adam on the workloads of examples/workloads.py, timed to Adam's target.

Protocol (after AlgoPerf), per workload:
  1. Adam tuning: one run per learning rate of the workload's grid with a
     5 % linear warm-up and cosine decay to 0 over the step budget, plus the
     Keras default (1e-3, constant). The run with the lowest final held-out
     loss is the tuned Adam ('adam'); that loss is the workload's target.
  2. Every other optimizer (default: tkfac_adaptive; --optimizers adds
     kfac_adaptive) runs with library defaults only (--variants adds
     tkfac_adaptive runs with some defaults overridden, named so in the rows), from the same initial
     weights and batch order, until its held-out loss reaches the target, its
     step budget (Adam's) ends, or its clock passes --time_cap times the tuned
     Adam's seconds to target. --tuned adds optimizers that take a
     learning rate (AdamW, SGD-Nesterov, and both wrapped in
     tkfac_tf.Preconditioned): one such run per point of its grid
     (suite_runs.TUNED_GRIDS), the fastest to the target kept.
Each run is a fresh spawned process (its peak memory is its own); runs follow
one another, never two at once. Definitions: examples/suite_report.py.

Writes to --output_dir (default docs/suite): results.json (one row per
workload and optimizer), runs.json (every run: settings, seed, curves, step
times, α/μ/λ and the last ρ per step of the adaptive runs), tables.md (the
tables, the machine) and suite_loss_vs_steps.png / suite_loss_vs_seconds.png.

Run: python -m examples.suite                       (every workload; about
     an hour on 2 CPU cores)
     python -m examples.suite --workloads=resnet --steps=40   (a quick look)
"""

import concurrent.futures
import json
import multiprocessing
import os
import sys

from absl import app
from absl import flags
from absl import logging

from examples import mnist_data
from examples import suite_report
from examples import suite_runs
from examples import workloads

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", list(workloads.WORKLOADS), "Workloads to run (examples/workloads.py).")
flags.DEFINE_list("optimizers", ["tkfac_adaptive"], "Optimizers timed against the tuned Adam.")
flags.DEFINE_string("output_dir", "docs/suite", "Where results.json, runs.json, tables.md and the plots go.")
flags.DEFINE_integer("seed", 0, "Weights, batch order and the optimizers' seeds.")
flags.DEFINE_integer("steps", 0, "Step budget of every workload (0: each workload's own).")
flags.DEFINE_integer("batch_size", 0, "Batch size of every workload and optimizer (0: each workload's own).",
                     lower_bound=0)
flags.DEFINE_list("adam_learning_rates", [], "Adam's grid (empty: each workload's own).")
flags.DEFINE_list("tuned", [], "Optimizers tuned on a learning-rate grid and timed to the target "
                  f"({', '.join(suite_runs.TUNED_GRIDS)}).")
flags.DEFINE_string("variants", "", "JSON list of option dicts: each adds a tkfac_adaptive run with those "
                    "defaults overridden (e.g. '[{\"cov_batch_size\": 32}]').")
flags.DEFINE_float("time_cap", 3.0, "Other optimizers stop after this many times the tuned Adam's seconds.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"],
                  "model.compile's jit_compile for every run ('auto': XLA where Keras picks it, on a GPU).")
flags.DEFINE_bool("deterministic", False,
                  "TensorFlow's op determinism in every run: a re-run reproduces every step bit for bit, so two "
                  "variants differ by their options only (docs/step_equivalence.md). It changes step times, so "
                  "compare steps, not seconds, with runs without it.")
flags.DEFINE_bool("spawn", True, "Each run in a fresh process (False: all in this one; quick checks only).")
mnist_data.define_flags()


def _call(executor, **kwargs):
    logging.info("run: %s", kwargs)
    return executor.submit(suite_runs.run, **kwargs).result()


def run_suite(names, optimizers, output_dir, seed=0, steps=0, adam_learning_rates=(), time_cap=3.0,
              data_source="auto", data_dir=None, spawn=True, variants=(), tuned=(), batch_size=0,
              jit_compile="auto", deterministic=False):
    """Runs the protocol of the module docstring, plus one tkfac_adaptive run
    per dict of ``variants`` (defaults overridden); ``batch_size`` > 0
    replaces every workload's own; ``jit_compile`` ('auto', True or False)
    goes to every run's ``model.compile``; ``deterministic`` turns on op
    determinism in every run (with ``spawn=False`` it stays on in this
    process); returns (rows, runs)."""
    common = dict(seed=seed, data_source=data_source, data_dir=data_dir, batch_size=batch_size or None,
                  jit_compile=jit_compile, deterministic=deterministic)
    context = multiprocessing.get_context("spawn")
    rows, runs = [], {}
    for name in names:
        workload = workloads.WORKLOADS[name]
        budget = steps or workload.steps
        grid = [float(lr) for lr in adam_learning_rates] or list(workload.adam_learning_rates)
        settings = [(lr, "cosine") for lr in grid] + [(1e-3, "constant")]
        executor = (concurrent.futures.ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1)
                    if spawn else concurrent.futures.ThreadPoolExecutor(1))
        with executor:
            adam_runs = [_call(executor, workload_name=name, optimizer="adam", learning_rate=lr, schedule=schedule,
                               steps=budget, **common) for lr, schedule in settings]
            best = suite_report.tuned(adam_runs)
            target = suite_report.final_loss(best)
            _, adam_seconds = suite_report.reach(best, target)
            others = [_call(executor, workload_name=name, optimizer=optimizer, steps=budget, target=target,
                            max_seconds=time_cap * adam_seconds, options=options, **common)
                      for optimizer, options in [(o, None) for o in optimizers]
                      + [("tkfac_adaptive", v) for v in variants]]
            grids = {}
            for optimizer in tuned:
                rates = suite_runs.TUNED_GRIDS[optimizer] or grid
                grids[optimizer] = [
                    _call(executor, workload_name=name, optimizer=optimizer, learning_rate=lr, steps=budget,
                          target=target, max_seconds=time_cap * adam_seconds, **common) for lr in rates]
                others.append(suite_report.fastest(grids[optimizer], target))
        rows += suite_report.rows(name, adam_runs, others)
        runs[name] = {"adam_grid": adam_runs, "adam": best, **{r["optimizer"]: r for r in others},
                      **{f"{o}_grid": g for o, g in grids.items()}}
        logging.info("%s:\n%s", name, suite_report.markdown_table([r for r in rows if r["workload"] == name]))
        write(rows, runs, output_dir)
    return rows, runs


def write(rows, runs, output_dir):
    """results.json, runs.json, the plots and tables.md."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump([{k: r[k] for k in suite_report.ROW_KEYS} | {"peak_memory_mb": r["peak_memory_mb"],
                                                                "target": r["target"]} for r in rows], f, indent=1)
    record = {"command": " ".join(["python -m examples.suite"] + sys.argv[1:]), "machine": suite_report.machine(),
              "rows": rows, "runs": runs}
    with open(os.path.join(output_dir, "runs.json"), "w") as f:
        json.dump(record, f)
    targets = {w: next(r["target"] for r in rows if r["workload"] == w) for w in runs}
    curves = {w: {k: v for k, v in group.items() if not k.endswith("_grid")} for w, group in runs.items()}
    suite_report.plot(curves, targets, os.path.join(output_dir, "suite"))
    with open(os.path.join(output_dir, "tables.md"), "w") as f:
        f.write("## Time to the tuned Adam's target\n\n" + suite_report.markdown_table(rows) + "\n\n"
                "## Adam's tuning grid\n\n" + suite_report.adam_grid_table(
                    {w: group["adam_grid"] for w, group in runs.items()}) + "\n\n"
                f"Machine: {record['machine']}\n\nCommand: `{record['command']}`\n")


def main(argv):
    del argv
    unknown = set(FLAGS.workloads) - set(workloads.WORKLOADS)
    if unknown:
        raise app.UsageError(f"Unknown workloads {sorted(unknown)}; choose from {list(workloads.WORKLOADS)}.")
    unknown_tuned = set(FLAGS.tuned) - set(suite_runs.TUNED_GRIDS)
    if unknown_tuned:
        raise app.UsageError(f"Unknown --tuned {sorted(unknown_tuned)}; choose from {list(suite_runs.TUNED_GRIDS)}.")
    unknown = set(FLAGS.optimizers) - set(suite_runs.ADAPTIVE_OPTIMIZERS)
    if unknown:
        raise app.UsageError(f"Unknown optimizers {sorted(unknown)}; choose from {suite_runs.ADAPTIVE_OPTIMIZERS}.")
    run_suite(FLAGS.workloads, FLAGS.optimizers, FLAGS.output_dir, FLAGS.seed, FLAGS.steps,
              FLAGS.adam_learning_rates, FLAGS.time_cap, FLAGS.data_source, FLAGS.data_dir, FLAGS.spawn,
              json.loads(FLAGS.variants) if FLAGS.variants else (), FLAGS.tuned, FLAGS.batch_size,
              {"auto": "auto", "true": True, "false": False}[FLAGS.jit_compile], FLAGS.deterministic)


if __name__ == "__main__":
    app.run(main)
