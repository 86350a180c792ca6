"""The engine both node kinds run: add_request / step / abort over one model and one
paged KV cache. Single-threaded: whoever owns the engine calls it from one thread."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from engine.block_pool import BlockPool
from engine.builtin_models import resolve_builtin
from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.detokenizer import IncrementalDetokenizer, check_stop
from engine.hashing import safe_hash
from engine.kv_cache import KV_LAYOUT, KVCacheSpec, allocate_kv_cache, num_blocks_for_budget
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, EngineStats, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import Sampler, SamplingRow
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.structured_output.manager import StructuredOutputManager
from engine.tokenizer import Tokenizer
from engine.weights import build_model

log = logging.getLogger(__name__)

GIB = 1 << 30


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
        self.kv_spec = KVCacheSpec(num_blocks, self.model_config.num_layers, cache.block_size,
                                   self.model_config.num_kv_heads, self.model_config.head_dim, self.dtype)
        self.kv_cache = allocate_kv_cache(self.kv_spec, self.device)
        self.pool = BlockPool(num_blocks, cache.enable_prefix_caching)
        self.connector = self._build_connector()
        self.scheduler = Scheduler(cache, config.scheduler, self.pool, self.connector)
        self.runner = ModelRunner(self.model, self.kv_cache, cache.block_size, self.device)
        self.sampler = Sampler()
        self.structured = StructuredOutputManager(self.tokenizer, self.model_config.vocab_size, self.device)
        self.max_model_len = config.scheduler.max_model_len or self.model_config.max_position_embeddings
        self._rng = random.Random()
        self.idle = True  # the last step ran no model
        self._peak_running = self._peak_waiting = 0  # since the last stats()
        self.num_tokens_computed = 0  # tokens whose KV this engine computed (not loaded)
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

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()

    def _kv_budget_bytes(self) -> int:
        cache = self.config.cache
        if self.device.type != "cuda":
            return int(cache.cpu_kv_cache_gib * GIB)
        free, _ = torch.cuda.mem_get_info(self.device)
        headroom = 2 * GIB  # activations and logits of the largest step
        return max(int(free * cache.memory_fraction) - headroom, 0)

    # --- requests -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None, *,
                    output_token_ids: list[int] | None = None,
                    kv_transfer_params: dict | None = None) -> Request:
        """Queue a request. `output_token_ids` continues a generation another engine began
        (a decode node receives the token the prefill node sampled); `kv_transfer_params`
        tells the KV connector where this request's prompt KV can be pulled from."""
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
                      kv_transfer_params=kv_transfer_params, prompt_text=text)
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
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish_request(req, RequestStatus.FINISHED_ABORTED)
        return self._output(req, [], "")

    def fail_request(self, request_id: str, error: str) -> RequestOutput | None:
        """End a request with an error (a KV load that failed under the `fail` policy)."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return None
        req.error = error
        self.scheduler.finish_request(req, RequestStatus.FINISHED_ERROR)
        return self._output(req, [], "")

    @property
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # --- the step -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that produced
        a token or finished."""
        outputs = self._poll_connector()
        sched = self.scheduler.schedule()
        s = self.scheduler
        self._peak_running = max(self._peak_running, len(s.running))
        self._peak_waiting = max(self._peak_waiting, len(s.waiting) + len(s.waiting_for_remote_kv))
        chunks = [c for c in sched.chunks if c.num_tokens > 0]
        self.idle = not chunks
        if not chunks:
            return outputs
        logits = self.runner.execute(chunks)
        for c in chunks:
            self.scheduler.chunk_done(c)
            self.num_tokens_computed += c.num_tokens
        sampling = [c.request for c in chunks if c.sample]
        if sampling:
            rows = [SamplingRow(r.params, r.seed, r.prompt_token_ids, r.output_token_ids) for r in sampling]
            ids = [r.request_id for r in sampling]
            self.structured.apply_bitmask(logits, ids)  # structured outputs: a no-op without grammars
            sampled = self.sampler(logits, rows)
            broken = self.structured.accept_tokens(ids, sampled.token_ids)
            outputs += [self._append_token(r, tok, lp)
                        for r, tok, lp in zip(sampling, sampled.token_ids, sampled.logprobs)]
            outputs += [out for rid in broken if (out := self.fail_request(
                rid, "the sampler picked a token the request's grammar forbids (a ban such as min_tokens "
                     "left no allowed token): relax min_tokens or bad_words")) is not None]
        return outputs

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
                self.scheduler.remote_kv_ready(request_id, failed)
        for request_id, message in events.loads_failed:
            out = self.fail_request(request_id, message)
            if out is not None:
                outputs.append(out)
        return outputs

    def _append_token(self, req: Request, token: int, logprobs) -> RequestOutput:
        req.output_token_ids.append(token)
        if logprobs is not None:
            req.logprobs.append(logprobs)
        params = req.params
        finish = check_stop(token, len(req.output_token_ids), params, params.eos_token_ids, req.max_tokens)
        new_text = ""
        if req.detokenizer is not None:
            update = req.detokenizer.append([token], last_is_stop_token=finish is not None and finish[0] == "stop")
            new_text = update.text
            if update.stop_str is not None:
                finish = ("stop", update.stop_str)  # a stop string ends it, even on the last allowed token
            if finish is not None and not self._continues_elsewhere(req, finish):
                new_text += req.detokenizer.finish()
        if finish is not None:
            reason, req.stop_reason = finish
            status = RequestStatus.FINISHED_STOPPED if reason == "stop" else RequestStatus.FINISHED_LENGTH
            self.scheduler.finish_request(req, status)
        return self._output(req, [token], new_text)

    @staticmethod
    def _continues_elsewhere(req: Request, finish: tuple) -> bool:
        """A prefill that reached the length the router asked for goes on on a decode node,
        whose detokenizer picks up from the same state: text held back here (a possible
        stop-string start) must stay held back, not be flushed."""
        return finish[0] == "length" and bool(req.kv_transfer_params and req.kv_transfer_params.get("do_remote_decode"))

    def release_lent_kv(self, request_id: str) -> None:
        if self.connector is not None:
            self.connector.release_lent(request_id)

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
                             kv_transfer_params=req.kv_transfer_params if req.status.finished else None)

    def stats(self) -> EngineStats:
        """Counters now, and the queue peaks since the previous call (which resets them)."""
        s = self.scheduler
        stats = EngineStats(len(s.running), len(s.waiting), len(s.waiting_for_remote_kv), self.pool.num_blocks,
                            self.pool.num_free, self.pool.num_cached, self.pool.stats.queries, self.pool.stats.hits,
                            s.num_preemptions, self.connector.stats() if self.connector else {},
                            max(self._peak_running, len(s.running)),
                            max(self._peak_waiting, len(s.waiting) + len(s.waiting_for_remote_kv)))
        self._peak_running = self._peak_waiting = 0
        return stats
