"""AVA-p's preference term: Bradley–Terry on the reward posterior's summed means (METHODS.md §3, ours).

AVA is AVRIL with no teacher: the X-KD objective (`kdray.losses.xkd`, `variant="sequence"`) imitates the
demonstrations, and its reward head learns a Gaussian posterior N(μ_t, σ_t²) over the per-token reward.
With preference pairs the chosen response is the demonstration, and the head is also asked to rank it
above the rejected one:

    r(x, y) = Σ_t μ_t over the response's tokens,   L_BT = −log σ(r(x, y_chosen) − r(x, y_rejected))

Pairs arrive as consecutive rows of one micro-batch, chosen then rejected, marked by a per-row
`pair_sign` (+1 chosen, −1 rejected, 0 a row with no partner). The X-KD term never sees the rejected
rows (`kdray.train.step.loss_mask` drops them), so only this term reads them. The term is averaged over
the *global* number of pairs of the step (`num_pairs` in the batch), as the token terms are averaged
over the global token count, so gradient accumulation and data parallelism leave it unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class PairLayoutError(ValueError):
    """The rows of a micro-batch are not chosen/rejected pairs at positions (2i, 2i + 1)."""


def check_pair_layout(pair_sign: Tensor) -> None:
    """Raise PairLayoutError unless every +1 row sits at an even position with its −1 row right after.

    A pair split across micro-batches or workers would silently rank a response against another
    prompt's: the pipeline keeps pairs whole (`kdray.data.pipeline.paired_rows`) and this check says so
    loudly if that ever fails.
    """
    sign = pair_sign.detach().reshape(-1).long().cpu()
    if sign.numel() % 2:
        raise PairLayoutError(
            f"a micro-batch of preference pairs has {sign.numel()} rows; pairs need an even train.batch_size"
        )
    first, second = sign[0::2], sign[1::2]
    ok = ((first == 1) & (second == -1)) | ((first == 0) & (second == 0))
    if not bool(ok.all()):
        i = int((~ok).nonzero()[0, 0])
        raise PairLayoutError(
            f"micro-batch rows {2 * i} and {2 * i + 1} have pair_sign {int(first[i])}, {int(second[i])}; "
            "expected +1 (chosen) then -1 (rejected), or 0, 0 (two unpaired rows). A pair was split "
            "across micro-batches or workers: feed pairs through kdray.data.pipeline.paired_rows"
        )


def sequence_rewards(reward_mu: Tensor, mask: Tensor) -> Tensor:
    """r = Σ_t μ_t over each row's counted positions, (B, T) + (B, T) -> (B,), in float32 or wider.

    μ at position t is the reward of the action taken in state t (the token at t + 1), so the loss
    batch's shifted mask selects exactly the response's actions, EOS included.
    """
    mu = reward_mu if reward_mu.dtype == torch.float64 else reward_mu.float()
    return (mu * mask.to(mu.dtype)).sum(dim=-1)


def bradley_terry(chosen: Tensor, rejected: Tensor) -> Tensor:
    """−log σ(r_chosen − r_rejected), elementwise; softplus keeps it finite for any margin."""
    return F.softplus(rejected - chosen)


def ava_pref_loss(
    reward_mu: Tensor,
    mask: Tensor,
    pair_sign: Tensor,
    *,
    lambda_bt: float = 1.0,
    num_pairs: int | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """λ_bt × the Bradley–Terry loss summed over this micro-batch's pairs / `num_pairs` (global count).

    `mask` (B, T) is every row's response mask, rejected rows included; `pair_sign` (B,) marks the pairs.
    `num_pairs` defaults to this micro-batch's pairs. Sub-terms (logged, not optimised): `bt` (the
    unweighted loss), `accuracy` (share of pairs with r_chosen > r_rejected) and `margin` (mean
    r_chosen − r_rejected), each on the same global scale as the loss, so summing micro-batches and
    workers gives the step's value.
    """
    if not lambda_bt >= 0:
        raise ValueError(f"ava_pref lambda_bt={lambda_bt!r} must be >= 0")
    check_pair_layout(pair_sign)
    rewards = sequence_rewards(reward_mu, mask)
    paired = pair_sign.reshape(-1)[0::2].to(rewards.device) == 1
    chosen, rejected = rewards[0::2][paired], rewards[1::2][paired]
    if num_pairs is None:
        num_pairs = int(paired.sum())
    denom = torch.as_tensor(num_pairs, dtype=rewards.dtype, device=rewards.device).clamp_min(1)
    bt = bradley_terry(chosen, rejected).sum() / denom
    with torch.no_grad():
        margin = (chosen - rejected).detach()
        subs = {
            "bt": bt.detach(),
            "accuracy": (margin > 0).to(rewards.dtype).sum() / denom,
            "margin": margin.sum() / denom,
        }
    return lambda_bt * bt, subs


def ava_pref_term(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    teacher_signal: Mapping[str, Tensor] | None = None,
    *,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    **params: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective's `ava_pref` term: reads the reward head's μ and the pairs from the loss batch."""
    for key, hint in (
        ("reward_mu", "the reward head's output, see kdray.models.RewardHead"),
        ("pair_sign", "preference pairs: set data.preferences: true"),
        ("pair_mask", "every row's response mask, from kdray.train.step.student_forward"),
    ):
        if key not in batch:
            raise KeyError(
                f"loss term 'ava_pref' needs batch[{key!r}] ({hint}); the batch has {sorted(batch)}"
            )
    return ava_pref_loss(
        batch["reward_mu"], batch["pair_mask"], batch["pair_sign"], num_pairs=batch.get("num_pairs"), **params
    )
