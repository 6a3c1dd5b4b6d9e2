import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _size_thread_pools_for_workers():
    """Under pytest-xdist, each worker gets its share of the cores for
    TensorFlow's thread pools (set before TensorFlow starts), so that the
    workers do not oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("TF_NUM_INTRAOP_THREADS", threads)
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", threads)


_size_thread_pools_for_workers()

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 8 (each holds its own
    TensorFlow runtime, about 1-2 GB)."""
    del config
    return max(1, min(os.cpu_count() or 1, 8))


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Every test starts with fresh layer names and fixed seeds."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    yield
