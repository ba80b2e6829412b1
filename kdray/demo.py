"""The minimal demo: every loss of the library on two tiny causal LMs, printed as a table.

It runs in seconds on a laptop CPU and touches the real code paths: a transformers model forward,
dense and top-k teacher signals, the X-KD reward head, TAID, and the objective builder.
"""

from __future__ import annotations

import torch

from kdray.losses import DIVERGENCES, Term, build_objective
from kdray.models import RewardHead
from kdray.models.tiny import tiny_causal_lm


def _signal(teacher_logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    logp = torch.log_softmax(teacher_logits, dim=-1)
    values, ids = logp.topk(k, dim=-1)
    return {"topk_ids": ids.to(torch.int32), "topk_logprobs": values}


def run_demo(seed: int = 0, vocab_size: int = 128, k: int = 8) -> dict[str, float]:
    """Compute every loss term on a random batch of two tiny models; print and return the values."""
    torch.manual_seed(seed)
    teacher = tiny_causal_lm(vocab_size, hidden_size=64, num_layers=2, seed=seed + 1).eval()
    student = tiny_causal_lm(vocab_size, hidden_size=32, num_layers=1, seed=seed + 2)
    head = RewardHead(student.config.hidden_size)
    input_ids = torch.randint(0, vocab_size, (2, 12))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[:, :3] = False  # the first tokens play the prompt: they do not count
    with torch.no_grad():
        teacher_logits = teacher(input_ids).logits[:, :-1]
    out = student(input_ids, output_hidden_states=True)
    mu, log_sigma = head(out.hidden_states[-1][:, :-1])
    batch = {"target_ids": input_ids[:, 1:], "mask": mask, "reward_mu": mu, "reward_log_sigma": log_sigma}
    dense, sparse = {"teacher_logits": teacher_logits}, _signal(teacher_logits, k)

    rows: dict[str, float] = {}
    for name in DIVERGENCES:
        objective = build_objective([Term(name)])
        rows[f"{name} (dense)"] = objective(out.logits[:, :-1], batch, dense)[0].item()
        rows[f"{name} (top-{k} + tail)"] = objective(out.logits[:, :-1], batch, sparse)[0].item()
    rows["ce (labels)"] = build_objective([Term("ce")])(out.logits[:, :-1], batch)[0].item()
    _, logs = build_objective([Term("xkd")])(out.logits[:, :-1], batch, dense)
    rows.update({f"xkd: {k.split('/')[-1]}": v.item() for k, v in logs.items() if k.startswith("xkd")})
    taid = build_objective([Term("taid")])
    rows["taid (t=0.4)"] = taid(out.logits[:, :-1], batch, dense, runtime={"taid": {"t": 0.4}})[0].item()

    width = max(map(len, rows))
    print(
        f"kdray demo: student {sum(p.numel() for p in student.parameters()):,} params, "
        f"teacher {sum(p.numel() for p in teacher.parameters()):,} params, vocab {vocab_size}"
    )
    for name, value in rows.items():
        print(f"  {name:<{width}}  {value:10.5f}")
    return rows


if __name__ == "__main__":
    run_demo()
