"""Examples and benchmarks of tkfac_tf, run from the repository root as
modules: ``python -m examples.benchmark``, ``python -m examples.classifier_mnist``."""
