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
  fixed           TKFAC's fixed rule (α = 1e-4 with KL clipping, τ = 0.9)
                  with the adaptive preset's schedule and damping: no
                  curvature products, no quadratic model, no ρ.
  fixed_no_statistics   the fixed rule without statistics after the first
                  step.

The parts follow by differences of the amortised steps (the mean step after
the first ``--warmup`` steps, by default the first five: the trace and the
preset's inverse warm-up; inverse and adaptation steps included), so that
they add up to tkfac_adaptive − adam:

  statistics     = tkfac_adaptive − no_statistics   (sampled backward pass,
                   patches, factor products, running averages)
  adaptive rule  = no_statistics − fixed_no_statistics   (the exact
                   curvature products of the two directions, the 2×2 model,
                   ρ's extra forward pass on adaptation steps)
  rest           = fixed_no_statistics − adam   (preconditioning, the inverse
                   updates, momentum, the commit)

The table also shows the fixed rule's statistics (fixed −
fixed_no_statistics), taken from the step's own forward pass over the whole
batch: equal to the adaptive step's where those come from the same pass, more
where the adaptive step takes them from its curvature pass over half the
batch (``statistics_pass='auto'`` on a network with BatchNorm).

With --amortised a sixth copy runs TKFAC.adaptive(curvature_update_every=2)
(curvature_every_2) and a second table splits its steps after the warm-up
that are not inverse steps into curvature steps (the exact products) and the
others (the calibrated model: docs/adaptive.md), medians each, beside the
defaults' median on the same steps: the others' saving is what the exact
curvature products cost. Writes results.json (every step's seconds) and
tables.md to --output_dir.

Run: python -m examples.step_parts                  (every workload; about
     12 minutes on 2 CPU cores)
     python -m examples.step_parts --workloads=resnet --steps=15
     python -m examples.step_parts --amortised --steps=40
"""

import json
import os
import time

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
    flags.DEFINE_integer("steps", 30, "Steps per model.", lower_bound=2, **fv)
    flags.DEFINE_integer("warmup", 5, "Steps left out of the amortised step (the first traces the step; the "
                         "adaptive preset updates the inverses on every one of the first five).", lower_bound=1, **fv)
    flags.DEFINE_string("output_dir", "docs/suite/step_parts", "Where results.json and tables.md go.", **fv)
    flags.DEFINE_integer("seed", 0, "Weights, batch order and the optimizers' seeds.", **fv)
    flags.DEFINE_boolean("amortised", False, "Also time TKFAC.adaptive(curvature_update_every=2) and split its "
                         "steps into curvature steps and the others.", **fv)
    flags.register_multi_flags_validator(
        ["warmup", "steps"], lambda f: f["warmup"] < f["steps"], message="--warmup must be below --steps.", **fv)
    flags.register_validator(
        "workloads", lambda names: bool(names) and set(names) <= set(workloads.WORKLOADS),
        message=f"--workloads must be a non-empty comma-separated subset of {list(workloads.WORKLOADS)}.", **fv)


VARIANTS = ("adam", "tkfac_adaptive", "no_statistics", "fixed", "fixed_no_statistics")
AMORTISED = "curvature_every_2"
AMORTISED_OPTIONS = {"curvature_update_every": 2}  # the AMORTISED variant's overrides of the defaults
FIXED_LEARNING_RATE = 1e-4


def make_optimizer(variant, model, workload, steps, seed=0):
    """The optimizer of one variant of the module docstring."""
    import tkfac_tf

    if variant == "adam":
        return suite_runs.make_optimizer("adam", model, workload, 1e-3, "constant", steps, seed)
    options = {"cov_update_every": steps + 1} if variant.endswith("no_statistics") else {}
    if variant == AMORTISED:
        options = AMORTISED_OPTIONS
    if variant in ("tkfac_adaptive", "no_statistics", AMORTISED):
        return suite_runs.make_optimizer("tkfac_adaptive", model, workload, seed=seed, options=options)
    if variant not in ("fixed", "fixed_no_statistics"):
        raise ValueError(f"variant must be one of {VARIANTS + (AMORTISED,)}; got {variant!r}.")
    settings = dict(tkfac_tf.optimizer.ADAPTIVE_DEFAULTS, learning_rate=FIXED_LEARNING_RATE, **options)
    return tkfac_tf.TKFAC(layer_collection=workload.layer_collection(model), seed=seed, **settings)


def parts(step_seconds, warmup):
    """{variant: amortised step s} and the parts (statistics, adaptive rule,
    rest: their sum is tkfac_adaptive − adam; and the fixed rule's
    statistics) from {variant: [seconds per step]}: means of the steps after
    the first ``warmup``."""
    amortised = {v: float(np.mean(s[warmup:])) for v, s in step_seconds.items()}
    derived = {"statistics": amortised["tkfac_adaptive"] - amortised["no_statistics"],
               "adaptive_rule": amortised["no_statistics"] - amortised["fixed_no_statistics"],
               "rest": amortised["fixed_no_statistics"] - amortised["adam"],
               "fixed_rule_statistics": amortised["fixed"] - amortised["fixed_no_statistics"]}
    return amortised, derived


def amortised_split(step_seconds, warmup, curvature_steps, inverse_steps):
    """(defaults' median, curvature_every_2's median on its curvature steps,
    its median on the other steps) over the steps after the first ``warmup``
    that are not inverse steps (bool lists per step)."""
    kept = np.arange(len(step_seconds[AMORTISED])) >= warmup
    kept &= ~np.asarray(inverse_steps, bool)
    curvature = np.asarray(curvature_steps, bool)
    amortised = np.asarray(step_seconds[AMORTISED])
    return (float(np.median(np.asarray(step_seconds["tkfac_adaptive"])[kept])),
            float(np.median(amortised[kept & curvature])), float(np.median(amortised[kept & ~curvature])))


def step_kinds(steps):
    """(curvature steps, inverse steps) of curvature_every_2: bool lists per
    step, from the library's schedule with the preset's settings."""
    import tkfac_tf
    from tkfac_tf import schedule

    options, _ = tkfac_tf.options.Options.from_arguments(dict(
        tkfac_tf.optimizer.ADAPTIVE_DEFAULTS, adaptive=True, **AMORTISED_OPTIONS))
    k = np.arange(steps)
    return (list(schedule.is_curvature_step(options.schedule, options.adaptive, k, False)),
            list(schedule.is_inverse_step(options.schedule, k)))


def measure(name, steps, seed=0, data_source="auto", data_dir=None, variants=VARIANTS):
    """{variant: [seconds per step]} of one workload, steps interleaved."""
    workload = workloads.WORKLOADS[name]
    data = workload.load(data_source, data_dir)
    models = {}
    for variant in variants:
        model = workload.build(seed)
        model.compile(optimizer=make_optimizer(variant, model, workload, steps, seed), loss=workload.loss)
        models[variant] = model
    seconds = {v: [] for v in variants}
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
    lines = ["| workload | Adam step s | TKFAC step s (× Adam) | statistics s (% of TKFAC) | adaptive rule s (%) "
             "| rest s (%) | fixed rule's statistics s | fixed rule without statistics × Adam |",
             "|---|---|---|---|---|---|---|---|"]
    for name, seconds in results.items():
        amortised, derived = parts(seconds, warmup)
        tkfac, adam = amortised["tkfac_adaptive"], amortised["adam"]

        def share(key):
            return f"{derived[key]:.3f} ({100 * derived[key] / tkfac:.0f} %)"

        lines.append(f"| {name} | {adam:.3f} | {tkfac:.3f} ({tkfac / adam:.2f}×) | {share('statistics')} | "
                     f"{share('adaptive_rule')} | {share('rest')} | "
                     f"{derived['fixed_rule_statistics']:.3f} | "
                     f"{amortised['fixed_no_statistics'] / adam:.2f}× |")
    return "\n".join(lines)


def amortised_markdown(results, warmup):
    """The table of curvature_every_2's curvature and other steps, one row
    per workload that ran it."""
    lines = ["| workload | defaults' step s | every 2nd: curvature steps s (× defaults) "
             "| every 2nd: other steps s (× defaults) |", "|---|---|---|---|"]
    for name, seconds in results.items():
        if AMORTISED in seconds:
            defaults, curvature, other = amortised_split(seconds, warmup, *step_kinds(len(seconds[AMORTISED])))
            lines.append(f"| {name} | {defaults:.3f} | {curvature:.3f} ({curvature / defaults:.2f}×) | "
                         f"{other:.3f} ({other / defaults:.2f}×) |")
    return "\n".join(lines)


def main(argv):
    del argv
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    machine = suite_report.machine()
    results = {}
    variants = VARIANTS + ((AMORTISED,) if FLAGS.amortised else ())
    for name in FLAGS.workloads:
        results[name] = measure(name, FLAGS.steps, FLAGS.seed, FLAGS.data_source, FLAGS.data_dir, variants)
        table = markdown(results, FLAGS.warmup)
        if FLAGS.amortised:
            table += "\n\nInverse steps and the warm-up left out; medians:\n\n" + amortised_markdown(
                results, FLAGS.warmup)
        print(table, flush=True)
        with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
            json.dump({"machine": machine, "steps": FLAGS.steps, "warmup": FLAGS.warmup,
                       "seed": FLAGS.seed, "step_seconds": results}, f)
        with open(os.path.join(FLAGS.output_dir, "tables.md"), "w") as f:
            f.write(table + f"\n\nMachine: {machine}\n\nSteps per model: {FLAGS.steps}, amortised "
                    f"over the steps after the first {FLAGS.warmup}.\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)
