"""The producer's record of KV it lends: which finished requests' blocks it holds for a
consumer, until when, and whether the consumer read them while they were held.

Why a ledger and not a timer that frees blocks: a consumer that reads blocks after the
producer freed (and reused) them decodes from overwritten memory and returns wrong tokens
without any error (the failure vLLM issue 21570 describes). Here a consumer *claims* a
request as soon as it receives it and before it reads; a claim renews the request's lease
for another `abort_timeout_s`, and the consumer keeps renewing while the request waits in
its queue, so a long decode queue does not make the producer evict early, while a
consumer that died cannot pin blocks forever. After reading, the consumer *releases* the
request and is told whether the blocks were still held: if the lease had run out, the
read is known to be bad and is recomputed or failed — never decoded from.

Thread-safety: the handshake/transfer server thread calls claim/release; the engine
thread calls hold and take_expired. One lock covers the map.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class HeldRequest:
    block_ids: list[int]            # every block the request held: freed at the end
    lent_block_ids: list[int]       # those holding the prompt's KV, which consumers read
    deadline: float                 # monotonic seconds; renewed by claims


@dataclass
class ProducerLedger:
    abort_timeout_s: float
    _held: dict[str, HeldRequest] = field(default_factory=dict)
    _to_free: list[list[int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    expired_count: int = 0
    released_count: int = 0

    def hold(self, request_id: str, block_ids: list[int], lent_block_ids: list[int]) -> None:
        with self._lock:
            self._held[request_id] = HeldRequest(list(block_ids), list(lent_block_ids),
                                                 time.monotonic() + self.abort_timeout_s)

    def claim(self, request_id: str) -> HeldRequest | None:
        """A consumer is about to read (or still means to): renew the lease. None when the
        blocks are gone (expired or never held)."""
        with self._lock:
            held = self._held.get(request_id)
            if held is not None:
                held.deadline = time.monotonic() + self.abort_timeout_s
            return held

    def release(self, request_id: str) -> HeldRequest | None:
        """The consumer has finished reading: free the blocks. Returns the record if the
        blocks were held until now (the read saw intact data), None if they had expired."""
        with self._lock:
            held = self._held.pop(request_id, None)
            if held is not None:
                self._to_free.append(held.block_ids)
                self.released_count += 1
            return held

    def take_expired_and_released(self, now: float | None = None) -> list[list[int]]:
        """Block lists the engine thread must free now: released ones, and those whose
        lease ran out."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for rid in [r for r, h in self._held.items() if h.deadline <= now]:
                self._to_free.append(self._held.pop(rid).block_ids)
                self.expired_count += 1
            out, self._to_free = self._to_free, []
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
