"""PAD: preference-aligned distillation (Gu et al. 2025; EganGu/PAD, REFERENCES.md Part 2 §2).

The student learns the teacher's preference distribution over its own responses. The data are built
offline, before training (`kdray.train.pad_data`): `samples` responses per prompt from the *initial*
student, the `n` most mutually different kept, each scored by the teacher (its mean log-prob, and with
α < 1 a pairwise multiple-choice judge). A prompt becomes n consecutive rows with a per-row
`teacher_reward`; the `pad` term (`kdray.losses.pad_term`) ranks them with the student's own rewards.
The loss knobs (β, loss, jsd_form) are the term's; the sampling and reward knobs are the method's.
"""

from kdray.methods.base import Method

#: the name the trainer and the config look for (the only method whose rows come in groups of n)
NAME = "pad"

METHOD = Method(
    name=NAME,
    summary="JSD between Plackett–Luce ranking distributions of the student's and the teacher's rewards "
    "for n diverse responses sampled offline from the initial student",
    terms=({"name": "pad", "weight": 1.0, "params": {"beta": 10.0, "loss": "jsd", "jsd_form": "textbook"}},),
    # the teacher scores given responses (mean log-prob) and, with alpha < 1, judges pairs from the top-20
    # log-probs of its one answer token; it never generates training text
    needs=frozenset({"rewards"}),  # judged offline before training: no streamed signal
    data="off_policy",
    tokenizer="text_only",
    params={"n": 4, "samples": 5, "temperature": 1.0, "top_p": 0.95, "alpha": 0.0},
    reference="Gu et al. 2025 (PAD, ACL Findings); EganGu/PAD @89f2a91",
    deviations=(
        "jsd_form: textbook, ½[KL(P_T‖M) + KL(P_S‖M)] per prompt; the reference's code computes "
        "½[KL(M‖P_S) + KL(M‖P_T)] with M shared across the batch (jsd_form: reference reproduces it), "
        "which is no JSD for a batch of more than one prompt.",
        "The MCQ judge sees every pair in both A/B orders and averages them (the reference always shows "
        "the lower index as A): a judge's letter bias then cancels instead of favouring early samples.",
        "The teacher's mean log-prob covers the response's tokens under its own chat template, without "
        "an end token (Teacher.reward); a prompt whose kept responses include an empty one is dropped.",
        "Not applied: the reference's filter that keeps a prompt only if some exp(mcq) > 0.5 and some "
        "≤ 0.5 (MCQ-only runs keep every prompt with n distinct responses).",
        "Student samples are capped at objective.max_new_tokens (the reference: 4096 tokens).",
    ),
)
