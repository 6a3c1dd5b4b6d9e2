"""tkfac_tf: TKFAC and K-FAC second-order optimizers for TensorFlow 2 / Keras 3."""

from tkfac_tf import diagnostics
from tkfac_tf.errors import RegistrationConflictError, UnsupportedLayerError
from tkfac_tf.layer_collection import LayerCollection
from tkfac_tf.optimizer import KFAC, TKFAC, KroneckerFactoredOptimizer
from tkfac_tf.preconditioned import Preconditioned

__version__ = "0.1.0"

__all__ = ["diagnostics", "LayerCollection", "RegistrationConflictError", "UnsupportedLayerError", "TKFAC", "KFAC", "KroneckerFactoredOptimizer", "Preconditioned", "__version__"]
