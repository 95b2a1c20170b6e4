"""MLflow "model from code" for monai_kdx classifiers: the network is rebuilt from a
``monai_kdx.pruning.save_pruned`` file (builder spec + layer widths + weights, loaded with
``weights_only=True``), so no module is pickled. MLflow executes this file when the model is loaded;
do not import it.

``predict`` takes a float array of shape (N, C, *spatial) and returns class probabilities (N, K).
"""

import mlflow
import numpy as np
import torch
from mlflow.pyfunc import PythonModel


class MonaiKdxClassifier(PythonModel):
    """Softmax probabilities of a monai_kdx (pruned or unpruned) classifier."""

    def load_context(self, context):
        from monai_kdx.pruning import load_pruned

        self.network = load_pruned(context.artifacts["network"], map_location="cpu").eval()

    def predict(self, context, model_input, params=None):
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.no_grad():
            return torch.softmax(self.network(batch), dim=1).numpy()


mlflow.models.set_model(MonaiKdxClassifier())
