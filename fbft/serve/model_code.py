"""MLflow models-from-code: the pyfunc model of a saved fbft detector, any registered method.

MLflow runs this file by path (``python_model=<this file>`` in :func:`fbft.serve.pyfunc.log_model`)
when it logs and when it loads the model, so the model is code, not a pickle. Input: a DataFrame
with a ``path`` column of image files; output: path, score and, with thresholds, decision.
``FBFT_DEVICE`` chooses where it runs (default: CUDA when present).
"""

from __future__ import annotations

import os
from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from fbft.serve.pyfunc import load_artifacts, score_frame


class DetectorModel(PythonModel):
    """DataFrame with a ``path`` column -> DataFrame(path, score[, decision])."""

    def load_context(self, context: Any) -> None:
        self.detector, self.thresholds = load_artifacts(
            context.artifacts, os.environ.get("FBFT_DEVICE", "auto")
        )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        return score_frame(self.detector, model_input, self.thresholds)


mlflow.models.set_model(DetectorModel())
