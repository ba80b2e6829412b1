"""The signal cache on disk: rows in the order they were scored, whatever order the scorers finish in,
and no padding stored."""

from __future__ import annotations

import random
import time

import numpy as np

from kdray.data.cache import SignalCache


class _Jittery:
    """A scorer whose blocks finish in a random order (as teacher actors do under load)."""

    def __init__(self) -> None:
        self.rng = random.Random()

    def __call__(self, batch):
        time.sleep(self.rng.random() * 0.2)
        return batch


def _scored_rows(n: int, width: int = 8, k: int = 2) -> list[dict]:
    rows = []
    for i in range(n):
        length = 3 + i % 5  # real tokens; the rest of the row is right padding
        mask = np.arange(width) < length
        rows.append({
            "id": f"row-{i}",
            "input_ids": np.where(mask, i % 90 + 1, 0).astype(np.int64),
            "attention_mask": mask,
            "response_mask": mask & (np.arange(width) >= 1),
            "topk_ids": np.tile(np.arange(k, dtype=np.int32), (width, 1)),
            "topk_logprobs": np.full((width, k), -0.5 - i / 100, np.float32),
            "token_logprobs": np.full(width, -1.0, np.float32),
        })  # fmt: skip
    return rows


def test_rows_are_stored_in_scoring_order_without_padding(ray_session, tmp_path):
    import sys

    ray = ray_session
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the scorer class, for the workers
    rows = _scored_rows(48)
    cache = SignalCache(tmp_path / "cache")
    for attempt in range(4):  # the order of finishing blocks changes from run to run: it must not matter
        ds = ray.data.from_items(rows, override_num_blocks=12).map_batches(
            _Jittery, batch_size=4, compute=ray.data.ActorPoolStrategy(size=2), num_cpus=0.5
        )
        key = f"k{attempt}"
        assert cache.write(ds, key, vocab_size=100) == 48
        read = cache.read(key).take_all()
        assert [r["id"] for r in read] == [r["id"] for r in rows], f"write {attempt}: rows out of order"
        local = [str(i) for batch in cache.local(key).iter_batches(batch_size=5) for i in batch["id"]]
        assert local == [r["id"] for r in rows]
        for got, want in zip(read, rows, strict=True):
            n = int(want["attention_mask"].sum())
            assert len(got["input_ids"]) == n, "padding is not stored"
            np.testing.assert_array_equal(got["topk_ids"], want["topk_ids"][:n])
            np.testing.assert_allclose(got["topk_logprobs"], want["topk_logprobs"][:n], atol=1e-3)


def test_the_stored_signal_is_k_ids_and_k_log_probs_per_real_token(ray_session, tmp_path):
    """4k bytes per real token (uint16 ids, float16 log-probs): 256 at k = 64. The realized token's
    log-prob, which no cached loss reads, is not stored."""
    ray = ray_session
    k = 64
    rows = _scored_rows(12, width=10, k=k)
    cache = SignalCache(tmp_path / "cache")
    assert cache.write(ray.data.from_items(rows, override_num_blocks=3), "k64", vocab_size=49152) == 12
    stored = ray.data.read_parquet([str(f) for f in cache.files("k64")]).take_all()  # as on disk
    assert all("token_logprobs" not in r for r in stored)
    tokens = sum(len(r["input_ids"]) for r in stored)
    assert tokens == sum(int(r["attention_mask"].sum()) for r in rows)  # real tokens only
    signal = sum(np.asarray(r[c]).nbytes for r in stored for c in ("topk_ids", "topk_logprobs"))
    assert signal / tokens == 4 * k == 256
    assert {np.asarray(stored[0][c]).dtype.name for c in ("topk_ids", "topk_logprobs")} == {
        "uint16",
        "float16",
    }
    # read back for training: the wire dtypes, the same values
    back = cache.read("k64").take_all()
    assert back[0]["topk_ids"].dtype == np.int32 and back[0]["topk_logprobs"].dtype == np.float32
