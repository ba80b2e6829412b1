"""AVA: alignment by approximated variational Bayesian IRL, AVRIL's objective with no teacher.

Two declarations share one module because they share one objective: AVA-d learns a policy and a reward
posterior from demonstrations alone (X-KD's sequence variant, where the demonstration is the data's own
response), and AVA-p adds preference pairs, ranking the chosen response above the rejected one by the
reward posterior's summed means. Neither reads anything of a teacher (`needs` is empty and no term
reads a signal), so the trainer builds no scorer, generator or pool and needs no teacher path.
"""

from kdray.methods import xkd
from kdray.methods.base import Method

#: AVRIL's objective on the demonstration: X-KD's term and reference defaults (imitation + TD-NLL +
#: prior, unit weights, γ = 1) in its sequence variant, which imitates the data's own response and so
#: reads no divergence or temperature
_AVRIL = {
    **xkd.METHOD.terms[0],
    "params": {
        **{k: v for k, v in xkd.METHOD.terms[0]["params"].items() if k not in ("divergence", "temperature")},
        "variant": "sequence",
    },
}

_REFERENCE = "AVA; AVRIL, Chan & van der Schaar 2021, XanderJC/scalable-birl @223d030"

_SHARED_DEVIATIONS = (
    xkd.METHOD.deviations[0],  # the Q and reward heads, as in X-KD
    "The reward model is r(x, y) = Σ_t μ_t over the response's tokens (kdray.reward), exported with "
    "the student as reward_head.pt and registered in MLflow as `<name>-reward`.",
)

AVA_D = Method(
    name="ava_d",
    summary="AVRIL on demonstrations, no teacher: cross-entropy + λ_td·TD-NLL + λ_kl·KL(posterior ‖ N(0,1))",
    terms=(_AVRIL,),
    needs=frozenset(),
    data="off_policy",
    tokenizer="text_only",
    reference=_REFERENCE,
    deviations=_SHARED_DEVIATIONS,
)

AVA_P = Method(
    name="ava_p",
    summary="AVA-d on the chosen response + λ_bt·Bradley–Terry on the summed reward means of each pair",
    terms=(_AVRIL, {"name": "ava_pref", "weight": 1.0, "params": {"lambda_bt": 1.0}}),
    needs=frozenset(),
    data="off_policy",
    tokenizer="text_only",
    reference=_REFERENCE,
    pairs=True,
    deviations=(
        *_SHARED_DEVIATIONS,
        "The Bradley–Terry term −log σ(Σ_t μ(chosen) − Σ_t μ(rejected)), weight λ_bt = 1, is kdray's own "
        "choice (METHODS.md: ours); AVRIL has no preference data. The rejected response is not imitated "
        "and has no TD or prior term.",
    ),
)

#: both declarations, registered by kdray.methods
METHODS = (AVA_D, AVA_P)
