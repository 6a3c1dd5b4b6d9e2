"""The benchmark's numbers from its runs: trailing loss, target, steps and
time to the target, ratios. Pure functions of the recorded losses and times
(no TensorFlow), so they are tested on hand-computed cases.

Definitions (docs/benchmark.md repeats them):
  loss          the minibatch training loss (before the update) averaged over
                the trailing epoch (``epoch_batches`` batches; fewer at the start).
  target        the reference's (SGD-m's) final loss.
  steps to it   the first step (1-based) whose trailing-epoch loss is <= the target.
  time to it    the summed wall-clock seconds of those steps.
"""

import numpy as np

REFERENCE = "sgd"


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
    """Trailing-epoch loss at the last step; inf if the run diverged or stopped early."""
    if len(losses) < steps or not np.all(np.isfinite(losses)):
        return float("inf")
    return float(trailing_loss(losses, window)[-1])


def steps_to(losses, target, window):
    """First step count (1-based) whose trailing-epoch loss <= target, or None."""
    hits = np.flatnonzero(trailing_loss(losses, window) <= target)
    return int(hits[0]) + 1 if len(hits) else None


def time_to(losses, times, target, window):
    """Wall-clock seconds of the steps up to and including the first one whose
    trailing-epoch loss <= target, or None if it is never reached."""
    k = steps_to(losses, target, window)
    return float(np.sum(times[:k])) if k else None


def ratio(numerator, denominator):
    """numerator / denominator, or None if either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def summarize(finals, timing, config):
    """Per-optimizer rows of the report and the target.

    ``finals``: name -> final run (``losses``, ``times``, ``peak_rss``,
    ``rss_rise``); ``timing``: name -> interleaved-timing summary or None.
    Returns (rows, target) with rows[name] holding final, steps, seconds,
    median_step_run, peak_rss_mb, rss_rise_mb, the timing summary and
    seconds_interleaved (steps × amortised step)."""
    window = epoch_batches(config)
    target = final_loss(finals[REFERENCE]["losses"], config["steps"], window)
    rows = {}
    for name, run in finals.items():
        k = steps_to(run["losses"], target, window)
        rows[name] = {
            "final": final_loss(run["losses"], config["steps"], window),
            "steps": k,
            "seconds": time_to(run["losses"], run["times"], target, window),
            "median_step_run": float(np.median(run["times"])),
            "peak_rss_mb": run["peak_rss"] / 2**20,
            "rss_rise_mb": run["rss_rise"] / 2**20,
        }
        if timing and name in timing:
            rows[name].update(timing[name])
            rows[name]["seconds_interleaved"] = k * timing[name]["amortized_step"] if k else None
    return rows, target


def speedups(rows, name, reference):
    """How much better ``name`` is than ``reference``: fewer steps, less time
    (run), less time (steps × amortised step); each reference / name or None."""
    r, ref = rows[name], rows[reference]
    return {
        "steps": ratio(ref["steps"], r["steps"]),
        "seconds": ratio(ref["seconds"], r["seconds"]),
        "seconds_interleaved": ratio(ref.get("seconds_interleaved"), r.get("seconds_interleaved")),
    }
