"""GET /cluster's queue peaks cover a window the reader names, and reading them changes
nothing: a dashboard polling /cluster does not hide the bursts from the bench's sampler."""

from __future__ import annotations

import zmq.asyncio

from engine import node_protocol as proto
from engine.outputs import EngineStats
from router.node_client import PEAK_HISTORY_S, NodeClient
from router.spec import NodeAddress


def _stats(peak_running: int, peak_waiting: int) -> proto.NodeStats:
    engine = EngineStats(running=0, waiting=0, waiting_for_remote_kv=0, kv_blocks_total=8, kv_blocks_free=8,
                         kv_blocks_cached=0, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
                         peak_running=peak_running, peak_waiting=peak_waiting)
    return proto.NodeStats(node_id="d0", role="decode", pid=1, model="m", block_size=16, engine=engine)


def test_peaks_are_the_most_over_the_window_and_every_reader_sees_them():
    ctx = zmq.asyncio.Context()
    try:
        node = NodeClient(NodeAddress("d0", "decode", "tcp://127.0.0.1:9"), ctx)
        node._on_stats(_stats(9, 4), now=100.0)    # a burst
        node._on_stats(_stats(2, 0), now=100.5)
        node._on_stats(_stats(3, 1), now=101.0)
        assert node.peaks(0.6, now=101.0) == (3, 1)
        assert node.peaks(1.0, now=101.0) == (9, 4)
        assert node.peaks(1.0, now=101.0) == (9, 4)  # a second reader sees the same
        assert node.peaks(1.0, now=102.5) == (0, 0)  # nothing reported in the window
        node._on_stats(_stats(1, 0), now=100.0 + PEAK_HISTORY_S + 1)
        assert node.peaks(PEAK_HISTORY_S + 5, now=100.0 + PEAK_HISTORY_S + 1) == (3, 1)  # older ones dropped
    finally:
        ctx.term()
