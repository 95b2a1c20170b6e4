"""The MLflow pyfunc flavor of monai_kdx classifiers.

A logged classifier is an MLflow ``pyfunc`` model whose ``loader_module`` is this module of the *installed*
package and whose only data is a :func:`monai_kdx.pruning.save_pruned` file (network spec + layer widths +
weights). Loading it runs no code from the artifact store: MLflow imports this module and calls
:func:`_load_pyfunc`, which rebuilds the network through the allow-listed network registry and loads the weights
with ``weights_only=True``.

``predict`` takes a float array of shape (N, C, *spatial) and returns class probabilities (N, K).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["LOADER_MODULE", "ClassifierModel"]

LOADER_MODULE = __name__


class ClassifierModel:
    """Softmax probabilities of a monai_kdx (pruned or unpruned) classifier, as MLflow's pyfunc calls them.

    Args:
        network: a classifier mapping (N, C, *spatial) to logits (N, K); used in eval mode on the CPU.
    """

    def __init__(self, network: nn.Module) -> None:
        self.network = network.eval()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """Class probabilities (N, K) of a float array (N, C, *spatial)."""
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return torch.softmax(self.network(batch), dim=1).numpy()


def _load_pyfunc(data_path: str, model_config: Any = None) -> ClassifierModel:
    """MLflow's entry point for ``loader_module`` flavors: the network file at ``data_path``, loaded safely."""
    from monai_kdx.pruning import load_pruned

    return ClassifierModel(load_pruned(data_path, map_location="cpu"))
