"""Forks: the `n` choices of one request share its prompt's KV blocks.

The router sends choice 0 of an `n` > 1 request as any request, and choices 1..n-1 as
forks of it (`Request.fork_of`, from the node protocol's `SubmitRequest.fork_of`). A fork
admitted while its parent's KV is in this engine — the parent running, or finished with
its blocks lent to a decode node (a producer keeps them until they are pulled,
kv_connector/producer_ledger.py) — does not compute the prompt:

* it takes a reference on each of the parent's full blocks before the fork point (the
  block pool is reference-counted: the blocks stay while either holds them);
* it copies the block the fork point falls in, on the device, because that is the first
  block the choices write differently (copy-on-write; one contiguous copy per block in
  the block-major KV layout, engine/kv_cache.py);
* it computes only what is left — the last prompt token, one row, for its own logits —
  and samples with its own seed (the router gives choice i the seed s + i, vLLM's rule).

The fork point F = min(the common prefix of the two prompts, the tokens the fork knows
minus one): the fork needs the KV of its first F tokens and computes from F on. A decode
node forks the choices whose first token a prefill node sampled the same way (F is then
the whole prompt), so the prompt's KV crosses the network once: the fork's own lent copy
is released on the producer unread (the connector sees nothing left to pull).

A fork whose parent is gone (finished and freed, never here, another prompt) falls back
to the ordinary path: the prefix cache finds the parent's full blocks if they are still
cached, and the rest is computed. A fork whose parent's KV is not there yet (the parent
still queued, prefilling, or loading its KV from a prefill node) waits, and requests
behind it go first. Once admitted, a fork is a request like any other: preempted, it
computes its tokens again (or finds them in the prefix cache).

Ordering on a GPU: the copy is queued on the engine's stream at admission, after the
steps that wrote the parent's KV and before the step that writes the fork's token, and
the engine reads every step's sampled tokens back before a block freed later can be
handed to a KV load (which writes outside the stream).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.request import Request, RequestStatus


@dataclass(slots=True)
class ForkStats:
    forks: int = 0            # requests admitted as forks of another
    blocks_shared: int = 0    # parent blocks they took a reference on instead of computing
    blocks_copied: int = 0    # blocks copied where the choices start to differ
    tokens_saved: int = 0     # prompt tokens they did not compute (or load)
    fallbacks: int = 0        # forks that shared nothing (the parent was gone, or the
                              # prefix cache held more): admitted as ordinary requests


def fork_point(child: Request, parent: Request) -> int:
    """How many of `child`'s leading tokens can take their KV from `parent`'s prompt."""
    limit = min(parent.num_prompt_tokens, parent.num_computed_tokens, child.num_tokens - 1)
    if limit <= 0:
        return 0
    mine, theirs = child.token_slice(0, limit), parent.prompt_token_ids[:limit]
    if mine == theirs:
        return limit
    return next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)


def parent_ready(child: Request, parent: Request) -> bool:
    """Whether `parent`'s KV for the fork point is computed and stays put now. A parent
    that is queued, loading its KV or mending failed blocks is not ready yet."""
    if parent.status.finished:
        return True  # lent: computed, and kept unchanged until the consumer releases it
    if parent.status != RequestStatus.RUNNING or parent.recompute_ranges:
        return False
    want = min(parent.num_prompt_tokens, child.num_tokens - 1)
    return parent.num_computed_tokens >= want
