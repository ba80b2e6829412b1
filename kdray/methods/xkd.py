"""X-KD: experiential KD, AVRIL applied to distillation (policy + reward posterior + TD consistency)."""

from kdray.methods.base import Method

METHOD = Method(
    name="xkd",
    summary="imitation + λ_td·TD-NLL of the soft Q under the reward posterior + λ_kl·KL(posterior ‖ N(0,1))",
    terms=(
        {
            "name": "xkd",
            "weight": 1.0,
            "params": {
                "variant": "divergence",
                "divergence": "forward_kl",
                "temperature": 1.0,
                "q_form": "logits",
                "tau_q": 1.0,
                "gamma": 1.0,
                "lambda_td": 1.0,
                "lambda_kl": 1.0,
                "terminal": "drop",
                "log_sigma_min": None,
                "log_sigma_max": None,
                "detach_head_input": False,
            },
        },
    ),
    needs=frozenset({"topk_logprobs"}),
    data="off_policy",
    tokenizer="same_vocab",
    reference="X-KD (experiential KD); AVRIL, Chan & van der Schaar 2021, XanderJC/scalable-birl @223d030",
    deviations=(
        "Q is the student's LM head (Q = z/τ_Q over the vocabulary) and the reward posterior a "
        "Linear(d→2) head on the final hidden state; AVRIL uses two separate MLPs.",
        "variant: sequence imitates the demonstration's tokens (cross-entropy), variant: divergence "
        "a §1 divergence to the teacher at every position (AVRIL: log-likelihood of the demonstrator's actions).",
    ),
)
