"""The `register` step: the student as an MLflow model, registered under the configured name.

The last step of the workflow, and the only one whose output lives outside its directory (in the MLflow
model registry); with tracking off it records why nothing was registered.
"""

from __future__ import annotations

from typing import Any

from kdray.registry import log_student
from kdray.workflow.base import StepContext, StepResult


def register_step(ctx: StepContext, student: StepResult, evaluation: StepResult | None) -> dict[str, Any]:
    """Log the student to MLflow as a model (pyfunc over the HF checkpoint) and register it."""
    if ctx.tracker is None:
        return {"registered": None, "student": student.outputs["student"], "reason": "tracking disabled"}
    name = ctx.cfg.tracking.registered_model or f"{ctx.cfg.tracking.experiment}-student"
    d = ctx.cfg.data  # a reward head's model (`<name>-reward`) tokenizes as the run did
    tokenization = {"max_prompt_tokens": d.max_prompt_tokens, "max_response_tokens": d.max_response_tokens,
                    "chat_template": d.chat_template}  # fmt: skip
    version = log_student(
        ctx.tracker, student.outputs["student"], registered_model=name, reward_tokenization=tokenization,
        max_new_tokens=ctx.cfg.workflow.eval_max_new_tokens or d.max_response_tokens,
        chat_template=d.chat_template,
    )  # fmt: skip
    return {"registered": name, "version": version, "student": student.outputs["student"]}
