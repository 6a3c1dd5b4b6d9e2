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


def test_mirrored_strategy_matches_one_device(tmp_path):
    """Fit (TKFAC / K-FAC; empirical / exact; fixed / adaptive; distributed /
    replicated inverses), custom loops with strategy.run, sampled targets
    per replica, checkpoint and .keras resume, refusal of CentralStorage."""
    out = _run("mirrored", str(tmp_path))
    assert "ALL OK" in out, out


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
            error = np.linalg.norm(got[key] - expected[key]) / max(np.linalg.norm(expected[key]), 1e-30)
            assert error <= 1e-5, f"worker {index}: {key} differs by {error:.2e}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-device training of the workers' model (global batch 32)."""
    path = tmp_path_factory.mktemp("reference") / "reference.npz"
    _run("reference", str(path))
    return path


def test_multi_worker_mirrored_strategy_matches_one_device(tmp_path, reference):
    outputs = _finish(_start_workers(tmp_path, tmp_path / "backup"))
    for code, out, err in outputs:
        assert code == 0 and "OK" in out, out + err[-4000:]
    _assert_same_as_reference(tmp_path, reference)


def test_killed_worker_resumes_from_backup_with_nothing_lost(tmp_path, reference):
    """Worker 1 dies after epoch 2 (its backup written); both workers are
    restarted (Keras' fault-tolerance contract) and BackupAndRestore resumes:
    the final weights and factors equal an uninterrupted run."""
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
