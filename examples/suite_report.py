"""The suite's numbers and report: rows from runs (pure functions of the
recorded curves and step times, tested on hand-made runs), the markdown
tables of docs/suite/README.md, the loss-vs-steps / loss-vs-seconds plots and the
machine a report names (``machine``).

Definitions:
  target              the tuned Adam's held-out loss after its step budget.
  steps_to_target     the first evaluated step whose held-out loss <= target
                      (evaluations every ``eval_every`` steps), else None.
  seconds_to_target   the summed step seconds up to that step, the first
                      (tracing) step included, evaluation excluded.
  first_step_seconds  the first step (trace, compilation, first execution).
  median_step_seconds the median step after the first.
  amortised_step_seconds  the mean step after the first (inverse updates and
                      every other periodic cost included).
  final_loss          the held-out loss at the last evaluation of the run
                      (runs other than Adam's stop at the target).
"""

import os
import platform

import numpy as np

ROW_KEYS = ("workload", "optimizer", "steps_to_target", "seconds_to_target", "first_step_seconds",
            "median_step_seconds", "amortised_step_seconds", "final_loss")


def final_loss(run):
    """Held-out loss at the run's last evaluation (inf if not finite)."""
    loss = run["curve"][-1][2]
    return float(loss) if np.isfinite(loss) else float("inf")


def reach(run, target):
    """(steps, seconds) of the first evaluation with held-out loss <= target, or (None, None)."""
    for step, seconds, loss in run["curve"]:
        if step > 0 and loss <= target:
            return int(step), float(seconds)
    return None, None


def tuned(adam_runs):
    """The Adam run with the lowest final held-out loss."""
    return min(adam_runs, key=final_loss)


def fastest(runs, target):
    """The run of a tuned grid that reached ``target`` in the fewest seconds,
    else the one with the lowest final held-out loss."""
    reached = [r for r in runs if reach(r, target)[1] is not None]
    if reached:
        return min(reached, key=lambda r: reach(r, target)[1])
    return min(runs, key=final_loss)


def row(workload, name, run, target):
    """One results.json row (plus peak memory and what stopped the run)."""
    times = np.asarray(run["step_seconds"], np.float64)
    steps, seconds = reach(run, target)
    later = times[1:]
    return {
        "workload": workload, "optimizer": name, "steps_to_target": steps, "seconds_to_target": seconds,
        "first_step_seconds": float(times[0]),
        "median_step_seconds": float(np.median(later)) if len(later) else None,
        "amortised_step_seconds": float(np.mean(later)) if len(later) else None,
        "final_loss": final_loss(run), "target": float(target), "steps_run": int(len(times)),
        "peak_memory_mb": run["peak_memory_bytes"] / 2**20, "stopped": run["stopped"],
        "learning_rate": run.get("learning_rate"), "schedule": run.get("schedule"),
    }


def rows(workload, adam_runs, other_runs):
    """Rows of one workload: the tuned Adam ('adam') first, then every other run."""
    best = tuned(adam_runs)
    target = final_loss(best)
    out = [row(workload, "adam", best, target)]
    out += [row(workload, run["optimizer"], run, target) for run in other_runs]
    return out


def ratio(numerator, denominator):
    """numerator / denominator, None if either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def ratios(workload_rows):
    """{optimizer: {quantity: value / tuned Adam's}} for one workload's rows."""
    adam = next(r for r in workload_rows if r["optimizer"] == "adam")
    keys = ("seconds_to_target", "steps_to_target", "first_step_seconds", "amortised_step_seconds",
            "median_step_seconds", "peak_memory_mb")
    return {r["optimizer"]: {k: ratio(r[k], adam[k]) for k in keys} for r in workload_rows if r is not adam}


def _fmt(value, spec=".3g", suffix=""):
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown_table(all_rows):
    """The headline table: one line per (workload, optimizer), ratios against tuned Adam."""
    lines = [
        "| workload | optimizer | steps to target | seconds to target | × Adam | first step s (× Adam) | "
        "amortised step s (× Adam) | median step s | peak MB (× Adam) | final held-out loss |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload in dict.fromkeys(r["workload"] for r in all_rows):
        group = [r for r in all_rows if r["workload"] == workload]
        rel = ratios(group)
        for r in group:
            q = rel.get(r["optimizer"], {})
            name = r["optimizer"] + (f" (lr {r['learning_rate']:g}, {r['schedule']})" if r["optimizer"] == "adam"
                                     else "")
            lines.append(
                f"| {workload} | {name} | {_fmt(r['steps_to_target'], 'd')} | {_fmt(r['seconds_to_target'], '.1f')} | "
                f"{_fmt(q.get('seconds_to_target'), '.2f', '×')} | {r['first_step_seconds']:.1f} "
                f"({_fmt(q.get('first_step_seconds'), '.1f', '×')}) | {_fmt(r['amortised_step_seconds'], '.3f')} "
                f"({_fmt(q.get('amortised_step_seconds'), '.1f', '×')}) | {_fmt(r['median_step_seconds'], '.3f')} | "
                f"{r['peak_memory_mb']:.0f} ({_fmt(q.get('peak_memory_mb'), '.2f', '×')}) | {r['final_loss']:.4f} |")
    return "\n".join(lines)


def adam_grid_table(adam_runs_by_workload):
    """Every Adam run of the tuning grid: final held-out loss per (learning rate, schedule)."""
    lines = ["| workload | learning rate | schedule | final held-out loss | total seconds |", "|---|---|---|---|---|"]
    for workload, runs in adam_runs_by_workload.items():
        best = tuned(runs)
        for run in runs:
            mark = " **(tuned)**" if run is best else ""
            lines.append(f"| {workload} | {run['learning_rate']:g} | {run['schedule']} | "
                         f"{final_loss(run):.4f}{mark} | {sum(run['step_seconds']):.1f} |")
    return "\n".join(lines)


def plot(runs_by_workload, targets, path_prefix):
    """Held-out loss vs steps and vs seconds, one panel per workload; the tuned
    Adam, every other optimizer, the target as a dotted line. Writes
    ``{path_prefix}_loss_vs_steps.png`` and ``..._loss_vs_seconds.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for axis, column, label in (("steps", 0, "step"), ("seconds", 1, "seconds (first step included)")):
        names = list(runs_by_workload)
        fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
        for ax, workload in zip(axes[0], names):
            for name, run in runs_by_workload[workload].items():
                curve = np.asarray(run["curve"], np.float64)
                ax.plot(curve[:, column], curve[:, 2], label=name)
            ax.axhline(targets[workload], color="k", linestyle=":", linewidth=1, label="target")
            ax.set_title(workload)
            ax.set_xlabel(label)
            ax.set_yscale("log")
        axes[0][0].set_ylabel("held-out loss")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        path = f"{path_prefix}_loss_vs_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def machine():
    """CPU model, cores, TensorFlow / Keras versions, the oneDNN setting."""
    import keras
    import tensorflow as tf

    model_name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": model_name, "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS")}
