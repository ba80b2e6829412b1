"""How long reading a teacher-signal cache takes, one file per scoring batch against few large files.

    python workflows/benchmark_cache.py            # the quickstart's shape: 6400 rows of ~100 tokens, top-16
    python workflows/benchmark_cache.py --report   # the table of benchmarks/cache_read.jsonl

Why: the cache used to be written one Parquet file per scoring batch (400 for the quickstart), and every
file costs a reader a Ray task (past a few dozen, footer-reading tasks too). Both layouts here hold the
same synthetic rows, shaped like the quickstart's scored data; each is read through `SignalCache.read`
(Ray Data), as the distill step reads it. One row per layout goes to `--out`, with provenance.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any


def scored_rows(rows: int, tokens: int, k: int, seed: int) -> list[dict[str, Any]]:
    """Rows with the columns and dtypes of a scored batch (token ids, masks, top-k ids and log-probs)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for i in range(rows):
        n = int(rng.integers(tokens // 2, tokens))
        out.append({
            "id": f"row-{i}", "input_ids": rng.integers(0, 100, n), "attention_mask": np.ones(n, np.int64),
            "response_mask": np.arange(n) > n // 2, "topk_ids": rng.integers(0, 100, (n, k)),
            "topk_logprobs": rng.normal(-3, 1, (n, k)).astype(np.float32),
            "token_logprobs": rng.normal(-1, 1, n).astype(np.float32),
        })  # fmt: skip
    return out


def report(path: Path) -> str:
    """The rows of `path` as a markdown table, with where they were measured."""
    from kdray.results import read_rows

    rows = read_rows(path)
    lines = ["| layout | files | rows | read seconds |", "|---|---:|---:|---:|"]
    lines += [f"| {r['layout']} | {r['files']} | {r['rows']} | {r['read_s']:.1f} |" for r in rows]
    machines = "; ".join(sorted({f"{r['cpu']}, {r['threads']} threads, commit {r['commit']}" for r in rows}))
    lines.append(f"\nFrom `{path.name}`: `python workflows/benchmark_cache.py`; {machines}.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=6400)
    parser.add_argument("--tokens", type=int, default=110, help="longest row (rows are 1/2 to all of it)")
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument(
        "--block-rows", type=int, default=16, help="rows per scoring batch (one old file each)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/benchmark_cache")
    parser.add_argument("--out", default="benchmarks/cache_read.jsonl")
    parser.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    from kdray.results import append_rows

    if args.report:
        print(report(Path(args.out)))
        return

    from kdray.run import init_ray

    init_ray(quiet=True)
    import ray

    from kdray.data.cache import SignalCache
    from kdray.determinism import provenance

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    root = Path(args.workdir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    rows = scored_rows(args.rows, args.tokens, args.top_k, args.seed)
    blocks = -(-len(rows) // args.block_rows)
    scored = ray.data.from_items(rows, override_num_blocks=blocks)
    cache = SignalCache(root)
    cache.write(scored, "few-files", vocab_size=100)
    per_batch = root / "one-file-per-batch"  # the old layout: Ray's default, one file per block
    ray.data.from_items(rows, override_num_blocks=blocks).write_parquet(str(per_batch))
    (per_batch / "_SUCCESS").write_text(json.dumps({"rows": len(rows)}))
    stamp = {**provenance(args.seed), "args": vars(args)}
    for layout, key in (
        ("one file per scoring batch", "one-file-per-batch"),
        ("few large files", "few-files"),
    ):
        started = time.perf_counter()
        n = sum(len(b["id"]) for b in cache.read(key).iter_batches(batch_size=args.block_rows))
        seconds = time.perf_counter() - started
        row = {
            "layout": layout,
            "files": len(cache.files(key)),
            "rows": n,
            "read_s": round(seconds, 2),
            **stamp,
        }
        append_rows(args.out, [row])
        print(row, flush=True)


if __name__ == "__main__":
    main()
