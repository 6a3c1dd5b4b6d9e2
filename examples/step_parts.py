"""What the adaptive step's parts cost in wall-clock, by ablation, on the
workloads of the optimizer suite (examples/workloads.py).

Per workload, one process builds five copies of the model from the same
seeded weights, each compiled with one optimizer, and trains them on the same
batches with their steps interleaved (step k of every copy before step k + 1
of any), so that every copy sees the same machine state:

  adam            keras Adam (1e-3, constant): the model's own forward and
                  backward pass and Adam's update.
  tkfac_adaptive  TKFAC.adaptive() with library defaults.
  no_statistics   the same with cov_update_every larger than the run (the
                  factor statistics on the first step only).
  no_exact_curvature   the same with curvature='approximate' (the 2×2
                  quadratic model from the preconditioner's own curvature: no
                  forward-mode curvature products).
  neither         both.

The parts follow by differences of the amortised steps (the mean step after
the first ``--warmup`` steps, inverse and adaptation steps included):

  statistics        = tkfac_adaptive − no_statistics
  exact curvature   = tkfac_adaptive − no_exact_curvature
  rest              = neither − adam (preconditioning, the inverse updates,
                      ρ's extra forward pass on adaptation steps, the commit)

They overlap where the two ablations share work, so they need not add up to
tkfac_adaptive − adam exactly; the table shows that sum beside the measured
difference. Writes results.json (every step's seconds) and tables.md to
--output_dir.

Run: python -m examples.step_parts                  (every workload; about
     20 minutes on 2 CPU cores)
     python -m examples.step_parts --workloads=resnet --steps=15
"""

import json
import os

from absl import app
from absl import flags
import numpy as np

from examples import mnist_data
from examples import suite_report
from examples import suite_runs
from examples import workloads

FLAGS = flags.FLAGS


def define_flags(flag_values=FLAGS):
    """The flags (defined only when run as a script)."""
    fv = dict(flag_values=flag_values)
    mnist_data.define_flags(**fv)
    flags.DEFINE_list("workloads", list(workloads.WORKLOADS), "Workloads to measure (examples/workloads.py).", **fv)
    flags.DEFINE_integer("steps", 25, "Steps per model.", lower_bound=2, **fv)
    flags.DEFINE_integer("warmup", 1, "Steps left out of the amortised step (the first traces the step).",
                         lower_bound=1, **fv)
    flags.DEFINE_string("output_dir", "docs/suite/step_parts", "Where results.json and tables.md go.", **fv)
    flags.DEFINE_integer("seed", 0, "Weights, batch order and the optimizers' seeds.", **fv)
    flags.register_multi_flags_validator(
        ["warmup", "steps"], lambda f: f["warmup"] < f["steps"], message="--warmup must be below --steps.", **fv)
    flags.register_validator(
        "workloads", lambda names: bool(names) and set(names) <= set(workloads.WORKLOADS),
        message=f"--workloads must be a non-empty comma-separated subset of {list(workloads.WORKLOADS)}.", **fv)


VARIANTS = ("adam", "tkfac_adaptive", "no_statistics", "no_exact_curvature", "neither")


def variant_options(variant, steps):
    """(optimizer, option overrides) of one variant of the module docstring."""
    never = {"cov_update_every": steps + 1}
    approximate = {"curvature": "approximate"}
    return {"adam": ("adam", None), "tkfac_adaptive": ("tkfac_adaptive", None),
            "no_statistics": ("tkfac_adaptive", never),
            "no_exact_curvature": ("tkfac_adaptive", approximate),
            "neither": ("tkfac_adaptive", never | approximate)}[variant]


def parts(step_seconds, warmup=1):
    """{variant: amortised step s} and the parts (statistics, exact curvature,
    rest, their sum, tkfac_adaptive − adam) from {variant: [seconds per
    step]}: means of the steps after the first ``warmup``."""
    amortised = {v: float(np.mean(s[warmup:])) for v, s in step_seconds.items()}
    derived = {"statistics": amortised["tkfac_adaptive"] - amortised["no_statistics"],
               "exact_curvature": amortised["tkfac_adaptive"] - amortised["no_exact_curvature"],
               "rest": amortised["neither"] - amortised["adam"]}
    derived["sum_of_parts"] = sum(derived.values())
    derived["tkfac_minus_adam"] = amortised["tkfac_adaptive"] - amortised["adam"]
    return amortised, derived


def measure(name, steps, seed=0, data_source="auto", data_dir=None):
    """{variant: [seconds per step]} of one workload, steps interleaved."""
    import time

    workload = workloads.WORKLOADS[name]
    data = workload.load(data_source, data_dir)
    models = {}
    for variant in VARIANTS:
        optimizer, options = variant_options(variant, steps)
        model = workload.build(seed)
        model.compile(optimizer=suite_runs.make_optimizer(optimizer, model, workload, 1e-3, "constant", steps,
                                                          seed, options), loss=workload.loss)
        models[variant] = model
    seconds = {v: [] for v in VARIANTS}
    for step in range(steps):
        index = suite_runs.batch_order(len(data.x_train), workload.batch_size, step, seed)
        x, y = data.x_train[index], data.y_train[index]
        for variant, model in models.items():
            start = time.perf_counter()
            loss = float(model.train_on_batch(x, y))
            seconds[variant].append(time.perf_counter() - start)
            if not np.isfinite(loss):
                raise FloatingPointError(f"{name} / {variant}: non-finite loss at step {step}.")
    return seconds


def markdown(results, warmup):
    """The table of amortised steps and parts, one row per workload."""
    lines = ["| workload | Adam step s | TKFAC step s (× Adam) | statistics s (% of TKFAC) | exact curvature s (%) "
             "| rest s (%) | parts' sum / TKFAC − Adam | no statistics, no curvature × Adam |",
             "|---|---|---|---|---|---|---|---|"]
    for name, seconds in results.items():
        amortised, derived = parts(seconds, warmup)
        tkfac, adam = amortised["tkfac_adaptive"], amortised["adam"]

        def share(key):
            return f"{derived[key]:.3f} ({100 * derived[key] / tkfac:.0f} %)"

        lines.append(f"| {name} | {adam:.3f} | {tkfac:.3f} ({tkfac / adam:.2f}×) | {share('statistics')} | "
                     f"{share('exact_curvature')} | {share('rest')} | "
                     f"{derived['sum_of_parts']:.3f} / {derived['tkfac_minus_adam']:.3f} | "
                     f"{amortised['neither'] / adam:.2f}× |")
    return "\n".join(lines)


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    results = {}
    for name in FLAGS.workloads:
        results[name] = measure(name, FLAGS.steps, FLAGS.seed, FLAGS.data_source, FLAGS.data_dir)
        table = markdown(results, FLAGS.warmup)
        print(table, flush=True)
        with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
            json.dump({"machine": suite_report.machine(), "steps": FLAGS.steps, "warmup": FLAGS.warmup,
                       "seed": FLAGS.seed, "step_seconds": results}, f)
        with open(os.path.join(FLAGS.output_dir, "tables.md"), "w") as f:
            f.write(table + f"\n\nMachine: {suite_report.machine()}\n\nSteps per model: {FLAGS.steps}, amortised "
                    f"over the steps after the first {FLAGS.warmup}.\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
