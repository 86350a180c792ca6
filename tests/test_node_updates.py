"""A node's request updates: one message per engine step for all the requests a router
has there, and none lost while that router is too busy to read (a ROUTER socket past its
high-water mark drops silently, and a lost update is a stream that never ends)."""

from __future__ import annotations

import socket
import threading
import time

import zmq

from engine import SamplingParams
from engine import node_protocol as proto
from engine.config import CacheConfig, EngineConfig
from engine.node_server import NodeServer

REQUESTS, TOKENS = 32, 250  # with 20 logprobs each: some MB, past what the sockets buffer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_router_that_stalls_loses_no_update_and_each_step_is_one_message():
    config = EngineConfig(model="builtin:tiny", dtype="float32", device="cpu", cache=CacheConfig(num_blocks=512))
    node = NodeServer("n0", "both", config, "127.0.0.1", _free_port())
    loop = threading.Thread(target=node.serve_forever, kwargs={"handle_signals": False}, daemon=True)
    loop.start()
    ctx = zmq.Context()
    router = ctx.socket(zmq.DEALER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVBUF, 4096)   # a router too busy to read: the node's queue fills
    router.setsockopt(zmq.RCVHWM, 1)
    try:
        router.connect(node.address)
        params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=0.0, logprobs=20).to_dict()
        for i in range(REQUESTS):
            router.send(proto.encode(proto.SubmitRequest(f"r{i}", [5 + i, 6, 7], params)))
        deadline = time.monotonic() + 120
        while len(node._owners) < REQUESTS:  # taken (250 steps each: far from done yet)
            assert time.monotonic() < deadline, "the node did not take the requests"
            time.sleep(0.001)
        while node._owners:  # all finished and sent while nobody read
            assert time.monotonic() < deadline, "the node did not finish"
            time.sleep(0.05)
        tokens: dict[str, int] = {}
        finished, messages = set(), 0
        while len(finished) < REQUESTS:
            assert router.poll(10_000), f"updates lost: {REQUESTS - len(finished)} requests never finished"
            messages += 1
            for update in proto.updates_in(proto.decode_from_node(router.recv())):
                tokens[update.request_id] = tokens.get(update.request_id, 0) + len(update.new_token_ids)
                if update.finished:
                    finished.add(update.request_id)
        assert tokens == {f"r{i}": TOKENS for i in range(REQUESTS)}
        assert messages < REQUESTS * TOKENS / 4, messages  # batched: about one per step, not per request
    finally:
        node.request_stop()
        loop.join(30)
        router.close()
        ctx.term()
