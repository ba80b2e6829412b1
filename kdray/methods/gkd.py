"""GKD: JSD(β) on a mix of fixed data and student samples (Agarwal et al. 2024; TRL's GKDTrainer)."""

from kdray.methods.base import Method

METHOD = Method(
    name="gkd",
    summary="generalised JSD(β=0.5); with probability λ=0.5 a step trains on student samples",
    terms=({"name": "jsd", "weight": 1.0, "params": {"beta": 0.5, "temperature": 1.0}},),
    needs=frozenset({"topk_logprobs", "sample_scores"}),
    data="on_policy",
    on_policy_fraction=0.5,
    tokenizer="same_vocab",
    reference="Agarwal et al. 2024 (GKD); huggingface/trl GKDTrainer @f2cd577 (lmbda 0.5, beta 0.5)",
    deviations=(
        "Sampling temperature 1.0 (objective.sampling_temperature; TRL uses 0.9): the paper samples "
        "from the student at temperature 1.",
        "The λ coin is drawn once per global step and is the same on every worker (TRL draws per "
        "micro-batch and process): data-parallel ranks then train on the same kind of batch.",
        "The loss at a top-k teacher signal uses the tail bucket (exact at teacher.top_k: null).",
    ),
)
