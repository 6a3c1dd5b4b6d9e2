"""tkfac_tf: TKFAC and K-FAC second-order optimizers for TensorFlow 2 / Keras 3."""

import setuptools

setuptools.setup(
    name="tkfac_tf",
    version="0.1.0",
    description=(
        "Trace-restricted Kronecker-factored (TKFAC) and K-FAC natural-gradient "
        "optimizers for TensorFlow 2 / Keras 3"
    ),
    packages=setuptools.find_packages(include=["tkfac_tf", "tkfac_tf.*"]),
    package_data={"tkfac_tf": ["py.typed"]},
    python_requires=">=3.9",
    install_requires=["tensorflow>=2.16", "keras>=3.0", "numpy", "absl-py"],
    extras_require={
        "test": ["pytest", "pytest-xdist", "scikit-learn", "mlxtend", "matplotlib", "tensorboard",
                 "keras-hub>=0.32"],
        "hub": ["keras-hub>=0.32"],
        "examples": ["scikit-learn", "mlxtend", "matplotlib", "tensorboard"],
    },
)
