"""The engine's structured-output state: compiled grammars, one matcher per request, and
the token bitmask applied to the logits batch.

Two calls from the engine's step, nothing else on the hot path:

    structured.apply_bitmask(logits, requests)   # before sampling: disallowed tokens -> -inf
    structured.accept_tokens(requests, tokens)   # after sampling: matchers advance

Requests without a grammar cost one dict lookup per step each; a batch with none costs
nothing more. For the rows with a grammar, each matcher fills its row of one pinned host
bitmask (int32, 32 tokens a word), the rows go to the device in one non-blocking copy,
and one batched op masks the logits there: no per-request device sync.

The pinned host bitmask is reused every step: that is safe while each step syncs before
the next one fills it (the sampler's `.tolist()` does today); a step loop that stops
syncing must double-buffer it.

Compiling off the loop (`background=True`, what nodes use). A grammar not in the cache is
compiled on a worker thread (xgrammar and llguidance release the GIL while they compile),
so a big schema (seconds to compile) no longer stalls every other request of the node: its
request waits in the queue (`ready()` is False, the scheduler skips it) until
`finish_compiles()`, which the engine calls each step, builds its matcher, or reports the
error that ends it. Without it (the offline LLM), add_request compiles at once and raises.

Grammar state survives the prefill/decode split by construction: a request that arrives
with `output_token_ids` (the prefill node's first token, or everything streamed before a
decode failover or KV recompute) has its fresh matcher advanced over those tokens at
`add_request`, so the decode node continues exactly where the other node stopped.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engine.structured_output.backends import (GrammarBackend, GrammarMatcher, TokenizerView, accept_all,
                                               build_backend)
from engine.structured_output.params import StructuredOutputsParams, backend_unavailable, resolve_backend
from kernels.host_copy import to_device

log = logging.getLogger(__name__)

# Compiled grammars kept (LRU). Compiling a schema costs ms to 100s of ms; a grammar
# object is small next to that.
GRAMMAR_CACHE_SIZE = 256
AUTO_ORDER = ("xgrammar", "guidance")


@dataclass(slots=True)
class _FillPlan:
    by_backend: dict[str, list[tuple[int, GrammarMatcher]]]  # backend -> (logits row, matcher)
    finished: list[int]                                       # logits rows whose grammar is complete


@dataclass(slots=True)
class GrammarState:
    matcher: GrammarMatcher
    params: StructuredOutputsParams
    backend: str          # the one that compiled it (auto resolves per grammar)
    active: bool          # False while the reasoning (before its end token) is unconstrained


class StructuredOutputManager:
    def __init__(self, tokenizer: Any, vocab_size: int, device: torch.device | str = "cpu", background: bool = False):
        self._tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile") if background else None
        self._compiling: dict[tuple, Future] = {}        # cache key -> its compile, while it runs
        self._waiting: dict[str, tuple[StructuredOutputsParams, list[int]]] = {}  # request id -> what add_request got
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._view: TokenizerView | None = None
        self._backends: dict[str, GrammarBackend] = {}
        self._compiled: OrderedDict[tuple, Any] = OrderedDict()
        self.states: dict[str, GrammarState] = {}
        self._host_bitmask: torch.Tensor | None = None   # (rows, words) int32, pinned on CUDA hosts
        self.compile_hits = 0
        self.compile_misses = 0

    # --- grammars ---------------------------------------------------------------------
    def _tokenizer_view(self) -> TokenizerView:
        if self._view is None:
            tok = self._tokenizer
            vocab = [""] * self.vocab_size
            for token, i in tok.get_vocab().items():
                if i < self.vocab_size:
                    vocab[i] = token
            self._view = TokenizerView(tok.to_json_str(), tuple(vocab), tuple(sorted(tok.eos_token_ids)), self.vocab_size)
        return self._view

    def backend(self, name: str) -> GrammarBackend:
        if name not in self._backends:
            self._backends[name] = build_backend(name, self._tokenizer_view())
        return self._backends[name]

    def compile(self, params: StructuredOutputsParams) -> tuple[str, Any]:
        """(backend name, compiled grammar) for `params`, from the cache when seen before.
        `auto` is vLLM's rule: xgrammar, and guidance for what xgrammar cannot compile."""
        key = params.cache_key()
        hit = self._compiled.get(key)
        if hit is not None:
            self._compiled.move_to_end(key)
            self.compile_hits += 1
            return hit
        return self._cache(key, self._compile_with(self._backends_for(params), params))

    def _backends_for(self, params: StructuredOutputsParams) -> list[GrammarBackend]:
        """The backends to try, in order, made on first use: seconds for a large vocabulary
        (xgrammar's tokenizer info, guidance's lexer), so in the background mode on the
        compile thread, which is then the only one that makes them."""
        if params.backend == "auto":
            names = [n for n in AUTO_ORDER if backend_unavailable(n) is None] or [resolve_backend("auto")]
        else:
            names = [params.backend]
        return [self.backend(name) for name in names]

    @staticmethod
    def _compile_with(backends: list[GrammarBackend], params: StructuredOutputsParams) -> tuple[str, Any]:
        """Touches nothing of the manager: runs on the compile thread too."""
        errors = []
        for backend in backends:
            try:
                return backend.name, backend.compile(params)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))

    def _cache(self, key: tuple, hit: tuple[str, Any]) -> tuple[str, Any]:
        self.compile_misses += 1
        self._compiled[key] = hit
        if len(self._compiled) > GRAMMAR_CACHE_SIZE:
            self._compiled.popitem(last=False)
        return hit

    # --- requests ---------------------------------------------------------------------
    def add_request(self, request_id: str, params: StructuredOutputsParams, output_token_ids: Sequence[int]) -> None:
        """Compile (or reuse) the grammar and replay the tokens already produced. Raises
        ValueError for a constraint that does not compile or tokens it does not allow; in
        the background mode a grammar not in the cache is compiled on the worker thread
        instead, and finish_compiles() reports those errors."""
        key = params.cache_key()
        if self._pool is None or key in self._compiled:
            self._start(request_id, params, self.compile(params), output_token_ids)
            return
        if key not in self._compiling:  # the choices of one n > 1 request share one compile
            self._compiling[key] = self._pool.submit(lambda: self._compile_with(self._backends_for(params), params))
        self._waiting[request_id] = (params, list(output_token_ids))

    def ready(self, request_id: str) -> bool:
        """False while the request's grammar compiles (it must not be scheduled yet)."""
        return request_id not in self._waiting

    @property
    def compiling(self) -> bool:
        return bool(self._waiting)

    def finish_compiles(self) -> list[tuple[str, str]]:
        """Give the requests whose grammar finished compiling their matchers; returns
        (request id, why) for those whose grammar failed to compile or to take their tokens."""
        errors: dict[tuple, str] = {}
        for key, future in list(self._compiling.items()):
            if future.done():
                del self._compiling[key]
                if future.exception() is None:
                    self._cache(key, future.result())
                else:
                    errors[key] = str(future.exception())
        failed = []
        for request_id, (params, outputs) in list(self._waiting.items()):
            key = params.cache_key()
            if key in self._compiling:
                continue
            del self._waiting[request_id]
            try:
                if key in errors:
                    raise ValueError(errors[key])
                self._start(request_id, params, self.compile(params), outputs)
            except ValueError as e:
                failed.append((request_id, str(e)))
        return failed

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        for backend in self._backends.values():
            if (close := getattr(backend, "close", None)) is not None:
                close()

    def _start(self, request_id: str, params: StructuredOutputsParams, compiled_by: tuple[str, Any],
               output_token_ids: Sequence[int]) -> None:
        backend, compiled = compiled_by
        state = GrammarState(self.backend(backend).matcher(compiled), params, backend,
                             active=params.reasoning_end_token_id is None)
        for i, token in enumerate(output_token_ids):
            if not self._advance(state, token):
                raise ValueError(f"output token {i} ({token}) breaks the request's {params.kind} constraint: the "
                                 "tokens another node produced do not match it")
        self.states[request_id] = state

    def remove(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        self._waiting.pop(request_id, None)

    def _advance(self, state: GrammarState, token: int) -> bool:
        if not state.active:
            state.active = token == state.params.reasoning_end_token_id
            return True
        if state.matcher.is_terminated():  # complete: only eos may follow (see apply_bitmask)
            return token in self._tokenizer_view().eos_token_ids
        return state.matcher.accept(token)

    # --- the step ---------------------------------------------------------------------
    def apply_bitmask(self, logits: torch.Tensor, request_ids: Sequence[str]) -> None:
        """Mask `logits` (B, V) in place: row i keeps only what request_ids[i]'s grammar
        allows next. Rows without an active grammar are left alone.

        On the caller's thread: filled on a worker beside the engine's text work, the masks
        came no sooner (bench/gpu/grammar_fill_gil.py): the worker needs the GIL around the
        libraries' fill, and waits for it while the engine's thread runs Python."""
        filled = self._fill(self._plan(request_ids), logits.shape[1])
        if filled is not None:
            host, rows = filled
            with torch.inference_mode():  # the runner's logits are inference tensors
                mask = host[:len(rows)].to(logits.device, non_blocking=True)         # (R, W)
                apply_token_bitmask(logits, mask, rows)

    def _plan(self, request_ids: Sequence[str]) -> _FillPlan | None:
        """Which logits rows take a mask and from which matcher."""
        if not self.states:
            return None
        by_backend: dict[str, list[tuple[int, GrammarMatcher]]] = {}
        finished: list[int] = []
        for i, rid in enumerate(request_ids):
            state = self.states.get(rid)
            if state is None or not state.active:
                continue
            if state.matcher.is_terminated():
                finished.append(i)  # the grammar is complete (ignore_eos goes on): only eos may follow
            else:
                by_backend.setdefault(state.backend, []).append((i, state.matcher))
        if not by_backend and not finished:
            return None
        return _FillPlan(by_backend, finished)

    def _fill(self, plan: _FillPlan | None, vocab: int) -> tuple[torch.Tensor, list[int]] | None:
        """The host bitmask rows of a plan, and which logits row each belongs to."""
        if plan is None:
            return None
        rows = [i for group in plan.by_backend.values() for i, _ in group] + plan.finished  # host row j <-> logits row rows[j]
        words = (vocab + 31) // 32
        host = self._bitmask(len(rows), words)
        host[len(rows) - len(plan.finished):len(rows)] = self._eos_row(words)
        j = 0
        for name, group in plan.by_backend.items():
            self._backends[name].fill_bitmasks([m for _, m in group], host, list(range(j, j + len(group))))
            j += len(group)
        return host, rows

    def accept_tokens(self, request_ids: Sequence[str], tokens: Sequence[int]) -> list[str]:
        """Advance each request's matcher by its sampled token. Returns the ids of requests
        whose token the grammar refused (possible only when a sampler ban removed every
        token the grammar allowed, e.g. min_tokens against a finished grammar). One call
        per backend for the matchers that advance, so a backend can spread them over threads."""
        if not self.states:
            return []
        broken = []
        by_backend: dict[str, tuple[list[str], list[GrammarMatcher], list[int]]] = {}
        for rid, token in zip(request_ids, tokens):
            state = self.states.get(rid)
            if state is None:
                continue
            if not state.active or state.matcher.is_terminated():
                if not self._advance(state, token):
                    broken.append(rid)
                continue
            ids, matchers, accepted = by_backend.setdefault(state.backend, ([], [], []))
            ids.append(rid)
            matchers.append(state.matcher)
            accepted.append(token)
        for name, (ids, matchers, accepted) in by_backend.items():
            broken += [rid for rid, ok in zip(ids, accept_all(self._backends[name], matchers, accepted)) if not ok]
        if len(broken) > 1:
            order = {rid: i for i, rid in enumerate(request_ids)}
            broken.sort(key=order.__getitem__)  # batch order, whichever backend refused
        return broken

    def _eos_row(self, words: int) -> torch.Tensor:
        """A bitmask row (int32, (words,)) allowing only the tokenizer's eos ids."""
        bits = np.zeros(words, dtype=np.uint32)
        for t in self._tokenizer_view().eos_token_ids:
            bits[t // 32] |= np.uint32(1 << (t % 32))
        return torch.from_numpy(bits.view(np.int32))

    def _bitmask(self, rows: int, words: int) -> torch.Tensor:
        host = self._host_bitmask
        if host is None or host.shape[0] < rows or host.shape[1] != words:
            n = max(rows, 64 if host is None else 2 * host.shape[0])
            host = torch.empty((n, words), dtype=torch.int32, pin_memory=self.device.type == "cuda")
            self._host_bitmask = host
        return host


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int]) -> None:
    """`logits[rows[j], v] = -inf` where bit v of `bitmask[j]` is 0. In place, on the
    logits' device, batched over rows: (B, V) float, (R, W) int32, R = len(rows).
    A plain-torch op (the same rule as xgrammar's and llguidance's kernels)."""
    vocab = logits.shape[1]
    shifts = _SHIFTS.get(logits.device)
    if shifts is None:
        shifts = _SHIFTS[logits.device] = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().view(bitmask.shape[0], -1)[:, :vocab]  # (R, V)
    if len(rows) == logits.shape[0] and list(rows) == list(range(len(rows))):
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = to_device(list(rows), torch.int64, logits.device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
