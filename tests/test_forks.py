"""Forks (engine/forking.py): the choices of an `n` > 1 request share the prompt's KV
blocks in one engine — references on the full blocks, a copy of the block where they
differ — and give exactly the tokens of single requests with seeds s, s+1, s+2, whether
the parent runs, finished and lends its KV, finishes or is aborted first, or a fork is
preempted; and a decode engine forks choice 0's pulled KV instead of pulling each
choice's own."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.llm_engine import LLMEngine
from engine.request import RequestStatus
from kv_connector.config import KVTransferConfig

BS = 4
PROMPT = list(range(100, 122))  # 22 tokens: 5 full blocks and a partial one of 2
GREEDY = dict(temperature=0.0, max_tokens=8, ignore_eos=True)
SEEDED = dict(temperature=1.0, top_p=0.95, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("builtin:tiny", device="cpu", dtype="float32", block_size=BS, num_blocks=256, max_num_seqs=8)


def params(kind: dict, seed: int | None = None) -> SamplingParams:
    return SamplingParams(**kind, seed=seed)


def run(engine, until=None) -> dict[str, list[int]]:
    done = {}
    until = until or (lambda: not engine.has_unfinished_requests)
    while not until():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return done


def singles(llm, kind: dict, seed: int, prompt=PROMPT) -> list[list[int]]:
    """The reference: three plain requests with seeds s, s+1, s+2, with a cold cache."""
    llm.engine.pool.reset_prefix_cache()
    outs = llm.generate([prompt] * 3, [params(kind, seed + i) for i in range(3)])
    return [o.outputs[0].token_ids for o in outs]


def fork_group(engine, tag: str, kind: dict, seed: int, prompt=PROMPT):
    engine.pool.reset_prefix_cache()  # nothing to find: only the forks can share
    engine.add_request(tag, prompt, params(kind, seed))
    for i in (1, 2):
        engine.add_request(f"{tag}-{i}", prompt, params(kind, seed + i), fork_of=tag)


@pytest.mark.parametrize("kind", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_forks_share_the_prompt_blocks_and_equal_single_requests_with_consecutive_seeds(llm, kind):
    engine = llm.engine
    before = engine.stats()
    fork_group(engine, f"share-{kind['temperature']}", kind, seed=7)
    tag = f"share-{kind['temperature']}"
    parent, kids = engine.scheduler.requests[tag], [engine.scheduler.requests[f"{tag}-{i}"] for i in (1, 2)]
    engine.step()  # the parent prefills; the forks wait for its KV
    assert all(k.status == RequestStatus.WAITING for k in kids) and parent.num_computed_tokens == len(PROMPT)
    engine.step()  # the forks join: 5 full blocks by reference, the 6th copied
    shared = parent.block_ids[:5]
    for k in kids:
        assert k.block_ids[:5] == shared and k.block_ids[5] != parent.block_ids[5]
        assert k.num_cached_tokens == len(PROMPT) - 1  # only the last prompt token was computed
    assert [engine.pool.ref_counts[b] for b in shared] == [3] * 5
    kv = engine.kv_cache
    for k in kids:  # the copied block: the parent's tokens 20 and 21, then the fork's own token 21 (the same)
        torch.testing.assert_close(kv[k.block_ids[5], :, :, :2], kv[parent.block_ids[5], :, :, :2])
    outs = run(engine)
    after = engine.stats()
    assert after.forks - before.forks == 2
    assert after.fork_blocks_shared - before.fork_blocks_shared == 10
    assert after.fork_blocks_copied - before.fork_blocks_copied == 2
    assert after.fork_tokens_saved - before.fork_tokens_saved == 2 * (len(PROMPT) - 1)
    assert after.tokens_computed - before.tokens_computed == len(PROMPT) + 2 + 3 * (8 - 1)
    assert [outs[tag], outs[f"{tag}-1"], outs[f"{tag}-2"]] == singles(llm, kind, seed=7)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_prompt_of_whole_blocks_copies_the_last_one(llm):
    """The fork rewrites the last prompt token, so the block it sits in is copied even
    when it is full: a shared block is never written."""
    engine, prompt = llm.engine, PROMPT[:20]
    fork_group(engine, "whole", SEEDED, seed=3, prompt=prompt)
    engine.step()
    engine.step()
    parent, kid = engine.scheduler.requests["whole"], engine.scheduler.requests["whole-1"]
    assert kid.block_ids[:4] == parent.block_ids[:4] and kid.block_ids[4] != parent.block_ids[4]
    outs = run(engine)
    assert [outs["whole"], outs["whole-1"], outs["whole-2"]] == singles(llm, SEEDED, seed=3, prompt=prompt)


def test_forks_of_a_parent_that_finished_or_was_aborted_first_fall_back(llm):
    engine = llm.engine
    # Finished first: the forks come after the parent is gone.
    engine.pool.reset_prefix_cache()
    before = engine.stats()
    engine.add_request("gone", PROMPT, params(SEEDED, 11))
    run(engine)
    for i in (1, 2):
        engine.add_request(f"gone-{i}", PROMPT, params(SEEDED, 11 + i), fork_of="gone")
    outs = run(engine)
    assert engine.stats().fork_fallbacks - before.fork_fallbacks == 2
    assert [outs["gone-1"], outs["gone-2"]] == singles(llm, SEEDED, seed=11)[1:]
    # Aborted after the forks took its blocks: they keep them and go on.
    fork_group(engine, "abort", SEEDED, seed=21)
    engine.step()
    engine.step()
    engine.abort_request("abort")
    kids = [engine.scheduler.requests[f"abort-{i}"] for i in (1, 2)]
    assert [engine.pool.ref_counts[b] for b in kids[0].block_ids[:5]] == [2] * 5
    outs = run(engine)
    assert [outs["abort-1"], outs["abort-2"]] == singles(llm, SEEDED, seed=21)[1:]
    # Aborted before they joined: they fall back to computing the prompt.
    fork_group(engine, "early", SEEDED, seed=31)
    engine.step()
    engine.abort_request("early")
    outs = run(engine)
    assert [outs["early-1"], outs["early-2"]] == singles(llm, SEEDED, seed=31)[1:]
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_preempted_fork_recomputes_and_gives_the_same_tokens():
    # 14 blocks of 4: the three choices of 30 tokens each cannot all stay; the last
    # admitted (a fork) is preempted and computed again from its tokens.
    small = LLM("builtin:tiny", device="cpu", dtype="float32", block_size=BS, num_blocks=14, max_num_seqs=8)
    engine, prompt, kind = small.engine, PROMPT[:10], dict(SEEDED, max_tokens=20)
    fork_group(engine, "tight", kind, seed=5, prompt=prompt)
    preempted, preempt = [], engine.scheduler._preempt
    engine.scheduler._preempt = lambda req, out: (preempted.append(req.request_id), preempt(req, out))
    outs = run(engine)
    assert engine.stats().forks == 2 and "tight-2" in preempted
    assert [outs["tight"], outs["tight-1"], outs["tight-2"]] == singles(small, kind, seed=5, prompt=prompt)
    assert engine.pool.num_free == engine.pool.num_blocks


def test_forks_share_the_blocks_a_prefill_node_lends():
    """On a producer the parent finishes after its first token and lends its blocks; the
    forks take references on them, and every block comes back once all are released."""
    config = EngineConfig(model="builtin:tiny", device="cpu", dtype="float32",
                          cache=CacheConfig(block_size=BS, num_blocks=128), scheduler=SchedulerConfig(max_num_seqs=8),
                          kv_transfer=KVTransferConfig(kv_connector="tcp", kv_role="kv_producer"))
    engine = LLMEngine(config)
    try:
        lend = {"do_remote_decode": True}
        first = dict(SEEDED, max_tokens=1)
        engine.add_request("lent-p", PROMPT, params(first, 40), kv_transfer_params=dict(lend))
        outs = run(engine)
        assert engine.connector.stats()["requests_held"] == 1
        parent_blocks = engine.scheduler._lent["lent-p"].block_ids
        for i in (1, 2):
            engine.add_request(f"lent-{i}-p", PROMPT, params(first, 40 + i), kv_transfer_params=dict(lend),
                               fork_of="lent-p")
        outs.update(run(engine))
        s = engine.stats()
        assert s.forks == 2 and s.fork_blocks_shared == 10 and s.tokens_computed == len(PROMPT) + 2
        assert [engine.pool.ref_counts[b] for b in parent_blocks[:5]] == [3] * 5
        for rid in ("lent-p", "lent-1-p", "lent-2-p"):
            engine.release_lent_kv(rid)
        run(engine, until=lambda: engine.connector.stats()["requests_held"] == 0)
        engine.step()  # the released blocks come back at the next poll
        assert engine.pool.num_free == engine.pool.num_blocks and not engine.scheduler._lent
        # The same first tokens as three single requests (seeds 40, 41, 42).
        reference = LLM("builtin:tiny", device="cpu", dtype="float32", block_size=BS, num_blocks=64)
        outs3 = reference.generate([PROMPT] * 3, [params(first, 40 + i) for i in range(3)])
        want = [o.outputs[0].token_ids for o in outs3]
        assert [outs["lent-p"], outs["lent-1-p"], outs["lent-2-p"]] == want
        # Released before the forks arrive: they compute as any request.
        engine.add_request("late-p", PROMPT, params(first, 50), kv_transfer_params=dict(lend))
        run(engine)
        engine.release_lent_kv("late-p")
        engine.step()
        engine.add_request("late-1-p", PROMPT, params(first, 51), kv_transfer_params=dict(lend), fork_of="late-p")
        run(engine)
        assert engine.stats().fork_fallbacks == 1
        engine.release_lent_kv("late-1-p")
        engine.step()
        assert engine.pool.num_free == engine.pool.num_blocks
    finally:
        engine.close()


def test_a_decode_node_forks_choice_0s_pulled_kv_and_releases_the_forks_copies_unread():
    """Prefill and decode engines in one process over TCP: the prefill engine forks the
    choices (one first token each), the decode engine pulls choice 0's KV once and forks
    it for the others, whose own lent copies the producer frees without a read."""
    def engine(role: str) -> LLMEngine:
        return LLMEngine(EngineConfig(model="builtin:tiny", device="cpu", dtype="float32",
                                      cache=CacheConfig(block_size=BS, num_blocks=96),
                                      scheduler=SchedulerConfig(max_num_seqs=8),
                                      kv_transfer=KVTransferConfig(kv_connector="tcp", kv_role=role)))

    producer, consumer = engine("kv_producer"), engine("kv_consumer")
    try:
        first = dict(SEEDED, max_tokens=1)
        heads = {}
        for i in range(3):  # choice 0, then (once its first token is out) the forks
            producer.add_request(f"d-{i}-p", PROMPT, params(first, 60 + i),
                                 kv_transfer_params={"do_remote_decode": True}, fork_of="d-0-p" if i else None)
            while i in (0, 2) and producer.has_unfinished_requests:
                heads.update({o.request_id: o for o in producer.step() if o.finished})
        assert producer.stats().forks == 2
        for i in range(3):
            head = heads[f"d-{i}-p"]
            consumer.add_request(f"d-{i}", PROMPT, params(SEEDED, 60 + i), output_token_ids=head.outputs[0].token_ids,
                                 kv_transfer_params=head.kv_transfer_params, fork_of="d-0" if i else None)
        outs = {}
        while consumer.has_unfinished_requests:
            outs.update({o.request_id: o.outputs[0].token_ids for o in consumer.step() if o.finished})
            producer.step()
        c = consumer.stats()
        assert c.forks == 2 and c.kv_transfer["loads"] == 1 and c.fork_tokens_saved == 2 * len(PROMPT)
        run(producer, until=lambda: producer.connector.stats()["requests_held"] == 0)  # all three released
        producer.step()
        assert producer.pool.num_free == producer.pool.num_blocks
        assert consumer.pool.num_free == consumer.pool.num_blocks
        reference = LLM("builtin:tiny", device="cpu", dtype="float32", block_size=BS, num_blocks=64)
        want = [o.outputs[0].token_ids for o in reference.generate([PROMPT] * 3, [params(SEEDED, 60 + i)
                                                                                 for i in range(3)])]
        assert [outs[f"d-{i}"] for i in range(3)] == want
    finally:
        producer.close()
        consumer.close()
