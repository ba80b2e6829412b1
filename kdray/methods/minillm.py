"""MiniLLM: sequence-level reverse KL by PPO-style policy gradient (Gu et al. 2024; microsoft/LMOps)."""

from kdray.methods.base import Method

METHOD = Method(
    name="minillm",
    summary="reverse KL by clipped policy gradient on teacher-mixed student samples, 4 PPO epochs per rollout",
    terms=(
        {
            "name": "minillm",
            "weight": 1.0,
            "params": {
                "clip": 0.2,
                "gamma": 0.95,
                "reward_scaling": 0.5,
                "reward_clip": 100.0,
                "length_normalise": True,
                "whiten": True,
                "single_step": True,
            },
        },
    ),
    needs=frozenset({"sample_scores"}),
    data="on_policy",
    on_policy_fraction=1.0,
    tokenizer="same_vocab",
    params={"ppo_epochs": 4, "mix_alpha": 0.2, "lm_coef": 0.0},
    rollout_epochs_param="ppo_epochs",
    reference="Gu et al. 2024 (MiniLLM); microsoft/LMOps minillm @4f2a9de, paper scripts",
    deviations=(
        "A rollout is one global batch (train.batch_size x grad_accum per worker) reused for "
        "ppo_epochs optimizer steps; the reference collects 256 rollouts and shuffles micro-batches.",
        "lm_coef 0 (the reference adds an LM term on OpenWebText at lm_coef 1): a distillation task has "
        "no pre-training corpus; lm_coef > 0 adds cross-entropy on the task's references the samples replaced.",
        "Whitening statistics over counted tokens (the reference includes padding): flag whiten_padding.",
        "Teacher-mixed sampling runs a copy of the teacher in the training worker: mixing needs the "
        "teacher's next-token distribution at every decoding step.",
    ),
)
