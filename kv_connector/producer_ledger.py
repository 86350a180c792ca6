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

Streamed pulls (dispatch to both nodes at once): a consumer may ask for a request's KV
while the producer still computes it. The ledger then also tracks, per expected request,
which blocks hold computed KV: the engine reports after each step (`computed`), with the
device event that marks the step's KV writes complete, and a block counts as ready only
once that event has completed — a read never races the kernel writing it. Blocks taken
back (the request was preempted) bump the request's epoch: the consumer reads again what
it read under an older epoch. When the request finishes and is lent, the answer is
`done`, with the first token the producer sampled, so the consumer continues from it.

Thread-safety: the handshake/transfer server thread calls claim/release/progress; the
engine thread calls expect/computed/hold/forget and take_expired. One lock covers the maps.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from kv_connector.messages import KVProgress

_GONE_KEPT = 10_000  # why recent requests ended unlent, for consumers that ask late


@dataclass(slots=True)
class HeldRequest:
    block_ids: list[int]            # every block the request held: freed at the end
    lent_block_ids: list[int]       # those holding the prompt's KV, which consumers read
    deadline: float                 # monotonic seconds; renewed by claims
    num_tokens: int = 0             # prompt tokens the lent blocks hold
    output_token_ids: list[int] = field(default_factory=list)  # what the producer sampled
    epoch: int = 0


@dataclass(slots=True)
class _Computing:
    """An expected request still being prefilled: its ready blocks, and those whose
    writes are queued on the device behind `event`s not yet complete."""
    epoch: int = 0
    ready: list[int] = field(default_factory=list)
    num_tokens: int = 0
    queued: list[tuple[Any, list[int], int]] = field(default_factory=list)  # (event, block ids, tokens)

    def latest(self) -> list[int]:
        return self.queued[-1][1] if self.queued else self.ready

    def settle(self) -> None:
        while self.queued and (self.queued[0][0] is None or self.queued[0][0].query()):
            _, self.ready, self.num_tokens = self.queued.pop(0)


@dataclass
class ProducerLedger:
    abort_timeout_s: float
    _held: dict[str, HeldRequest] = field(default_factory=dict)
    _to_free: list[list[int]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _computing: dict[str, _Computing] = field(default_factory=dict)
    _gone: OrderedDict[str, str] = field(default_factory=OrderedDict)
    expired_count: int = 0
    released_count: int = 0

    def hold(self, request_id: str, block_ids: list[int], lent_block_ids: list[int], num_tokens: int = 0,
             output_token_ids: list[int] = ()) -> None:
        with self._lock:
            computing = self._computing.pop(request_id, None)
            self._held[request_id] = HeldRequest(list(block_ids), list(lent_block_ids),
                                                 time.monotonic() + self.abort_timeout_s, num_tokens,
                                                 list(output_token_ids), computing.epoch if computing else 0)

    # --- streamed pulls ----------------------------------------------------------------
    def expect(self, request_id: str) -> None:
        """A request this producer will lend has arrived: consumers may follow its progress."""
        with self._lock:
            self._computing.setdefault(request_id, _Computing())
            self._gone.pop(request_id, None)

    def computed(self, request_id: str, block_ids: list[int], num_tokens: int, event: Any = None) -> None:
        """The engine queued KV writes up to `num_tokens` (whole blocks `block_ids`); they
        are complete once `event` is (None: already). Fewer or other blocks than before
        (preempted): a new epoch."""
        with self._lock:
            c = self._computing.get(request_id)
            if c is None:
                return
            latest = c.latest()
            if block_ids[:len(latest)] != latest:
                c.epoch, c.ready, c.num_tokens, c.queued = c.epoch + 1, [], 0, []
            elif len(block_ids) == len(latest):
                return
            c.queued.append((event, list(block_ids), num_tokens))

    def forget(self, request_id: str, reason: str) -> None:
        """The request ended without lending (stopped on its first token, aborted, failed)."""
        with self._lock:
            if self._computing.pop(request_id, None) is None:
                return
            self._gone[request_id] = reason
            if len(self._gone) > _GONE_KEPT:
                self._gone.popitem(last=False)

    def progress(self, request_id: str, have_blocks: int, epoch: int, final: bool = False) -> KVProgress | None:
        """What a consumer asking at (have_blocks, epoch) should hear: None while there is
        no news (unless `final`: then the state as it stands)."""
        with self._lock:
            held = self._held.get(request_id)
            if held is not None:
                return KVProgress("done", held.epoch, held.lent_block_ids, held.num_tokens, held.output_token_ids)
            c = self._computing.get(request_id)
            if c is not None:
                c.settle()
                if final or c.epoch != epoch or len(c.ready) > have_blocks:
                    return KVProgress("computing", c.epoch, list(c.ready), c.num_tokens)
                return None
            reason = self._gone.get(request_id)
            if reason is not None:
                return KVProgress("gone", reason=reason)
            return KVProgress("unknown") if final else None

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

    def readable(self, request_id: str, block_ids: list[int]) -> str | None:
        """None when a consumer may read these blocks of the request now (held, or computed
        while a streamed pull follows it), else why not."""
        with self._lock:
            held = self._held.get(request_id)
            if held is not None:
                held.deadline = time.monotonic() + self.abort_timeout_s
                ok = set(held.block_ids)
            elif (c := self._computing.get(request_id)) is not None:
                c.settle()
                ok = set(c.ready)
            else:
                return f"request {request_id} is not held (expired or unknown)"
        if not set(block_ids) <= ok:
            return f"blocks {block_ids} are not readable blocks of request {request_id}"
        return None

    def holds(self, request_id: str) -> bool:
        """Whether a finished request of this id is lent (its blocks held for a consumer)."""
        with self._lock:
            return request_id in self._held

    @property
    def num_computing(self) -> int:
        with self._lock:
            return len(self._computing)

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
