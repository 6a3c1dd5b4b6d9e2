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


def _compile_xla_unoptimised():
    """XLA compiles the same HLO into unoptimised machine code (LLVM -O0):
    the tests' XLA steps compile in about half the time, and every test
    compares numbers within tolerances that hold for any summation order."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()


_compile_xla_unoptimised()

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
    """Every test starts with fresh layer names and fixed seeds (without
    clear_session's full garbage collection: 0.2 s per test)."""
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)
    yield


# Modules whose tests take 10-40 s each (subprocesses, XLA-compiled
# Transformers, the suite's runs): collected first, so that parallel workers
# finish together instead of one of them starting such a test last.
LONG_TEST_MODULES = ("test_distribute.py", "test_keras_hub.py", "test_suite.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: item.path.name not in LONG_TEST_MODULES)  # stable
