"""The registered student (models-from-code): greedy answers as the evaluate step generates them.

Loaded by `mlflow.pyfunc.load_model`; the logged export is the `student` artifact and the model config
holds the evaluation's generation settings (`max_new_tokens`, `chat_template`, `batch_size`).
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


class StudentModel(mlflow.pyfunc.PythonModel):
    """Greedy generation with a distilled student loaded by transformers from the logged export."""

    def load_context(self, context: Any) -> None:
        from kdray.teacher.teacher import Teacher

        config = context.model_config or {}
        self.max_new_tokens = int(config.get("max_new_tokens", 64))
        self.chat_template = bool(config.get("chat_template", True))
        self.batch_size = int(config.get("batch_size", 32))
        self.model = Teacher(
            context.artifacts["student"],
            top_k=1,
            batch_size=self.batch_size,
            chat_template=self.chat_template,
        )

    def predict(
        self, context: Any, model_input: list[str], params: dict[str, Any] | None = None
    ) -> list[str]:
        """Greedy answers to the prompts, rendered as in training (the chat template and generation
        settings of the run's evaluation): the evaluate step's own generation path. The type hints let
        pyfunc accept a `prompt` DataFrame."""
        from kdray.eval.evaluate import greedy_generations

        return greedy_generations(
            self.model, list(model_input), max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
            chat_template=self.chat_template, desc="generating (registered student)",
        )  # fmt: skip


set_model(StudentModel())
