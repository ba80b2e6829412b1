"""TeacherPool on a real multi-node Ray cluster inside one machine, serving the real Teacher on tiny checkpoints.

One cluster for the module (head, a `teacher` node, a student node): placement on the teacher node,
results equal to the plain Teacher, a replica SIGKILLed mid-stream, back-pressure, restarts spent, routing.
"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import ray

from kdray.config import TeacherConfig
from kdray.models.tiny import save_tiny_checkpoint
from kdray.teacher import Teacher
from kdray.teacher.pool import TeacherPool, TeacherPoolError
from kdray.teacher.router import TeacherRouter, UnknownRouteError

TOP_K = 8


def _requests(n: int, seed: int = 0) -> list[list[list[int]]]:
    """n score requests of 4 random token sequences (ids of the char tokenizer's printable range)."""
    rng = np.random.default_rng(seed)
    return [
        [rng.integers(7, 100, size=int(rng.integers(60, 160))).tolist() for _ in range(4)] for _ in range(n)
    ]


TIE = 1e-5  # log-probs closer than this are a tie: another thread count may order them either way


def _assert_same_topk(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """Same top-k ids, except where two candidates tie: a random tiny model's output is nearly uniform,
    and the pool's actors run with other thread counts than this process, so the last bits of a logit
    (and with them the order of two tied tokens, or which of them is the k-th) may differ. An id is
    accepted in place of another only when both carry the same log-prob."""
    ids_g, ids_w = got["topk_ids"], want["topk_ids"]
    for pos in zip(*np.nonzero((ids_g != ids_w).any(-1)), strict=True):
        lp_g = dict(zip(ids_g[pos].tolist(), got["topk_logprobs"][pos].tolist(), strict=True))
        lp_w = dict(zip(ids_w[pos].tolist(), want["topk_logprobs"][pos].tolist(), strict=True))
        for token in lp_g.keys() & lp_w.keys():
            assert abs(lp_g[token] - lp_w[token]) < TIE, (pos, token)
        for token in (
            lp_g.keys() - lp_w.keys()
        ):  # entered at the boundary: must tie with the k-th it displaced
            assert abs(lp_g[token] - min(lp_w.values())) < TIE, (pos, token, lp_g, lp_w)
        for token in lp_w.keys() - lp_g.keys():
            assert abs(lp_w[token] - min(lp_g.values())) < TIE, (pos, token, lp_g, lp_w)


def _assert_same_signal(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    _assert_same_topk(got, want)
    np.testing.assert_array_equal(got["mask"], want["mask"])
    for key in ("topk_logprobs", "token_logprobs"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU), a teacher node (2 CPUs, resource teacher=2), a student node (1 CPU)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=2, resources={"teacher": 2})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        [teacher_node] = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("teacher")]
        yield SimpleNamespace(teacher_node=teacher_node)
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two different tiny teachers (different seeds), saved as ordinary HF checkpoint directories."""
    root = tmp_path_factory.mktemp("teachers")
    return SimpleNamespace(
        a=str(save_tiny_checkpoint(root / "a", seed=1)), b=str(save_tiny_checkpoint(root / "b", seed=2))
    )


@pytest.fixture(scope="module")
def pools(cluster, checkpoints):
    """All pools of the module, started together so their model loads overlap."""
    main = TeacherPool(
        {"name_or_path": checkpoints.a, "top_k": TOP_K},
        replicas=2, resources={"teacher": 1}, max_in_flight=1, max_restarts=2, name="main",
    )  # fmt: skip
    other = TeacherPool({"name_or_path": checkpoints.b, "top_k": TOP_K}, num_cpus=0.5, name="translation")
    config = TeacherConfig(name_or_path=checkpoints.a, top_k=TOP_K, num_cpus=0.5, max_restarts=0)
    doomed = TeacherPool.from_config(config, name="doomed")
    try:
        for pool in (main, other, doomed):
            pool.wait_ready(timeout_s=120)
        yield SimpleNamespace(main=main, other=other, doomed=doomed)
    finally:
        for pool in (main, other, doomed):
            pool.close()


@pytest.fixture(scope="module")
def local(checkpoints):
    """The same teachers as plain objects in this process: the reference the pool must reproduce."""
    return SimpleNamespace(a=Teacher(checkpoints.a, top_k=TOP_K), b=Teacher(checkpoints.b, top_k=TOP_K))


def test_replicas_run_only_on_nodes_with_the_teacher_resource(pools, cluster):
    report = pools.main.health_check(timeout_s=60)
    assert [r["alive"] for r in report] == [True, True]
    assert [r["node_id"] for r in report] == [cluster.teacher_node] * 2
    assert len({r["pid"] for r in report}) == 2


def test_results_through_the_pool_equal_the_plain_teacher(pools, local):
    [seqs] = _requests(1, seed=1)
    _assert_same_signal(pools.main.score(seqs), local.a.score(seqs))
    _assert_same_signal(pools.main.score(seqs, 3, [5] * 4), local.a.score(seqs, k=3, prompt_lengths=[5] * 4))
    batch = {"input_ids": seqs, "response_mask": [[i % 2 == 0 for i in range(len(s))] for s in seqs]}
    _assert_same_signal(pools.main.logprobs(batch, k=5), local.a.logprobs(batch, k=5))
    prompts = ["2+3=", "Ein Hund läuft."]
    got = pools.main.generate(prompts, temperature=0.0, max_new_tokens=8)
    assert got == local.a.generate(prompts, temperature=0.0, max_new_tokens=8)
    np.testing.assert_allclose(
        pools.main.reward(prompts, ["5", "A dog runs."]),
        local.a.reward(prompts, ["5", "A dog runs."]),
        rtol=1e-6,
    )


def test_a_client_answers_as_the_plain_teacher_from_its_preferred_replica(pools, local):
    """`TeacherClient` (what a run's Ray Data stages and PAD's judge hold): the Teacher's answers and its
    text side (tokenizer, prompt encoding, context) with no model loaded, its first request on the
    replica it prefers."""
    from kdray.teacher.client import TeacherClient

    client = TeacherClient(pools.main.handles, prefer=1, name="client")
    try:
        [seqs] = _requests(1, seed=3)
        _assert_same_signal(client.score(seqs, 3, [5] * 4), local.a.score(seqs, k=3, prompt_lengths=[5] * 4))
        served = [r["served"] for r in client.pool.stats()["replicas"]]
        pids = [r["pid"] for r in client.pool.health_check(timeout_s=60)]
        assert served == [1, 0] and pids[0] == pools.main.health_check(timeout_s=60)[1]["pid"]
        batch = {"input_ids": seqs}
        got = client(batch)
        assert got["input_ids"] is seqs  # the batch's own columns stay here; only the signal crossed
        _assert_same_signal({k: got[k] for k in local.a.logprobs(batch)}, local.a.logprobs(batch))
        prompts = ["2+3=", "Ein Hund läuft."]
        assert client.generate(prompts, temperature=0.0, max_new_tokens=8) == local.a.generate(
            prompts, temperature=0.0, max_new_tokens=8
        )
        np.testing.assert_allclose(
            client.reward(prompts, ["5", "x"]), local.a.reward(prompts, ["5", "x"]), rtol=1e-6
        )
        assert [client.encode_prompt(p) for p in prompts] == [local.a.encode_prompt(p) for p in prompts]
        assert (client.max_length, client.vocab_size, client.top_k) == (
            local.a.max_length, local.a.vocab_size, local.a.top_k,
        )  # fmt: skip
        assert client.tokenizer.get_vocab() == local.a.tokenizer.get_vocab()
    finally:
        client.close()
    assert all(r["alive"] for r in pools.main.health_check(timeout_s=60)), "a client leaves the replicas"


def test_teacher_errors_reach_the_caller_without_retries(pools):
    retries = pools.main.retries
    with pytest.raises(ValueError, match="empty batch"):
        pools.main.score([])
    with pytest.raises(AttributeError, match="no public method 'forward'"):
        pools.main.submit("forward", [[1, 2]])
    assert pools.main.retries == retries


def test_back_pressure_bounds_requests_in_flight(pools, local):
    requests = _requests(20, seed=2)
    answered = dict(pools.main.map("score", requests, ordered=False))
    assert sorted(answered) == list(range(20))  # every request once, matched by its index
    for i, request in enumerate(requests[:3]):
        _assert_same_signal(answered[i], local.a.score(request))
    # max_in_flight=1 per replica, 2 replicas: both busy at once, never more
    assert pools.main.max_in_flight_seen == 2
    assert all(r["served"] > 0 for r in pools.main.stats()["replicas"])


def test_map_survives_a_replica_killed_mid_stream(pools, local, cluster):
    pool = pools.main
    requests = _requests(30, seed=3)
    expected = [local.a.score(r) for r in requests]
    before = [r["pid"] for r in pool.health_check(timeout_s=60)]
    retries = pool.retries
    results = []
    for i, signal_ in enumerate(pool.map("score", requests)):
        results.append(signal_)
        if i == 2:
            os.kill(before[0], signal.SIGKILL)
    assert len(results) == len(requests)  # each request answered once, in input order
    for got, want in zip(results, expected, strict=True):
        _assert_same_signal(got, want)
    assert pool.retries > retries  # the dead replica's request was re-sent to the live one

    report = pool.health_check(timeout_s=60)  # Ray restarts the killed replica (max_restarts=2)
    assert [r["alive"] for r in report] == [True, True], report
    assert report[0]["pid"] != before[0] and report[1]["pid"] == before[1]
    assert [r["node_id"] for r in report] == [cluster.teacher_node] * 2
    served = pool.stats()["replicas"][0]["served"]
    for got, want in zip(pool.map("score", requests[:6]), expected[:6], strict=True):
        _assert_same_signal(got, want)
    assert pool.stats()["replicas"][0]["served"] > served  # the restarted replica serves again


def test_an_attached_pool_routes_around_a_killed_replica_and_leaves_the_actors(pools, local):
    """What a training worker scoring its on-policy samples does: a pool over `pool.handles`, with the
    same failover; closing it stops nothing (the pool that started the replicas owns them)."""
    requests = _requests(12, seed=5)
    expected = [local.a.score(r) for r in requests]
    before = [r["pid"] for r in pools.main.health_check(timeout_s=60)]
    attached = TeacherPool.attach(pools.main.handles, name="worker", max_restarts=2)
    results = []
    for i, signal_ in enumerate(attached.map("score", requests)):
        results.append(signal_)
        if i == 1:
            os.kill(before[1], signal.SIGKILL)
    for got, want in zip(results, expected, strict=True):
        _assert_same_signal(got, want)
    assert attached.retries > 0  # the killed replica's request went to the other one
    attached.close()
    report = pools.main.health_check(timeout_s=60)
    assert [r["alive"] for r in report] == [True, True], report  # restarted by Ray, not killed by close()
    assert report[0]["pid"] == before[0]
    with pytest.raises(TeacherPoolError, match="closed"):
        attached.submit("score", requests[0])


def test_restarts_spent_gives_a_clear_error(pools):
    [info] = pools.doomed.wait_ready(timeout_s=60)
    os.kill(info["pid"], signal.SIGKILL)
    [seqs] = _requests(1)
    with pytest.raises(TeacherPoolError) as caught:
        pools.doomed.score(seqs)
    message = str(caught.value)
    for part in ("'doomed'", "all 1 replicas are dead", "max_restarts=0", "doomed[0] dead", "ActorDiedError"):
        assert part in message, message
    with pytest.raises(TeacherPoolError, match="all 1 replicas are dead"):
        pools.doomed.submit("score", seqs)  # later calls fail at once
    assert pools.doomed.health_check(timeout_s=5)[0]["alive"] is False


def test_router_sends_each_route_to_its_pool(pools, local):
    router = TeacherRouter({"gsm8k": pools.main, "multi30k": pools.other}, default="gsm8k")
    [seqs] = _requests(1, seed=4)
    want_a, want_b = local.a.score(seqs), local.b.score(seqs)
    assert not np.allclose(
        want_a["token_logprobs"], want_b["token_logprobs"]
    )  # the routes are distinguishable
    _assert_same_signal(router.call("multi30k", "score", seqs), want_b)
    _assert_same_signal(router.call("gsm8k", "score", seqs), want_a)
    _assert_same_signal(router.pool().score(seqs), want_a)  # None = the default route
    assert router["multi30k"] is pools.other and router.routes == ["gsm8k", "multi30k"]
    with pytest.raises(UnknownRouteError, match=r"'cnn_dailymail'; known routes: \['gsm8k', 'multi30k'\]"):
        router.call("cnn_dailymail", "score", seqs)
    with pytest.raises(UnknownRouteError, match="known routes"):
        TeacherRouter({"gsm8k": pools.main}, default="nope")


def test_a_lone_replica_is_waited_for_while_ray_restarts_it(pools, local):
    pool = pools.other  # one replica, max_restarts=3: nowhere else to send the request
    [before] = pool.health_check(timeout_s=60)
    os.kill(before["pid"], signal.SIGKILL)
    [seqs] = _requests(1, seed=5)
    _assert_same_signal(pool.score(seqs), local.b.score(seqs))
    [after] = pool.health_check(timeout_s=60)
    assert after["alive"] and after["pid"] != before["pid"]


def test_stopping_a_stream_early_leaves_the_pool_usable(pools, local):
    stream = pools.main.map("score", _requests(12, seed=6))
    next(stream)
    stream.close()  # the caller walks away: queued requests are dropped, in-flight ones still settle
    [seqs] = _requests(1, seed=7)
    _assert_same_signal(pools.main.score(seqs), local.a.score(seqs))
    assert pools.main.stats()["queued"] == 0


def test_a_pool_no_node_can_host_fails_wait_ready_clearly(cluster, checkpoints):
    pool = TeacherPool({"name_or_path": checkpoints.a}, resources={"gpu_node": 1}, name="nowhere")
    with pool, pytest.raises(TeacherPoolError, match=r"no answer within 1 s.*resources=\{'gpu_node': 1\}"):
        pool.wait_ready(timeout_s=1)
