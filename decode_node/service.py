"""What a decode node adds to the shared node loop (engine/node_server.py): it continues
generations that another node started.

A decode job arrives with the prompt, the tokens generated so far and, when the KV comes
from a prefill node, its handle; the engine reserves blocks, pulls the KV in the
background (kv_connector/pull_connector.py) and decodes with continuous batching. Such a
request says at once that it was accepted, with its prompt length: the router streams
its tokens as they come, and a node that dies before the first one is told apart from a
slow pull. Colocated (`both`) nodes run ColocatedNodeServer, this class plus the lending
side: they can take over a generation from a failed node, and with
router.disaggregation.mode not `never` (kv_role `kv_both`) they also prefill for another
node and lend it the KV, as a prefill node does (prefill_node/service.py).
"""

from __future__ import annotations

from engine import node_protocol as proto
from engine.node_server import NodeServer


class DecodeNodeServer(NodeServer):
    def accepted(self, ident: bytes, msg: proto.SubmitRequest) -> None:
        if msg.output_token_ids or (msg.kv_transfer_params or {}).get("streamed"):  # a continued generation
            req = self.engine.scheduler.requests[msg.request_id]
            self._sock.send_multipart([ident, proto.encode(proto.RequestUpdate(
                msg.request_id, num_prompt_tokens=req.num_prompt_tokens))])


class ColocatedNodeServer(DecodeNodeServer):
    """A `both` node: decodes and continues generations like a decode node, and when its
    connector is `kv_both` it lends a prefill's KV like a prefill node: `ReleaseKV` frees
    what no node will pull, and a draining node waits for lent KV to be pulled (bounded
    by abort_timeout_s)."""

    def handle_role_message(self, ident: bytes, msg: proto.ToNode) -> None:
        if isinstance(msg, proto.ReleaseKV):
            self.engine.release_lent_kv(msg.request_id)

    def has_work(self) -> bool:
        connector = self.engine.connector
        return super().has_work() or (connector is not None and connector.stats().get("requests_held", 0) > 0)
