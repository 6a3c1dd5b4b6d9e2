"""The benchmark's report: docs/benchmark.md and its figures, from the data of
one run (examples/benchmark.py passes it; --report_only reads it back from
benchmark.json).

Every number in the report is computed from the run's data or is a target /
setting defined below; the notes are sentences built from the data, not
measurements written as prose.
"""

import os

import numpy as np


from examples import benchmark_metrics as bm
from examples import loss_plots

ORDER = ("tkfac_adaptive", "kfac_adaptive", "tkfac", "kfac", "adam", "sgd")
LABELS = {
    "tkfac_adaptive": "TKFAC (adaptive)",
    "kfac_adaptive": "K-FAC (adaptive)",
    "tkfac": "TKFAC",
    "kfac": "K-FAC",
    "adam": "Adam",
    "sgd": "SGD-m",
}
# Targets (settings, not measurements). K-FAC's published headline on this
# autoencoder (Martens & Grosse 2015) for the fixed-hyperparameter TKFAC, and
# the targets set for adaptive TKFAC (for the 500-step --full run).
PUBLISHED_STEP_RATIO = 14.7
PUBLISHED_TIME_RATIO = 3.8
MAX_STEP_VS_ADAM = 2.0
ADAPTIVE_STEP_RATIO = 20.0
ADAPTIVE_TIME_RATIO = 4.0
ADAPTIVE_TIME_VS_ADAM = 2.0
ADAPTIVE_FINAL_LOSS = 49.0
FIGURES = ("benchmark_loss_vs_steps.png", "benchmark_loss_vs_seconds.png")
HYPERPARAMETER_FIGURE = "benchmark_hyperparameters.png"


def _fmt(value, spec="{:.3f}"):
    return "—" if value is None else spec.format(value)


def _times(value):
    return _fmt(value, "{:.2f}×")


def hyperparameter_text(run):
    """The hyperparameters an optimizer ran with, as the report states them."""
    if run.get("adaptive"):
        return "library defaults"
    return ", ".join(f"{k}={v:g}" for k, v in run["hparams"].items())


def ordered(names):
    return [n for n in ORDER if n in names] + sorted(n for n in names if n not in ORDER)


# --- figures ------------------------------------------------------------------
def plot_losses(out_dir, config, finals, target):
    """Trailing loss against steps and against measured seconds."""
    window = bm.epoch_batches(config)
    for filename, xlabel, x_of in (
        (FIGURES[0], "step", lambda run: np.arange(1, len(run["losses"]) + 1)),
        (FIGURES[1], "seconds (measured)", lambda run: np.cumsum(run["times"])),
    ):
        curves = [(LABELS.get(name, name), x_of(finals[name]), bm.trailing_loss(finals[name]["losses"], window), {})
                  for name in ordered(finals)]
        loss_plots.save_loss_figure(os.path.join(out_dir, filename), curves, xlabel, "training loss (trailing epoch)",
                                    f"MNIST autoencoder, batch {config['batch_size']}",
                                    reference=(target, "target (SGD-m final)"), log_scale=True)


def plot_hyperparameters(out_dir, finals):
    """α, μ and λ at every step of the adaptive runs (one panel each); False if none."""
    runs = {n: finals[n] for n in ordered(finals) if finals[n].get("step_hyperparameters")}
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("learning_rate", "learning rate α"), ("momentum", "momentum μ"), ("damping", "damping λ"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, panels):
        values = []
        for name, run in runs.items():
            series = np.asarray(run["step_hyperparameters"][key], np.float64)
            values.append(series[np.isfinite(series)])
            ax.plot(np.arange(1, len(series) + 1), series, label=LABELS.get(name, name))
        values = np.concatenate(values) if values else np.array([])
        if key != "momentum" and len(values):
            ax.set_yscale("log" if np.all(values > 0) else "symlog")
        ax.set(xlabel="step", ylabel=label, title=label)
        ax.legend()
    fig.suptitle("Adaptive optimizers: hyperparameters chosen at each step")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, HYPERPARAMETER_FIGURE), dpi=110)
    plt.close(fig)
    return True


# --- markdown -------------------------------------------------------------------
def _workload(config, finals):
    fixed = [n for n in ("tkfac", "kfac") if n in finals]
    text = (
        "**Workload:** MNIST deep autoencoder 784-1000-500-250-30-250-500-1000-784, tanh (linear code layer), "
        "sigmoid cross-entropy summed over pixels, averaged over the batch; "
        f"batch {config['batch_size']}; data: {config['source']} ({config['num_examples']} images); "
        f"{config['steps']} steps per optimizer; same initial weights (seed {config['seed']}) and batch order for all. "
        "SGD-m: momentum 0.9."
    )
    if fixed:
        text += (
            f" {' / '.join(LABELS[n] for n in fixed)}: covariance update every {config['cov_update_every']} step(s), "
            f"inverses every {config['inv_update_every']} steps, momentum 0.9, EMA decay "
            f"{config.get('cov_ema_decay', 0.95):.4g} per covariance update, sampled "
            "('gradients') Fisher; learning rate, damping and KL clip from the search below."
        )
    for name in ordered(finals):
        run = finals[name]
        if run.get("adaptive"):
            schedule = run.get("schedule") or {}
            text += (
                f" {LABELS.get(name, name)}: library defaults (`{'TKFAC' if name.startswith('tkfac') else 'KFAC'}"
                ".adaptive`), learning rate, momentum and damping chosen every step, no search; covariance update "
                f"every {_fmt(schedule.get('cov_update_every'), '{}')} step(s), inverses every "
                f"{_fmt(schedule.get('inv_update_every'), '{}')} steps."
            )
    options = config.get("step_options")
    if options and (fixed or any(finals[n].get("adaptive") for n in finals)):
        def describe(o):
            return ", ".join(f"{k}={v}" for k, v in sorted(o.items()))
        text += (
            f" Step options (docs/performance.md): fixed rows {describe(options.get('fixed') or {})}; adaptive rows "
            f"{describe(options.get('adaptive') or {})}, curvature products on the first "
            f"{config.get('curvature_examples') or config['batch_size']} examples."
        )
    return text + f" XLA: {'on' if config['jit_compile'] else 'off'}."


def _target_row(description, value, bound, at_least, shown):
    """One row of the targets table; a miss says by how much."""
    if value is None:
        return f"| {description} | — | no (not reached) |"
    if at_least:
        met = value >= bound
        miss = f"no: {value / bound:.0%} of the target" if bound else "no"
    else:
        met = value <= bound
        miss = f"no: {value / bound:.2f}× the bound" if bound else "no"
    return f"| {description} | {shown} | {'yes' if met else miss} |"


def _speed_targets(rows, name, against, step_ratio, time_ratio):
    """Rows: ``name`` needs ≥ step_ratio× fewer steps and ≥ time_ratio× less
    time than SGD-m (``time_ratio`` against ``against``, e.g. Adam, too)."""
    label = LABELS[name]
    s = bm.speedups(rows, name, "sgd")
    lines = [_target_row(f"{label} ≥ {step_ratio:g}× fewer steps than SGD-m", s["steps"], step_ratio, True,
                         _times(s["steps"]))]
    for reference, ratio in (("sgd", time_ratio), (against, ADAPTIVE_TIME_VS_ADAM)):
        if reference is None or reference not in rows:
            continue
        v = bm.speedups(rows, name, reference)
        target = "SGD-m" if reference == "sgd" else f"{LABELS[reference]} to the target"
        lines.append(_target_row(f"{label} ≥ {ratio:g}× less time than {target}", v["seconds"], ratio, True,
                                 f"{_times(v['seconds'])} measured in the runs; "
                                 f"{_times(v['seconds_interleaved'])} from steps × interleaved amortised step"))
    return lines


def _no_more_steps(rows, name, other):
    t, k = rows[name]["steps"], rows[other]["steps"]
    met = t is not None and (k is None or t <= k)
    return f"| {LABELS[name]} steps ≤ {LABELS[other]} steps | {_fmt(t, '{}')} vs {_fmt(k, '{}')} | {'yes' if met else 'no'} |"


def _targets(rows, timing):
    lines = []
    if "tkfac" in rows:
        lines += _speed_targets(rows, "tkfac", None, PUBLISHED_STEP_RATIO, PUBLISHED_TIME_RATIO)
        if "kfac" in rows:
            lines.append(_no_more_steps(rows, "tkfac", "kfac"))
        if timing and "adam" in timing and "tkfac" in timing:
            r = timing["tkfac"]["amortized_step"] / timing["adam"]["amortized_step"]
            lines.append(_target_row(f"amortised TKFAC step ≤ {MAX_STEP_VS_ADAM:g}× an Adam step", r,
                                     MAX_STEP_VS_ADAM, False, f"{r:.2f}×"))
    if "tkfac_adaptive" in rows:
        a = rows["tkfac_adaptive"]
        lines += _speed_targets(rows, "tkfac_adaptive", "adam", ADAPTIVE_STEP_RATIO, ADAPTIVE_TIME_RATIO)
        lines.append(_target_row(f"TKFAC (adaptive) final loss ≤ {ADAPTIVE_FINAL_LOSS:g} (target set for `--full`)",
                                 a["final"] if np.isfinite(a["final"]) else None, ADAPTIVE_FINAL_LOSS, False,
                                 f"{a['final']:.2f}"))
        if "kfac_adaptive" in rows:
            lines.append(_no_more_steps(rows, "tkfac_adaptive", "kfac_adaptive"))
    for name in ("tkfac_adaptive", "kfac_adaptive"):
        if name in rows:
            final = rows[name]["final"]
            lines.append(f"| {LABELS[name]} does not diverge | final loss {final:.2f} | "
                         f"{'yes' if np.isfinite(final) else 'no'} |")
    if not lines:
        return []
    return [
        "",
        "## Targets",
        "",
        f"Fixed-hyperparameter TKFAC: K-FAC's published headline on this autoencoder ({PUBLISHED_STEP_RATIO:g}× "
        f"fewer updates, {PUBLISHED_TIME_RATIO:g}× less time than SGD with momentum to the same loss), no more steps "
        "than K-FAC, and an amortised step of at most "
        f"{MAX_STEP_VS_ADAM:g}× an Adam step. Adaptive TKFAC: the targets set for it in the 500-step `--full` run.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ] + lines


def _notes(config, finals, rows, target, timing, flops):
    """Sentences computed from this run's data."""
    window = bm.epoch_batches(config)
    names = ordered(finals)
    notes = ["", "## Notes", ""]
    fixed = [n for n in ("tkfac", "kfac") if n in finals]
    clipped = [n for n in fixed if finals[n]["hparams"].get("norm_constraint")]
    if clipped:
        notes.append(
            f"* **KL clipping.** The searched {' / '.join(LABELS[n] for n in clipped)} settings use KL clipping "
            "(`norm_constraint`, see the search below)."
            + (" The adaptive rows run without it." if any(finals[n].get("adaptive") for n in names) else "")
        )
    for name in names:
        run = finals[name]
        losses = np.asarray(run["losses"], np.float64)
        if not run.get("adaptive") or not len(losses):
            continue
        finite = losses[np.isfinite(losses)]
        sentence = (
            f"* **{LABELS.get(name, name)}** (library defaults): minibatch loss {losses[0]:.2f} at the first step, "
            f"highest {finite.max():.2f} (step {int(np.argmax(losses == finite.max())) + 1}), "
            f"final trailing-epoch loss {rows[name]['final']:.2f}"
        )
        if len(losses) < config["steps"] or len(finite) < len(losses):
            sentence += f"; stopped at step {len(losses)} on a non-finite loss"
        hp = run.get("step_hyperparameters") or {}
        if hp.get("learning_rate"):
            lr, mu, lam = (np.asarray(hp[k], np.float64) for k in ("learning_rate", "momentum", "damping"))
            sentence += (
                f". Chosen per step: α from {np.nanmin(lr):.3g} to {np.nanmax(lr):.3g} (median {np.nanmedian(lr):.3g}), "
                f"μ from {np.nanmin(mu):.3g} to {np.nanmax(mu):.3g} (median {np.nanmedian(mu):.3g}); "
                f"λ {lam[0]:.3g} after the first step, {lam[-1]:.3g} after the last"
            )
        fixed_name = name.replace("_adaptive", "")
        if fixed_name in rows:
            sentence += (
                f". Against {LABELS[fixed_name]} with its searched settings: {_fmt(rows[name]['steps'], '{}')} "
                f"against {_fmt(rows[fixed_name]['steps'], '{}')} steps to the target"
            )
            if timing and name in timing and fixed_name in timing:
                extra = timing[name]["amortized_step"] - timing[fixed_name]["amortized_step"]
                sentence += (
                    f", amortised step {timing[name]['amortized_step']:.3f} s against "
                    f"{timing[fixed_name]['amortized_step']:.3f} s ({extra:+.3f} s per step for the adaptive work: "
                    "curvature products, the extra forward pass, the damping update)"
                )
        notes.append(sentence + ".")
    ref = np.asarray(finals["sgd"]["losses"], np.float64)
    best = min(names, key=lambda n: rows[n]["final"])
    notes.append(
        "* **Read the step ratios with the target in mind.** SGD-m's trailing-epoch loss went from "
        f"{bm.trailing_loss(ref, window)[0]:.2f} at step 1 to the target {target:.2f} at step {len(ref)}; the lowest "
        f"final loss here is {rows[best]['final']:.2f} ({LABELS.get(best, best)}). Steps to target only compare the "
        "optimizers at SGD-m's level; the final losses show the progress past it. More steps (`--full`) give SGD-m "
        "a lower target."
    )
    if flops:
        notes += [
            "* **Where the TKFAC step's cost goes and the options that cut it** (the profile below; "
            "docs/performance.md has the measurements behind each):",
            "  1. `cov_batch_size`: the factor statistics on a random subset of the batch; the factor-statistics "
            f"matmuls ({flops['factor statistics']:.1f} GFLOP per step on the whole batch) scale with it, the sampled "
            f"backward ({flops['sampled Fisher backward']:.1f} GFLOP) does not (it runs on the step's own forward "
            "pass). `cov_update_every` > 1 skips whole updates instead.",
            f"  2. `matmul_dtype='bfloat16'`: the statistics and the preconditioning L̂⁻¹ ∇Θ R̂⁻¹ "
            f"({flops['preconditioning']:.1f} GFLOP per step) in bfloat16; faster only on hardware with native "
            "bfloat16 (AVX512_BF16 / AMX under oneDNN, GPUs).",
            "  3. The inverse update (Cholesky D = LLᵀ, L⁻¹ by blocked products, D⁻¹ = L⁻ᵀL⁻¹; "
            f"{flops['inverses (Cholesky, L⁻¹, L⁻ᵀL⁻¹), per inversion']:.1f} GFLOP per inversion) is "
            f"amortised over the interval ({config['inv_update_every']} steps in this run); Cholesky measured fastest "
            "(`inverse_method`).",
            "  4. The adaptive step's curvature products: `curvature_batch_size` in `fit` (in a custom loop, "
            "`apply_gradients(..., curvature_loss_fn=...)` over the first n examples).",
            f"  5. XLA (`--jit_compile`) was {'on' if config['jit_compile'] else 'off'} in this run; on CPU it "
            "makes the inverse steps slower (XLA expands Cholesky into loops), see docs/performance.md.",
        ]
    return notes


def gflops(config):
    """Floating-point work per step (GFLOP) of the parts of a TKFAC step, from the layer shapes."""
    from examples import models

    sizes = (784,) + models.AUTOENCODER_SIZES + (784,)
    n = config["batch_size"]
    shapes = [(d_in + 1, d_out) for d_in, d_out in zip(sizes[:-1], sizes[1:])]
    params = sum(a * g for a, g in shapes)
    return {
        "gradient (forward + backward)": 6 * params * n / 1e9,
        "sampled Fisher backward": 2 * params * n / 1e9,
        "factor statistics": sum(2 * n * (a * a + g * g) for a, g in shapes) / 1e9,
        "preconditioning": sum(2 * (a * a * g + a * g * g) for a, g in shapes) / 1e9,
        # n³/3 (Cholesky) + 2n³/3 (L⁻¹: dense products of the blocked recursion) + 2n³ (L⁻ᵀL⁻¹).
        "inverses (Cholesky, L⁻¹, L⁻ᵀL⁻¹), per inversion": sum(3 * (a**3 + g**3) for a, g in shapes) / 1e9,
    }


def _options_text(entry):
    options = entry.get("options") or {}
    text = ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "library defaults"
    if entry.get("cov_update_every"):
        text += f"; covariance update every {entry['cov_update_every']} step(s)"
    if entry.get("curvature_examples"):
        text += f"; curvature on {entry['curvature_examples']} examples"
    return text


def _profile_section(profile, timing, config):
    """``profile``: {'before': profile_tkfac result, 'after': ...}."""
    before, after = profile["before"], profile["after"]
    lines = [
        "",
        "## Profile of one TKFAC step",
        "",
        "Each part compiled as its own `tf.function` and timed alone (median of repeats); "
        "\"alone\" rows time the matmuls on random tensors of the real shapes. Before: "
        f"{_options_text(before)}. After: {_options_text(after)}. Each column in its own process (its peak RSS "
        "below); the columns are timed one after the other, so on a shared machine compare their ratios with care.",
        "",
        "| part | before (s) | after (s) | after / before |",
        "|---|---|---|---|",
    ]
    for label, seconds in before["parts"].items():
        new = after["parts"].get(label)
        lines.append(f"| {label} | {seconds:.3f} | {_fmt(new)} | {_times(bm.ratio(new, seconds))} |")
    lines.append(f"| peak RSS of the profiling process (rise over the start) | {before['peak_rss_mb']:.0f} MB "
                 f"({before['rss_rise_mb']:+.0f} MB) | {after['peak_rss_mb']:.0f} MB ({after['rss_rise_mb']:+.0f} MB) "
                 f"| {_times(bm.ratio(after['peak_rss_mb'], before['peak_rss_mb']))} |")
    if timing and "tkfac" in timing:
        lines += ["", f"Amortised full TKFAC step with this run's settings (interleaved timing): "
                      f"{timing['tkfac']['amortized_step']:.3f} s."]
        for name in ("tkfac_adaptive", "kfac_adaptive"):
            fixed = name.replace("_adaptive", "")
            if name in timing and fixed in timing:
                extra = timing[name]["amortized_step"] - timing[fixed]["amortized_step"]
                lines.append(f"Adaptive work per step (amortised {LABELS[name]} step − {LABELS[fixed]} step, "
                             f"interleaved timing): {extra:.3f} s.")
    before_every, after_every = (entry.get("cov_update_every", config["cov_update_every"])
                                 for entry in (before, after))
    return lines + _limits_section(after["parts"], timing, config, after_every,
                                   _limits_section_sum(before["parts"], config, before_every))


def _limits_section_sum(parts, config, cov_every):
    """Seconds per TKFAC step from the profiled parts: gradient + covariance
    update (without its forward pass) / its interval + apply + inverse
    update / its interval."""
    covariance = parts["forward + covariance update"] - parts["forward only"]
    return (parts["forward + backward (gradient)"] + covariance / cov_every
            + parts["apply_gradients (precondition + momentum)"]
            + parts["inverse update (all blocks)"] / config["inv_update_every"])


def _limits_section(profile, timing, config, cov_every, total_before=None):
    """What limits the TKFAC step (the 'after' parts, covariance update every
    ``cov_every`` steps), from the profile and the FLOP counts;
    ``total_before``: the same sum for the 'before' parts."""
    every = config["inv_update_every"]
    grad = profile["forward + backward (gradient)"]
    cov = (profile["forward + covariance update"] - profile["forward only"]) / cov_every
    stats = profile["factor statistics matmuls alone"] / cov_every
    apply = profile["apply_gradients (precondition + momentum)"]
    inverse = profile["inverse update (all blocks)"]
    parts = {
        "gradient (what SGD / Adam also pay)": grad,
        f"covariance update / {cov_every}: sampled backward + factor statistics + EMA": cov,
        "  of which the factor statistics matmuls": stats,
        "apply_gradients: preconditioning + momentum": apply,
        f"inverse update / {every}": inverse / every,
    }
    total = _limits_section_sum(profile, config, cov_every)
    lines = [
        "",
        "### What limits the TKFAC step",
        "",
        f"Sum of the parts at this schedule (covariance every {cov_every}, inverse every {every} steps), "
        f"after: {total:.3f} s per step"
        + (f" (before: {total_before:.3f} s, {total / total_before:.2f}×)." if total_before else "."),
        "",
        "| part | s / step | share |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {value:.3f} | {100 * value / total:.0f}% |" for label, value in parts.items()]
    flops = gflops(config)
    lines += ["", "Work per step (GFLOP, from the layer shapes, batch "
              f"{config['batch_size']}):", "", "| part | GFLOP |", "|---|---|"]
    lines += [f"| {label} | {value:.1f} |" for label, value in flops.items()]
    if timing and "adam" in timing and "tkfac" in timing:
        t = timing["tkfac"]
        for period in (every, 4 * every):
            amort = ((period - 1) * t["median_step"] + t["median_inverse_step"]) / period
            lines.append("")
            lines.append(
                f"From the interleaved medians, with the inverse every {period} steps the amortised TKFAC step is "
                f"{amort:.3f} s = {amort / timing['adam']['amortized_step']:.2f}× an Adam step."
            )
    return lines


def markdown(config, searches, finals, rows, target, timing, profile, machine):
    """The text of docs/benchmark.md."""
    names = ordered(finals)
    window = bm.epoch_batches(config)
    ref = rows["sgd"]
    labels = [LABELS.get(n, n) for n in names]
    lines = [
        f"# Benchmark: {', '.join(labels[:-1])} and {labels[-1]}" if len(labels) > 1 else f"# Benchmark: {labels[0]}",
        "",
        f"Produced by `{config.get('command', 'python -m examples.benchmark')}` "
        "(committed code; numbers below are from that run).",
        "",
        f"**Machine:** {machine}.",
        "",
        _workload(config, finals),
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
        s = bm.speedups(rows, name, "sgd")
        lines.append(
            f"| {LABELS.get(name, name)} | {hyperparameter_text(finals[name])} | {r['final']:.2f} | "
            f"{_fmt(r['steps'], '{}')} | {_fmt(r['seconds'], '{:.1f} s')} | "
            f"{_fmt(r.get('seconds_interleaved'), '{:.1f} s')} | {r['median_step_run']:.3f} s | "
            f"{_fmt(r.get('median_step'))} / {_fmt(r.get('amortized_step'))} s | "
            f"{r['peak_rss_mb']:.0f} MB ({r['rss_rise_mb']:+.0f} MB) | "
            f"{_times(s['steps'])} fewer / {_times(s['seconds'])} less / "
            f"{_times(bm.ratio(r.get('amortized_step'), ref.get('amortized_step')))} / "
            f"{_times(bm.ratio(r['peak_rss_mb'], ref['peak_rss_mb']))} |"
        )
    cycles = sorted({t.get("cycle", config["inv_update_every"]) for t in (timing or {}).values()})
    lines += [
        "",
        "Ratios: steps and time are SGD-m's divided by the optimizer's (bigger is better); the amortised step and "
        "peak RSS are the optimizer's divided by SGD-m's. \"—\": did not reach the target.",
        "",
        "Time to target (run) sums the measured wall-clock of the training steps of the final run (tracing excluded). "
        "On a machine shared with other jobs it is noisy; the column beside it multiplies the steps by the amortised "
        "step time from the interleaved timing phase (all optimizers timed in alternating rounds of one schedule "
        f"cycle = {' or '.join(str(c) for c in cycles) or config['inv_update_every']} steps, the least common "
        f"multiple of the covariance and inverse intervals; {config['timing_rounds']} rounds, so load hits them "
        "alike). Median step: the mean of a cycle's steps without an inverse update (median over rounds); "
        "amortised = the mean over a whole cycle (median over rounds).",
        "",
        "Peak memory: peak resident set size (VmHWM in /proc/self/status) of each final run's own process (the runs are "
        "spawned one per process), and in brackets its rise over the RSS right before the model and optimizer were "
        "built (TensorFlow runtime and data excluded). tracemalloc / tf.config.experimental.get_memory_info do not see "
        "TensorFlow's CPU allocations.",
        "",
        "![loss vs steps](benchmark_loss_vs_steps.png)",
        "![loss vs seconds](benchmark_loss_vs_seconds.png)",
    ]
    if any(finals[n].get("step_hyperparameters") for n in names):
        lines += [
            "",
            "Learning rate α and momentum μ used by each step of the adaptive runs, and the damping λ after it:",
            "",
            f"![adaptive hyperparameters]({HYPERPARAMETER_FIGURE})",
        ]
    lines += [
        "",
        "## Hyperparameter search",
        "",
        f"Each grid point trained for {config['search_steps']} steps from the same start; the lowest final "
        "(trailing-epoch) loss wins; diverged runs score inf. Optimizers with a single setting are not searched.",
        "",
        "| optimizer | hyperparameters | final loss after the search run |",
        "|---|---|---|",
    ]
    for name in names:
        results = searches.get(name) or []
        if not results:
            lines.append(f"| {LABELS.get(name, name)} | {hyperparameter_text(finals[name])} | not searched |")
        for result in results:
            hp = ", ".join(f"{k}={v:g}" for k, v in result["hparams"].items())
            lines.append(f"| {LABELS.get(name, name)} | {hp} | {result['score']:.2f} |")
    lines += _targets(rows, timing)
    lines += _notes(config, finals, rows, target, timing, gflops(config) if "tkfac" in finals else None)
    if profile:
        lines += _profile_section(profile, timing, config)
    return "\n".join(lines) + "\n"


def write_report(out_dir, config, searches, finals, rows, target, timing, profile, machine):
    """Writes benchmark.md and the figures into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    plot_losses(out_dir, config, finals, target)
    plot_hyperparameters(out_dir, finals)
    with open(os.path.join(out_dir, "benchmark.md"), "w") as f:
        f.write(markdown(config, searches, finals, rows, target, timing, profile, machine))
