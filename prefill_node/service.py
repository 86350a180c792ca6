"""What a prefill node adds to the shared node loop (engine/node_server.py): it lends KV.

Each prefill job ends with the prompt's KV blocks held for the decode node the router
names (the connector's producer side: kv_connector/producer_ledger.py and
producer_service.py). Two things follow here:

* `ReleaseKV` from the router frees a request's held blocks at once, when no decode node
  will pull them (the client left, the decode job failed);
* a draining node keeps serving while it still holds lent KV, so a decode node that is
  pulling it does not fail; the lease (abort_timeout_s) bounds that wait.
"""

from __future__ import annotations

from engine import node_protocol as proto
from engine.node_server import NodeServer


class PrefillNodeServer(NodeServer):
    def handle_role_message(self, ident: bytes, msg: proto.ToNode) -> None:
        if isinstance(msg, proto.ReleaseKV):
            self.engine.release_lent_kv(msg.request_id)

    def has_work(self) -> bool:
        return super().has_work() or self.lending()

    def lending(self) -> bool:
        """KV lent to a decode node that has not pulled it yet."""
        connector = self.engine.connector
        return connector is not None and connector.stats().get("requests_held", 0) > 0
