"""How much a CPU's kernels move a seeded training run: the quickstart's teacher, trained four ways.

    python workflows/kernel_sensitivity.py                      # 800 steps, exact match every 200
    python workflows/kernel_sensitivity.py --report             # the table from benchmarks/kernel_sensitivity.jsonl

The teacher of `workflows/configs/quickstart.yaml` (a 4-layer, 128-wide Llama on character tokens,
trained from scratch with cross-entropy on 6,400 generated arithmetic problems, lr 3e-3, batch 16,
cosine schedule, seed 0) is trained in a fresh process per setting, with the same seed and data order:

- `native`: this CPU's own kernels (KDRAY_CPU_KERNELS=native);
- `native, AVX2-only CPU`: the same, on a CPU without AVX-512 (emulated here by capping torch's
  dispatch and MKL's instruction set to AVX2, which is what such a CPU runs);
- `pinned` and `pinned, AVX2-only CPU`: kdray's default (kdray/determinism.py), on both;
- `pinned, MKL off its AVX2 branch`: the default pins where MKL does not run its AVX2 branch, which its
  documentation says is every non-Intel CPU (emulated by capping MKL's instructions at SSE4.2);
- `portable` and `portable, MKL off its AVX2 branch`: `KDRAY_CPU_KERNELS=portable` (MKL's COMPATIBLE
  branch, the one it runs alike on Intel and AMD), on both.

`--settings "a;b"` runs only those (two invocations with disjoint settings can share the 2 cores).

Each run's held-out exact match (200 problems, greedy) is recorded every `--eval-every` steps. The
loop is a plain single-process torch loop (one thread), so the only difference between the runs is
the arithmetic of the kernels. One line per setting goes to the results file, with provenance.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {
    "native": {"KDRAY_CPU_KERNELS": "native"},
    "native, AVX2-only CPU": {
        "KDRAY_CPU_KERNELS": "native",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    },
    "pinned": {},
    "pinned, AVX2-only CPU": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "pinned, MKL off its AVX2 branch": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "portable": {"KDRAY_CPU_KERNELS": "portable"},
    "portable, MKL off its AVX2 branch": {
        "KDRAY_CPU_KERNELS": "portable",
        "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
    },
}


def _train(args: argparse.Namespace) -> dict:
    """One teacher run in this process (kernels fixed by the environment it was started with)."""
    sys.path.insert(0, str(REPO))
    from kdray.determinism import pin_cpu_kernels

    pin_cpu_kernels()
    import math
    import time

    import torch

    from kdray.data.arithmetic import arithmetic_splits
    from kdray.data.tokenize import collate, tokenize_example
    from kdray.determinism import provenance
    from kdray.eval.metrics import exact_match
    from kdray.models.prompts import encode_prompt
    from kdray.models.tiny import tiny_causal_lm
    from kdray.models.tokenizer import char_tokenizer

    torch.set_num_threads(1)
    tok = char_tokenizer()
    train, test = arithmetic_splits(6400, 200, seed=0, difficulty=1)
    rows = [tokenize_example(tok, r["prompt"], r["response"], max_prompt_tokens=160, max_response_tokens=64) for r in train]  # fmt: skip
    model = tiny_causal_lm(len(tok), hidden_size=128, num_layers=4, num_heads=4, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    warm, steps = 20, args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed)).tolist()
    order = (order * (steps * 16 // len(order) + 1))[: steps * 16]

    @torch.no_grad()
    def score() -> float:
        model.eval()
        outs = []
        for i in range(0, len(test), 50):
            ids = [encode_prompt(tok, r["prompt"]) for r in test[i : i + 50]]
            width = max(map(len, ids))
            inp = torch.tensor([[tok.pad_token_id] * (width - len(x)) + x for x in ids])
            att = (inp != tok.pad_token_id).long()
            gen = model.generate(
                input_ids=inp, attention_mask=att, max_new_tokens=64, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )  # fmt: skip
            outs += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
        model.train()
        return 100 * exact_match(outs, [r["answer"] for r in test])

    curve, train_s = [], 0.0
    for step in range(steps):
        started = time.perf_counter()
        batch = collate([rows[i] for i in order[step * 16 : (step + 1) * 16]], tok.pad_token_id)
        ids = torch.as_tensor(batch["input_ids"])
        labels = ids.masked_fill(~torch.as_tensor(batch["response_mask"]), -100)
        loss = model(
            input_ids=ids, attention_mask=torch.as_tensor(batch["attention_mask"]), labels=labels
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        train_s += time.perf_counter() - started
        if (step + 1) % args.eval_every == 0:
            curve.append([step + 1, score()])
            print(f"step {step + 1}: exact match {curve[-1][1]:.1f}", file=sys.stderr, flush=True)
    return {"curve": curve, "final_loss": float(loss), "train_s": train_s, **provenance(args.seed)}


def _mkl_branch(row: dict) -> str:
    """The MKL branch a row ran (rows before it was recorded: AUTO unpinned, AVX2 pinned)."""
    return row.get("mkl_branch") or ("AUTO" if row["setting"].startswith("native") else "AVX2")


def _report(path: Path) -> str:
    from kdray.determinism import cpu_vendor

    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [s for s, _ in rows[0]["curve"]]
    head = "| setting | machine | kernels | MKL | " + " | ".join(f"step {s}" for s in steps)
    lines = [head + " | final train loss | train s |", "|---|---|---|---|" + "---:|" * (len(steps) + 2)]
    for r in rows:
        seconds = f"{r['train_s']:.0f}" if "train_s" in r else ""
        lines.append(
            f"| {r['setting']} | {cpu_vendor(r['cpu'])} | {r['cpu_kernels']} | {_mkl_branch(r)} | "
            + " | ".join(f"{v:.1f}" for _, v in r["curve"])
            + f" | {r['final_loss']:.9f} | {seconds} |"
        )
    where = "; ".join(dict.fromkeys(f"{r['cpu']}, commit {r['commit']}" for r in rows))
    lines.append(
        f"\nHeld-out exact match (%) of the quickstart's teacher; seed {rows[0]['seed']}, "
        f"{rows[0]['threads']} thread; {where}. Command: `python workflows/kernel_sensitivity.py`."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/kernel_sensitivity.jsonl")
    parser.add_argument("--report", action="store_true", help="print the table of the results file")
    parser.add_argument("--settings", help="settings to run, separated by ; (default: all not yet run here)")
    parser.add_argument("--setting", help=argparse.SUPPRESS)  # internal: one run in a child process
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        print(_report(out))
        return
    if args.setting:
        print(json.dumps(_train(args)))
        return
    from kdray.determinism import cpu_model

    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {
        r["setting"] for r in rows if r["cpu"] == cpu_model()
    }  # per machine: another CPU's row is not this
    out.parent.mkdir(parents=True, exist_ok=True)
    wanted = [w.strip() for w in args.settings.split(";")] if args.settings else list(SETTINGS)
    unknown = sorted(set(wanted) - set(SETTINGS))
    if unknown:
        parser.error(f"--settings: unknown {unknown}; known: {list(SETTINGS)}")
    for name, env in SETTINGS.items():
        if name in done or name not in wanted:  # resumable: a setting finished here is not run again
            continue
        child_env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}
        child_env.update(env)
        cmd = [sys.executable, __file__, "--setting", name, "--steps", str(args.steps)]
        cmd += ["--eval-every", str(args.eval_every), "--seed", str(args.seed)]
        result = subprocess.run(cmd, env=child_env, capture_output=True, text=True, check=True)
        row = {"setting": name, **json.loads(result.stdout.strip().splitlines()[-1])}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(row["setting"], row["curve"], flush=True)
    print(_report(out))


if __name__ == "__main__":
    main()
