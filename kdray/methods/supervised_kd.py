"""Supervised (word-level) KD: a divergence to the teacher on ground-truth responses (Hinton et al. 2015)."""

from kdray.methods.base import Method

METHOD = Method(
    name="supervised_kd",
    summary="forward KL to the teacher's distribution at every token of the data's responses",
    terms=({"name": "forward_kl", "weight": 1.0, "params": {"temperature": 1.0}},),
    needs=frozenset({"topk_logprobs"}),
    data="off_policy",
    tokenizer="same_vocab",
    reference="Hinton et al. 2015; Kim & Rush 2016 (word-level KD)",
    deviations=(
        "A served top-k teacher gives a (k+1)-way tail-bucket KL, a lower bound of the full KL "
        "(exact with teacher.top_k: null); METHODS.md §2.",
    ),
)
