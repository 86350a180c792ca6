"""The engine both node kinds run: add_request / step / abort over one model and one
paged KV cache. Single-threaded: whoever owns the engine calls it from one thread."""

from __future__ import annotations

import gc
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.block_pool import BlockPool
from engine.builtin_models import resolve_builtin
from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.detokenizer import IncrementalDetokenizer, check_stop
from engine.hashing import safe_hash
from engine.kv_cache import (KV_LAYOUT, KVCacheSpec, allocate_kv_cache, copy_blocks, gpu_kv_budget_bytes,
                             num_blocks_for_budget)
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import NO_TOKEN, PendingSample, Sampler, SamplerOutput, SamplingRow, has_penalty
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler
from engine.structured_output.manager import StructuredOutputManager
from engine.tokenizer import Tokenizer
from engine.weights import build_model

log = logging.getLogger(__name__)

GIB = 1 << 30


def _sampling_rows(requests: list[Request], run_ahead: bool = False) -> list[SamplingRow]:
    """What the sampler needs of each request. A request with a penalty hands over its
    tokens as arrays kept current across steps (the penalty scatters every one of them);
    in a run-ahead step the output lags the step by the token in flight."""
    rows = []
    for r in requests:
        prompt, output = r.token_arrays() if has_penalty(r.params) else (r.prompt_token_ids, r.output_token_ids)
        rows.append(SamplingRow(r.params, r.seed, prompt, output,
                                step=len(r.output_token_ids) + 1 if run_ahead else None))
    return rows


@dataclass(slots=True)
class _InflightStep:
    """A step queued on the device whose sampled tokens have not been read yet."""

    requests: list[Request]   # the rows that sample, in row order
    sample: PendingSample
    plain_decode: bool = False  # one token per request, every request sampling


class EngineClosedError(RuntimeError):
    """Work asked of an engine after close(): it no longer holds a model or a KV cache."""


def resolve_model_path(model: str) -> Path:
    if model.startswith("builtin:"):
        return resolve_builtin(model.removeprefix("builtin:"))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model path {model!r} is not a directory: give a Hugging Face model directory "
                                "or builtin:NAME (e.g. builtin:tiny)")
    return path


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} asked for, but torch sees no CUDA GPU: use device cpu")
    return dev


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self._closed = False
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.model_config = ModelConfig.from_path(self.model_path)
        self.tokenizer = Tokenizer.from_pretrained(self.model_path)
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        self.dtype = parse_dtype(config.dtype, self.model_config.checkpoint_dtype)
        self.model = build_model(self.model_config, self.model_path, self.dtype, self.device,
                                 config.load_format, config.seed)
        cache = config.cache
        block_bytes = KVCacheSpec.bytes_per_block(self.model_config, cache.block_size, self.dtype)
        num_blocks = cache.num_blocks or num_blocks_for_budget(self._kv_budget_bytes(), block_bytes)
        self.max_model_len = self._fit_max_model_len(num_blocks * cache.block_size, block_bytes)
        window = self.model_config.sliding_window
        if window is not None and window < self.max_model_len:
            raise ValueError(f"model {self.model_config.name or '?'} uses sliding-window attention ({window} tokens) "
                             f"and would serve {self.max_model_len}: pdcluster computes full attention, so set "
                             f"max_model_len to {window} or less, or use a checkpoint without a window")
        sched = config.scheduler
        if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < self.max_model_len:
            # A prompt longer than one step's budget could then never be scheduled.
            raise ValueError(f"max_num_batched_tokens ({sched.max_num_batched_tokens}) is smaller than max_model_len "
                             f"({self.max_model_len}) with chunked prefill off: raise max_num_batched_tokens to "
                             "max_model_len, lower max_model_len, or turn enable_chunked_prefill on")
        self.kv_spec = KVCacheSpec(num_blocks, self.model_config.num_layers, cache.block_size,
                                   self.model_config.num_kv_heads, self.model_config.head_dim, self.dtype)
        self.kv_cache = allocate_kv_cache(self.kv_spec, self.device)
        self.pool = BlockPool(num_blocks, cache.enable_prefix_caching, cache.eviction_policy, cache.workflow_ttl_s)
        self.kv_events = self._build_kv_event_publisher()
        self.connector = self._build_connector()
        self.scheduler = Scheduler(cache, config.scheduler, self.pool, self.connector,
                                   copy_blocks=lambda src, dst: copy_blocks(self.kv_cache, src, dst))
        sched = config.scheduler
        self.runner = ModelRunner(self.model, self.kv_cache, cache.block_size, self.device,
                                  max_num_seqs=sched.max_num_seqs, max_num_batched_tokens=sched.max_num_batched_tokens,
                                  max_model_len=min(self.max_model_len, num_blocks * cache.block_size),
                                  enforce_eager=config.enforce_eager)
        self.runner.capture_decode_graphs()
        self.sampler = Sampler(max_rows=sched.max_num_seqs, device=self.device, vocab_size=self.model_config.vocab_size)
        # The step in flight on the device: its sampled tokens are read at the next step().
        self._inflight: _InflightStep | None = None
        # A run-ahead step with grammar rows: its forward is queued, its sampling waits for
        # the previous tokens to be accepted by the matchers (see _run_ahead).
        self._unsampled: tuple[list[Request], torch.Tensor, list[SamplingRow], torch.Tensor] | None = None
        self._pending_outputs: list[RequestOutput] = []  # produced outside step(), returned by it
        self._stopping: list[Request] = []  # a stop string ended them; they end at the next step()
        self.structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size, self.device,
                                                  background=config.background_grammar_compile)
        self.scheduler.ready = self.structured.ready  # not a closure over the engine: no cycle (see close())
        self._rng = random.Random()
        self.idle = True  # the last step ran no model
        self._peak_running = self._peak_waiting = 0  # since the last stats()
        self.num_tokens_computed = 0  # tokens whose KV this engine computed (not loaded)
        self.num_steps_run_ahead = 0  # decode steps queued before the previous one was read
        # Everything built so far lives as long as the engine: keep it out of the garbage
        # collector's full scans, which otherwise stall a busy decode loop for milliseconds.
        gc.collect()
        gc.freeze()
        log.info("engine ready: model=%s device=%s dtype=%s kv_blocks=%d block_bytes=%d",
                 self.model_path, self.device, self.dtype, num_blocks, block_bytes)

    def _build_connector(self):
        if self.config.kv_transfer is None:
            return None
        from kv_connector.base import KVCacheInfo
        from kv_connector.registry import build_connector

        model_id = safe_hash((self.model_path / "config.json").read_bytes(), usedforsecurity=False).hexdigest()[:16]
        info = KVCacheInfo(model=f"{self.model_config.architecture}:{model_id}", dtype=str(self.dtype).removeprefix("torch."),
                           block_size=self.kv_spec.block_size, num_layers=self.kv_spec.num_layers,
                           num_kv_heads=self.kv_spec.num_kv_heads, head_dim=self.kv_spec.head_dim, layout=KV_LAYOUT)
        connector = build_connector(self.config.kv_transfer, info, self.config.kv_connector_spec)
        connector.register_kv_cache(self.kv_cache)
        return connector

    def _fit_max_model_len(self, capacity_tokens: int, block_bytes: int) -> int:
        """The context length served: the configured one, which must fit the KV cache
        (one request of that length), or the model's, lowered to what fits."""
        asked = self.config.scheduler.max_model_len
        if asked is not None and asked > capacity_tokens:
            need_gib = -(-asked // self.config.cache.block_size) * block_bytes / GIB
            raise ValueError(
                f"max_model_len {asked} does not fit this node's KV cache: {capacity_tokens // self.config.cache.block_size} "
                f"blocks of {self.config.cache.block_size} tokens hold at most {capacity_tokens} tokens (one request of "
                f"{asked} tokens needs {need_gib:.2f} GiB). Set max_model_len to {capacity_tokens} or less, or give the "
                "KV cache more memory (memory_fraction, cpu_kv_cache_gib, num_blocks); `pdcluster plan` shows the figures")
        model_len = self.model_config.max_position_embeddings
        if asked is None and model_len > capacity_tokens:
            log.warning("the model's context of %d tokens does not fit the KV cache (%d tokens): serving at most %d; "
                        "set max_model_len to silence this", model_len, capacity_tokens, capacity_tokens)
            return capacity_tokens
        return asked or model_len

    def _build_kv_event_publisher(self):
        events = self.config.kv_events
        if not events.enable:
            return None
        from engine.kv_events import KVEventLog, KVEventPublisher

        medium = "GPU" if self.device.type == "cuda" else "CPU"
        publisher = KVEventPublisher(events.host, events.port, events.replay_port, events.topic, medium,
                                     events.buffer_steps)
        self.pool.event_log = KVEventLog(self.config.cache.block_size, medium)
        return publisher

    def _publish_kv_events(self) -> None:
        if self.kv_events is not None:
            self.kv_events.publish(self.pool.event_log.drain())

    def close(self) -> None:
        """Stop the KV connector and the KV-events publisher, then let go of the KV cache,
        the decode graphs and the weights. Unfinished requests are dropped; later calls
        that ask for work raise EngineClosedError. Safe to call more than once.

        Why close() drops references instead of leaving the engine to the garbage
        collector: __init__ ran gc.freeze(), and the engine sits in a reference cycle (the
        scheduler's copy_blocks closure), so a discarded engine is never collected and its
        memory stays taken for the life of the process. gc.unfreeze() would let the
        collector reach it, but it acts on the whole process: every other live engine's
        start-up objects would return to the full scans the freeze keeps out of their
        decode loops. Reference counting, which the freeze does not touch, frees an object
        once nothing points at it, so close() removes the references the engine's objects
        hold to the big tensors and breaks that cycle: the tensors go now, the engine's
        remains when its last user lets go of it."""
        if self._closed:
            return
        self._closed = True
        try:
            self.structured.close()
            if self.connector is not None:
                self.connector.close()
            if self.kv_events is not None:
                self._publish_kv_events()
                self.kv_events.close()
        finally:
            self._release_memory()

    def _release_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no queued kernel may still use what is freed below
        self._inflight = self._unsampled = None  # they hold logits and sampled tokens on the device
        self._pending_outputs, self._stopping = [], []
        self.runner.release()
        self.scheduler.copy_blocks = None  # a closure over self: the cycle that kept the engine alive
        self.scheduler.connector = self.connector = None  # the connector registered the KV cache
        self.model = self.kv_cache = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back to the driver, for other processes too

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError("this engine was closed (LLM.close(), the end of its `with` block, or "
                                    "LLMEngine.close()) and holds no model or KV cache any more: build a new "
                                    "LLM(...) or LLMEngine(...) to generate again")

    def _kv_budget_bytes(self) -> int:
        cache = self.config.cache
        if self.device.type != "cuda":
            return int(cache.cpu_kv_cache_gib * GIB)
        free, _ = torch.cuda.mem_get_info(self.device)
        return gpu_kv_budget_bytes(free, cache.memory_fraction, self.model_config, self.config.scheduler.max_num_seqs,
                                   self.config.enforce_eager)

    # --- requests -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *,
                    output_token_ids: list[int] | None = None, kv_transfer_params: dict | None = None,
                    workflow_id: str | None = None, agent_id: str | None = None,
                    fork_of: str | None = None) -> Request:
        """Queue a request. `output_token_ids` continues a generation another engine began
        (a decode node receives the token the prefill node sampled); `kv_transfer_params`
        tells the KV connector where this request's prompt KV can be pulled from;
        `fork_of` names a request with the same prompt whose blocks this one shares while
        that one's KV is here (choices of an `n` > 1 request, engine/forking.py)."""
        self._check_open()
        if request_id in self.scheduler.requests:  # before any side effect (a grammar's state is per id)
            raise ValueError(f"request id {request_id!r} is already in use")
        if kv_transfer_params and self.connector is not None:
            self.connector.check_request(request_id, kv_transfer_params)
        params = params or SamplingParams()
        params.update_from_tokenizer(self.tokenizer)
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_tokens(prompt_ids, "prompt")
        outputs = list(output_token_ids or [])
        self._validate_tokens(outputs, "output_token_ids", allow_empty=True)
        room = min(self.max_model_len, self.kv_spec.num_blocks * self.kv_spec.block_size) - len(prompt_ids)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, but this engine serves at most "
                             f"{min(self.max_model_len, self.kv_spec.num_blocks * self.kv_spec.block_size) - 1}: "
                             "shorten the prompt")
        max_tokens = min(params.max_tokens or room, room)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id, prompt_ids, params, seed, max_tokens, output_token_ids=outputs,
                      kv_transfer_params=kv_transfer_params, prompt_text=text, workflow_id=workflow_id,
                      agent_id=agent_id, fork_of=fork_of)
        if params.structured_outputs is not None:  # compiles (cached); replays tokens made elsewhere
            self.structured.add_request(request_id, params.structured_outputs, outputs)
        if params.detokenize:
            req.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params)
            if outputs:
                req.detokenizer.append(outputs)
        self.scheduler.add_request(req)
        if self.connector is not None:
            self.connector.on_request_added(req)
        return req

    def _validate_tokens(self, ids: list[int], what: str, allow_empty: bool = False) -> None:
        if not ids and not allow_empty:
            raise ValueError(f"the {what} is empty: send at least one token")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self._check_open()
        self._settle_inflight()
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish_request(req, RequestStatus.FINISHED_ABORTED)
        return self._output(req, [], "")

    def fail_request(self, request_id: str, error: str, unavailable: bool = False) -> RequestOutput | None:
        """End a request with an error (a KV load that failed under the `fail` policy:
        `unavailable`, the KV is gone, not an engine fault)."""
        self._check_open()
        self._settle_inflight()
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        req.error, req.error_is_unavailable = error, unavailable
        self.scheduler.finish_request(req, RequestStatus.FINISHED_ERROR)
        return self._output(req, [], "")

    @property
    def has_unfinished_requests(self) -> bool:
        if self._closed:
            return False  # close() dropped them
        return (self.scheduler.has_unfinished or self._inflight is not None or bool(self._pending_outputs)
                or bool(self._stopping))

    # --- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that produced
        a token or finished.

        Pipelined by one step, so the host's per-request work overlaps the device's:
          1. read the tokens of the step in flight (the one sync) and append them; token
             stops (eos, stop ids, max_tokens) end requests here, before scheduling;
          2. schedule and queue the next step on the device (model, then sampler);
          3. while it runs: detokenize the tokens of 1, find stop strings, build outputs.
        A stop string found in 3 ends its request one step late: the token the queued
        step computes for it is dropped when read (at 1 of the next call), never sent.
        On a CPU the device work is synchronous and the same order holds.

        In the steady state of plain decoding (the same requests as the step in flight,
        graphed, no sampling rule that needs the previous token on the host) the next step
        is queued BEFORE the one in flight is read: its input ids come from the device, so
        the device never waits for the host (see _run_ahead)."""
        self._check_open()
        if self.structured.compiling:
            for request_id, why in self.structured.finish_compiles():
                req = self.scheduler.requests.get(request_id)
                if req is not None:
                    self._fail_impossible(req, why)
        previous = self._run_ahead()
        if previous is not None:
            appended = self._collect(previous)
            unsampled, self._unsampled = self._unsampled, None
            if unsampled is not None:  # grammar rows: the masks needed the tokens just read and accepted
                requests, logits, rows, in_flight = unsampled
                self.structured.apply_bitmask(logits, [r.request_id for r in requests])
                # rows were made before the tokens just read were appended: in_flight has them
                self._inflight = _InflightStep(requests, self.sampler.sample(logits, rows, in_flight),
                                               plain_decode=True)
            outputs, self._pending_outputs = self._pending_outputs, []
            # The text of the step just read before the connector's news: a failed load
            # settles the step queued above (fail_request), whose tokens come after these.
            outputs += self._text_outputs(appended)
            outputs += self._poll_connector()
            self.idle = False
            self._publish_kv_events()
            return outputs
        appended = self._collect_inflight()
        outputs, self._pending_outputs = self._pending_outputs, []
        outputs += self._poll_connector()
        sched = self.scheduler.schedule()
        s = self.scheduler
        self._peak_running = max(self._peak_running, len(s.running))
        self._peak_waiting = max(self._peak_waiting, len(s.waiting) + len(s.waiting_for_remote_kv))
        chunks = [c for c in sched.chunks if c.num_tokens > 0]
        if chunks:
            plain = all(c.num_tokens == 1 and c.sample for c in chunks)
            isolated: list[tuple[list[Request], SamplerOutput]] = []
            try:
                logits = self.runner.execute(chunks)
                sampling = [c.request for c in chunks if c.sample]
                if sampling:
                    rows = _sampling_rows(sampling)
                    # Structured outputs: a no-op without grammars; matchers are current, since
                    # the previous step's tokens were accepted when read (_append_sampled).
                    self.structured.apply_bitmask(logits, [r.request_id for r in sampling])
                    self._inflight = _InflightStep(sampling, self.sampler.sample(logits, rows), plain)
            except Exception as e:
                self._inflight = None
                chunks, isolated = self._isolate_failure(chunks, e, outputs)
            for c in chunks:
                self.scheduler.chunk_done(c)
                self.num_tokens_computed += c.num_tokens
            self._report_lent_progress(chunks, sched.preempted)
            for sampling, sampled in isolated:  # run alone after a fault, and read back already
                appended += self._append_sampled(sampling, sampled)
        outputs += self._text_outputs(appended)
        self.idle = not chunks and not appended
        self._publish_kv_events()
        return outputs

    def _report_lent_progress(self, chunks: list[ScheduledChunk], preempted: list[Request]) -> None:
        """Producer: tell the connector how far requests it will lend are computed, with an
        event that completes when this step's KV writes do (streamed pulls read then)."""
        if self.connector is None or not self.connector.config.is_producer:
            return
        lending = [r for r in [c.request for c in chunks] + preempted
                   if r.kv_transfer_params and r.kv_transfer_params.get("do_remote_decode")]
        if not lending:
            return
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.connector.kv_computed(lending, event)

    def _run_ahead(self) -> _InflightStep | None:
        """Queue the next decode step before reading the one in flight, when that is
        exactly what the scheduler would do anyway: the running requests are the ones in
        flight, each decodes one more token, the runner takes device ids for the batch (a
        captured graph on a GPU; always on a CPU, where it only exercises the logic), blocks are free for
        the position each reaches, and no request needs its previous token on the host to
        sample (bad words, min_tokens; penalties count it from the device) or lends KV when
        it ends. Returns the step that was in flight (for the caller to read), or None to
        take the normal path."""
        prev = self._inflight
        running = self.scheduler.running
        if (not self.config.async_scheduling or prev is None or not prev.plain_decode or self._stopping or self.scheduler.waiting
                or len(running) != len(prev.requests) or not self.runner.takes_device_ids(len(running))):
            return None
        bs = self.kv_spec.block_size
        new_blocks = 0
        for req, was in zip(running, prev.requests):
            if req is not was or not self._can_run_ahead(req):
                return None
            new_blocks += len(req.block_ids) * bs <= req.num_tokens
        if new_blocks > self.pool.num_free:
            return None
        chunks = []
        for req in running:
            if len(req.block_ids) * bs <= req.num_tokens:
                req.block_ids += self.pool.allocate(1, req.cache_owner)
            chunks.append(ScheduledChunk(req, req.num_tokens, 1, sample=True))  # the token in flight
        logits = self.runner.execute(chunks, input_ids=prev.sample.tokens)
        for c in chunks:
            self.scheduler.chunk_done(c)
        self.num_tokens_computed += len(chunks)
        self.num_steps_run_ahead += 1
        rows = _sampling_rows(running, run_ahead=True)
        if any(r.params.structured_outputs is not None for r in running):
            # The forward does not depend on the grammar, only the sampling does: queue the
            # forward now and sample once the tokens in flight are read and accepted, so the
            # matchers' host work overlaps the device's forward.
            self._unsampled = (list(running), logits, rows, prev.sample.tokens)
            self._inflight = None  # read by the caller now: never again (a failed step's settling)
        else:
            self._inflight = _InflightStep(list(running), self.sampler.sample(logits, rows, prev.sample.tokens),
                                           plain_decode=True)
        self._peak_running = max(self._peak_running, len(running))
        return prev

    @staticmethod
    def _can_run_ahead(req: Request) -> bool:
        """Whether `req` may be in a step queued before its previous token is read back."""
        p = req.params
        lends = bool(req.kv_transfer_params and req.kv_transfer_params.get("do_remote_decode"))
        last = len(req.output_token_ids) + 1 >= req.max_tokens  # the token in flight ends it: nothing to queue
        return (req.num_computed_tokens == req.num_tokens and not req.recompute_ranges and not lends and not last
                and not p.bad_words_token_ids and len(req.output_token_ids) + 1 >= p.min_tokens)

    def _collect_inflight(self) -> list[tuple[Request, int, tuple | None]]:
        step, self._inflight = self._inflight, None
        return self._collect(step)

    def _collect(self, step: _InflightStep | None) -> list[tuple[Request, int, tuple | None]]:
        """Read a step's tokens; append each to its request and end requests whose token
        is a stop. Returns (request, token, finish) for the text work."""
        appended = [] if step is None else self._append_sampled(step.requests, step.sample.resolve())
        # Stop strings found last step: their requests end now that no step uses them.
        stopping, self._stopping = self._stopping, []
        for req in stopping:
            if req.status.finished:
                continue  # aborted meanwhile
            req.stop_reason = req.pending_stop
            self.scheduler.finish_request(req, RequestStatus.FINISHED_STOPPED)
            self._pending_outputs.append(self._output(req, [req.output_token_ids[-1]], req.pending_text))
        return appended

    def _append_sampled(self, requests: list[Request], sampled: SamplerOutput) -> list[tuple[Request, int, tuple | None]]:
        appended = []
        for req, token, lp in zip(requests, sampled.token_ids, sampled.logprobs):
            if req.status.finished or req.pending_stop is not None:
                continue  # ended (aborted, or a stop string) while this step ran
            if token == NO_TOKEN:  # its grammar, with its bans, allows no token here
                self._fail_impossible(req, "the request's structured output allows no token here (the grammar "
                                           "cannot be satisfied, or min_tokens/bad_words ban every token it "
                                           "allows): relax the constraint")
                continue
            req.output_token_ids.append(token)
            if lp is not None:
                req.logprobs.append(lp)
            params = req.params
            finish = check_stop(token, len(req.output_token_ids), params, params.eos_token_ids, req.max_tokens)
            if finish is not None:
                req.stop_reason = finish[1]
                status = RequestStatus.FINISHED_STOPPED if finish[0] == "stop" else RequestStatus.FINISHED_LENGTH
                self.scheduler.finish_request(req, status)
            appended.append((req, token, finish))
        broken = self.structured.accept_tokens([r.request_id for r, _, _ in appended], [t for _, t, _ in appended])
        for rid in broken:
            req = self.scheduler.requests.get(rid)
            if req is not None and not req.status.finished:
                self._fail_impossible(req, "the sampler picked a token the request's grammar forbids: relax the "
                                           "constraint, min_tokens or bad_words")
        return appended

    def _fail_impossible(self, req: Request, message: str) -> None:
        """End a request whose constraints cannot be met (not fail_request: a step may be in flight)."""
        req.error, req.error_is_client_side = message, True
        self.scheduler.finish_request(req, RequestStatus.FINISHED_ERROR)
        self._pending_outputs.append(self._output(req, [], ""))

    def _text_outputs(self, appended: list[tuple[Request, int, tuple | None]]) -> list[RequestOutput]:
        """The text work of appended tokens; a failure there (detokenizing, say) is that
        request's fault, not the batch's: it fails that request only."""
        outputs = []
        for req, token, finish in appended:
            try:
                out = self._token_output(req, token, finish)
            except Exception as e:
                log.exception("request_id=%s: appending token %d failed", req.request_id, token)
                out = None
                if not req.status.finished:  # not fail_request: it would read the step in flight now
                    req.error = f"engine error: {e}"
                    self.scheduler.finish_request(req, RequestStatus.FINISHED_ERROR)
                    out = self._output(req, [], "")
            if out is not None:
                outputs.append(out)
        return outputs

    def _settle_inflight(self) -> None:
        """Finish the step in flight before changing requests outside step() (abort,
        fail): its outputs are kept for the next step() call."""
        if self._inflight is None:
            return
        appended = self._collect_inflight()
        self._pending_outputs += self._text_outputs(appended)

    def _token_output(self, req: Request, token: int, finish: tuple | None) -> RequestOutput | None:
        """The text work for one appended token: detokenize, look for stop strings."""
        new_text = ""
        if req.detokenizer is not None:
            update = req.detokenizer.append([token], last_is_stop_token=finish is not None and finish[0] == "stop")
            new_text = update.text
            if update.stop_str is not None and finish is None:
                # A stop string ends it; the request may be in the step now running, so it
                # ends at the next step() (see step()), and its last output comes then.
                req.pending_stop, req.pending_text = update.stop_str, new_text
                self._stopping.append(req)
                return None
            if update.stop_str is not None:
                if self._continues_elsewhere(req, finish):
                    # It ended at its length and lent its KV (finish_request ran first), but
                    # its text stops it: no decode job comes, so the KV goes back now, not
                    # after abort_timeout_s.
                    self.release_lent_kv(req.request_id)
                finish = ("stop", update.stop_str)
                req.stop_reason = update.stop_str
                req.status = RequestStatus.FINISHED_STOPPED
            if finish is not None and not self._continues_elsewhere(req, finish):
                new_text += req.detokenizer.finish()
                if update.stop_str is None and req.detokenizer.stop_str is not None:
                    # The flushed tail (an unfinished character) completed a stop string.
                    req.stop_reason = req.detokenizer.stop_str
                    req.status = RequestStatus.FINISHED_STOPPED
        return self._output(req, [token], new_text)

    def _forward(self, chunks: list) -> tuple[list[Request], SamplerOutput]:
        """Run the model on `chunks` and sample the requests that complete a chunk. Changes
        no request's state, so a failed forward can be run again (it rewrites the same KV)."""
        logits = self.runner.execute(chunks)
        sampling = [c.request for c in chunks if c.sample]
        if not sampling:
            return [], SamplerOutput([], [])
        rows = _sampling_rows(sampling)
        self.structured.apply_bitmask(logits, [r.request_id for r in sampling])
        return sampling, self.sampler(logits, rows)

    def _isolate_failure(self, chunks: list, error: Exception, outputs: list[RequestOutput]):
        """A batch's forward raised: run each chunk alone, fail only the requests whose own
        chunk raises (their error goes to `outputs`), and go on with the rest. Slow, but
        only after a fault; one bad request must not end every request in the batch."""
        log.warning("engine step over %d requests failed (%s: %s): retrying them one by one", len(chunks),
                    type(error).__name__, error)
        kept, results = [], []
        for c in chunks:
            try:
                results.append(self._forward([c]))
            except Exception as e:
                log.exception("request_id=%s: engine step failed: failing this request", c.request.request_id)
                if (out := self.fail_request(c.request.request_id, f"engine error: {type(e).__name__}: {e}")):
                    outputs.append(out)
                continue
            kept.append(c)
        return kept, results

    def _poll_connector(self) -> list[RequestOutput]:
        """Apply what the KV connector finished: loaded requests join the running batch,
        failed ones end with an error, lent blocks come back."""
        if self.connector is None:
            return []
        events = self.connector.poll()
        outputs = []
        for blocks in events.blocks_to_free:
            self.scheduler.release_blocks(blocks)
        for request_id, failed in events.loads_done:
            if request_id in self.scheduler.waiting_for_remote_kv:
                req = self.scheduler.waiting_for_remote_kv[request_id]
                tokens = events.remote_outputs.get(request_id)
                if tokens and req.awaits_remote_output:  # a job resent with those tokens has them already
                    self._continue_from(req, tokens)
                self.scheduler.remote_kv_ready(request_id, failed)
        for request_id, message in events.loads_failed:
            out = self.fail_request(request_id, message, unavailable=True)
            if out is not None:
                outputs.append(out)
        return outputs

    def _continue_from(self, req: Request, tokens: list[int]) -> None:
        """A streamed pull brought the tokens the producer sampled (the router already sent
        them to the client): take them as this request's own, as if they had come with it,
        so its detokenizer and grammar continue from the same state."""
        req.output_token_ids += tokens
        if req.detokenizer is not None:
            req.detokenizer.append(tokens)
        if req.params.structured_outputs is not None:
            for t in tokens:
                if self.structured.accept_tokens([req.request_id], [t]):
                    log.warning("request_id=%s: the producer's token %d does not fit the grammar here", req.request_id, t)

    @property
    def wakeup_fd(self) -> int | None:
        """Readable when the KV connector has news (a load ended): the node loop sleeps on it."""
        return self.connector.wakeup_fd if self.connector is not None else None

    def drain_wakeup(self) -> None:
        if self.connector is not None:
            self.connector.drain_wakeup()

    @staticmethod
    def _continues_elsewhere(req: Request, finish: tuple) -> bool:
        """A prefill that reached the length the router asked for goes on on a decode node,
        whose detokenizer picks up from the same state: text held back here (a possible
        stop-string start) must stay held back, not be flushed. The connector may already
        have lent the KV (finish_request runs first): its handle then names this request."""
        p = req.kv_transfer_params or {}
        lent = p.get("do_remote_prefill") and p.get("remote_request_id") == req.request_id
        return finish[0] == "length" and bool(p.get("do_remote_decode") or lent)

    def release_lent_kv(self, request_id: str) -> None:
        if self.connector is not None:
            self.connector.release_lent(request_id)

    def producer_down(self, engine_id: str) -> None:
        """The router saw that KV producer die: stop waiting for loads from it."""
        if self.connector is not None:
            self.connector.producer_down(engine_id)

    def producer_up(self, engine_id: str) -> None:
        """That producer answers again: load from it again."""
        if self.connector is not None:
            self.connector.producer_up(engine_id)

    def _output(self, req: Request, new_tokens: list[int], new_text: str) -> RequestOutput:
        if req.status.finished:
            self.structured.remove(req.request_id)
        text = req.detokenizer.text if req.detokenizer is not None else ""
        completion = CompletionOutput(0, text, req.output_token_ids,
                                      req.logprobs if req.params.logprobs is not None else None,
                                      req.status.finish_reason, req.stop_reason)
        return RequestOutput(req.request_id, req.prompt_token_ids, [completion], req.status.finished,
                             prompt=req.prompt_text, new_token_ids=new_tokens,
                             new_text=new_text, num_cached_tokens=req.num_cached_tokens, error=req.error,
                             error_is_client_side=req.error_is_client_side,
                             error_is_unavailable=req.error_is_unavailable,
                             kv_transfer_params=req.kv_transfer_params if req.status.finished else None)

    def stats(self) -> EngineStats:
        """Counters now, and the queue peaks since the previous call (which resets them)."""
        s = self.scheduler
        stats = EngineStats(len(s.running), len(s.waiting), len(s.waiting_for_remote_kv), self.pool.num_blocks,
                            self.pool.num_free, self.pool.num_cached, self.pool.stats.queries, self.pool.stats.hits,
                            s.num_preemptions, self.connector.stats() if self.connector else {},
                            max(self._peak_running, len(s.running)),
                            max(self._peak_waiting, len(s.waiting) + len(s.waiting_for_remote_kv)),
                            prefix_cache_query_tokens=self.pool.stats.query_tokens,
                            prefix_cache_hit_tokens=self.pool.stats.hit_tokens,
                            kv_evictions=self.pool.stats.evictions,
                            kv_protected_evictions=self.pool.stats.protected_evictions,
                            kv_cache_digest=self.pool.cached_digest, eviction_policy=self.pool.eviction_policy,
                            forks=s.fork_stats.forks, fork_blocks_shared=s.fork_stats.blocks_shared,
                            fork_blocks_copied=s.fork_stats.blocks_copied, fork_tokens_saved=s.fork_stats.tokens_saved,
                            fork_fallbacks=s.fork_stats.fallbacks, tokens_computed=self.num_tokens_computed)
        self._peak_running = self._peak_waiting = 0
        return stats
