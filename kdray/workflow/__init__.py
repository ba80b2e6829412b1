"""The distillation workflow as a DAG of cached steps, composed with Ray's DAG API.

    data → teacher → teacher_outputs ─┬→ distill ──┬→ evaluate → register
                                      └→ baseline ─┘   (baseline: reads no teacher output; it
                                                        waits for the teacher pass only for its cores)

Each step takes flat inputs (the config, the outputs of the steps it depends on) and writes one artifact
directory, `<cache_dir>/<step>-<key>`, whose key hashes the config sections the step reads, the contents
of the local files it reads (data, checkpoints), the keys of its inputs and the package's code; the
directory's `_KEY.json` records those components, so `kdray run --explain` can say why a step will run
again. A step's directory counts as finished only once its `_DONE.json`
(written last, holding the step's outputs) exists, so re-running the workflow skips finished steps and a
run killed in the middle starts again at the step it died in; inside `distill`, Ray Train resumes from
the step's last checkpoint. Changing a config section re-runs exactly the steps that read it and the
steps after them.

Steps run as Ray tasks pinned to the driver's node (their directories are local paths); the work inside
them (teacher actors, Ray Data, Ray Train workers) spreads over the cluster as configured.

The modules: `keys` (what a step's key hashes), `base` (what a step receives and returns), one module
per step (`data`, `teacher`, `teacher_outputs`, `distill` with the baseline, `evaluate`, `register`),
`dag` (the wiring and `run_step`, the Ray task), `run` (`run_workflow`) and `explain`
(`kdray run --explain`). Every public name is re-exported here.
"""

from __future__ import annotations

from kdray.workflow.base import StepContext, StepResult
from kdray.workflow.dag import (
    STEPS,
    build_dag,
    clear_step,
    dag_steps,
    prefix_keys,
    run_step,
    run_teacher_steps,
)
from kdray.workflow.data import data_step
from kdray.workflow.distill import baseline_step, distill_step
from kdray.workflow.evaluate import evaluate_step, format_table, summary_metrics
from kdray.workflow.explain import explain_steps
from kdray.workflow.keys import (
    DONE,
    KEY,
    STEP_FILES,
    STEP_SECTIONS,
    cache_root,
    finished,
    key_components,
    key_of,
    step_key,
    teacher_outputs_wanted,
)
from kdray.workflow.register import register_step
from kdray.workflow.run import WorkflowResult, lineage_tags, run_workflow
from kdray.workflow.teacher import teacher_step
from kdray.workflow.teacher_outputs import teacher_outputs_step

__all__ = [
    "DONE",
    "KEY",
    "STEPS",
    "STEP_FILES",
    "STEP_SECTIONS",
    "StepContext",
    "StepResult",
    "WorkflowResult",
    "baseline_step",
    "build_dag",
    "cache_root",
    "clear_step",
    "dag_steps",
    "data_step",
    "distill_step",
    "evaluate_step",
    "explain_steps",
    "finished",
    "format_table",
    "key_components",
    "key_of",
    "lineage_tags",
    "prefix_keys",
    "register_step",
    "run_step",
    "run_teacher_steps",
    "run_workflow",
    "step_key",
    "summary_metrics",
    "teacher_outputs_step",
    "teacher_outputs_wanted",
    "teacher_step",
]
