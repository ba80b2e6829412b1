"""The registered reward model (models-from-code): r(x, y) = Σ_t μ_t with the export's reward head.

The logged export is the `student` artifact (the head reads the student's hidden states); the model
config holds the training's tokenization (`max_prompt_tokens`, `max_response_tokens`, `chat_template`).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


class RewardModelPyfunc(mlflow.pyfunc.PythonModel):
    """One reward per `{prompt, response}` row (`kdray.reward.RewardModel`)."""

    def load_context(self, context: Any) -> None:
        from kdray.reward import RewardModel

        self.model = RewardModel(context.artifacts["student"], **dict(context.model_config or {}))

    def predict(self, context, model_input, params=None):
        """Untyped on purpose: pyfunc passes a DataFrame whole (a `list[dict]` hint would have it convert
        the DataFrame and keep only its first column)."""
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        return self.model.scores(rows)


set_model(RewardModelPyfunc())
