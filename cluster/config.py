"""The `cluster.yaml` schema: what runs where, checked before anything starts.

`load_cluster_config(path)` reads the file and either returns a `ClusterConfig` or raises
`ClusterConfigError`, whose message holds one line per problem, each naming the field:

    cluster.yaml: decode.devices: 3 devices for 2 replicas: give one device, or one per replica

Every section refuses unknown keys (`extra="forbid"`), so a typo is an error, not a
silently ignored setting. `node_specs()` turns the file into the list of nodes to start,
with each node's device, ports and engine settings resolved; the launcher needs nothing
else from this module. This module imports no torch: `pdcluster --help` and a bad file
answer at once.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

Role = Literal["prefill", "decode", "both"]
KV_ROLES = {"prefill": "kv_producer", "decode": "kv_consumer", "both": None}  # `both`: see NodeSpec.kv_role
PORTS_PER_NODE = 2  # a node's HTTP/control port, then its KV handshake port
_DEVICE = re.compile(r"cpu|auto|cuda:\d+")
RAY_MIN_RESOURCE = 0.0001  # Ray's resource granularity (ray_constants.MIN_RESOURCE_GRANULARITY)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSettings(_Section):
    path: str = "builtin:tiny"
    """`builtin:NAME` (made on first use, see engine/builtin_models.py) or a Hugging Face
    model directory (config.json, *.safetensors, tokenizer.json)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    seed: int = 0
    """Seed of `dummy` random weights; every node uses it, so their weights agree."""
    generation_config: Literal["auto", "vllm"] = "auto"
    """As vLLM's `--generation-config`: `auto` takes the sampling defaults of the model's
    generation_config.json (temperature, top_p, top_k, min_p, repetition_penalty, and
    max_new_tokens as the default max_tokens) for every field a request does not send;
    `vllm` ignores them (the API's neutral defaults)."""

    @field_validator("path")
    @classmethod
    def _path_given(cls, v: str) -> str:
        if not v.strip() or v.strip() == "builtin:":
            raise ValueError("empty: give builtin:NAME (e.g. builtin:tiny) or a Hugging Face model directory")
        return v


class EngineSettings(_Section):
    """Cache and scheduler knobs of every node (engine/config.py's CacheConfig and
    SchedulerConfig). `num_blocks: null` sizes the KV cache from `memory_fraction` of free
    GPU memory, or from `cpu_kv_cache_gib` on CPU."""

    block_size: int = 16
    num_blocks: int | None = Field(default=None, ge=2)
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    cpu_kv_cache_gib: float = Field(default=0.25, gt=0)
    memory_fraction: float = Field(default=0.85, gt=0, le=1)
    enforce_eager: bool = False
    """GPU only: true runs every step eagerly (no CUDA graphs for decode steps)."""
    eviction_policy: Literal["workflow", "lru"] = "workflow"
    """Which cached prefix blocks go first when room is needed: `workflow` keeps blocks of
    workflows with requests in flight or active within `workflow_ttl_s` until the rest is
    gone; `lru` ignores workflows."""
    workflow_ttl_s: float = Field(default=60.0, gt=0)
    prefix_hash_algo: Literal["sha256_64", "sha256"] = "sha256_64"
    """The block hash of the prefix cache and of KV events (README: the block hash
    contract); `sha256` (128-bit keys) where tenants must not be able to craft collisions."""

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 1 or v & (v - 1):
            raise ValueError(f"{v} is not a power of two: use 16 (the default), 32, ...")
        return v


class EngineOverrides(EngineSettings):
    """A role's `engine:` section: only the keys written there replace the top-level
    `engine:` values (so `num_blocks: null` here does mean "size it automatically")."""


class DisaggregationSettings(_Section):
    """Per request: prefill on another node and pull the KV, or prefill on the decode node
    itself (router/disaggregation.py). In the spirit of Dynamo's conditional
    disaggregation (max_local_prefill_length, prefill queue check)."""

    mode: Literal["always", "conditional", "never"] | None = None
    """`always`: every request's prefill runs on a prefill node (or another `both` node)
    when one is up. `conditional`: only when the prompt tokens the decode node does not
    already hold in its prefix cache exceed `max_local_prefill_tokens` and a prefill node
    has fewer than `max_prefill_queue` prefills waiting; a colocated decode node lends only
    to a node cheaper on prefill tokens ahead and requests in flight. `never`: one node serves each
    request whole. Not `never`: `both` (colocated) nodes lend KV to each other too.
    null (default): `always` with prefill and decode nodes, `never` with only colocated
    nodes; colocated nodes beside prefill/decode nodes then serve nothing (as before)."""
    max_local_prefill_tokens: int = Field(default=512, ge=0)
    """conditional: prompts with at most this many uncached tokens prefill on the decode node."""
    max_prefill_queue: int = Field(default=4, ge=1)
    """conditional: a prefill candidate with this many prefills waiting (sent by this router,
    first token not yet back) takes no more remote prefills; the decode node prefills."""


class RouterSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    policy: Literal["round_robin", "least_loaded", "prefix_aware"] = "round_robin"
    api_key: str | None = Field(default=None, validate_default=True)
    """Clients must send `Authorization: Bearer KEY`; default: $PDCLUSTER_API_KEY, else none."""
    max_concurrent_requests: int | None = Field(default=None, ge=1)
    """Admission control: requests beyond this many in flight are refused (HTTP 429);
    null: no limit."""
    max_request_body_bytes: int = Field(default=16 << 20, ge=1024)
    """Larger request bodies are refused (HTTP 413) before they are read whole."""
    protect_admin_endpoints: bool = False
    """With an api_key: also require it for /cluster and /metrics (node pids, socket
    addresses). /health stays open for load balancers."""
    node_timeout_s: float = Field(default=5.0, gt=0)
    """A node that has not answered the router's health checks for this long is declared
    down: its requests are failed over (or fail), and aborted there if it wakes up."""
    dispatch_to_both: bool = True
    """Send a request's decode job together with its prefill job: the decode node reserves
    its blocks and pulls each block as soon as it is computed (the transfer overlaps a
    chunked prefill), then continues from the prefill's first token. false: the decode
    job follows the prefill's answer (one more hop; the whole transfer after the prefill)."""
    tool_call_parser: str | None = None
    """hermes | llama3_json | module:Class: turns the model's text into `tool_calls`
    (needed for tool_choice auto; required and named choices work without it)."""
    disaggregation: DisaggregationSettings = Field(default_factory=DisaggregationSettings)
    """Per-request choice of remote or local prefill (see DisaggregationSettings)."""

    @field_validator("tool_call_parser")
    @classmethod
    def _known_tool_parser(cls, v: str | None) -> str | None:
        if v:
            from router.tool_parsers import ToolParserManager
            ToolParserManager.get(v)
        return v or None

    @field_validator("api_key")
    @classmethod
    def _key_from_env(cls, v: str | None) -> str | None:
        return v or os.environ.get("PDCLUSTER_API_KEY") or None


class StructuredOutputsSettings(_Section):
    """vLLM's structured_outputs_config: the default grammar backend and options (a
    request may name its own backend with `guided_decoding_backend` or
    `structured_outputs.backend`), and the reasoning parser whose end the grammar waits for."""

    backend: Literal["auto", "xgrammar", "guidance", "llguidance", "outlines", "lm-format-enforcer"] = "auto"
    """auto: xgrammar, else guidance (llguidance), whichever is installed."""
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    reasoning_parser: str | None = None
    """deepseek_r1 | qwen3 | module:Class: chat answers carry `reasoning_content`."""
    enable_in_reasoning: bool = False
    """Apply the grammar to the reasoning too (default: only to the answer after it)."""

    @field_validator("reasoning_parser")
    @classmethod
    def _known_reasoning_parser(cls, v: str | None) -> str | None:
        if v:
            from router.reasoning import ReasoningParserManager
            ReasoningParserManager.get(v)
        return v or None


class KVTransferSettings(_Section):
    """Becomes kv_connector.config.KVTransferConfig on each node (see `kv_transfer_config`)."""

    connector: str = "nixl"
    """`nixl`, `tcp`, `cuda_ipc` (GPU processes of one host, one GPU shared included), or a
    `module:Class` path to a connector class."""
    load_failure_policy: Literal["recompute", "fail"] = "recompute"
    abort_timeout_s: float = Field(default=120.0, gt=0)
    """A prefill node frees KV blocks no decode node has claimed after this long."""
    transfer_timeout_s: float = Field(default=30.0, gt=0)
    """A decode node gives up on a handshake or transfer that takes longer."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Connector-specific options (kv_connector_extra_config)."""

    @field_validator("connector")
    @classmethod
    def _known_connector(cls, v: str) -> str:
        if v not in ("nixl", "tcp", "cuda_ipc") and not re.fullmatch(r"[\w.]+:[\w.]+", v):
            raise ValueError(f"{v!r} is not a connector: use nixl, tcp, cuda_ipc or a module:Class path")
        return v


class RoleSettings(_Section):
    replicas: int = Field(default=1, ge=0)
    devices: list[str] = Field(default_factory=lambda: ["auto"])
    """One device per replica, or one for all: `cpu`, `cuda:N`, or `auto` (the next GPU
    round-robin, cpu when there is none)."""
    engine: EngineOverrides = Field(default_factory=EngineOverrides)
    resources: dict[str, float] = Field(default_factory=dict)
    """backend ray: what each of the role's nodes asks Ray for, which says where it goes:
    `CPU` and `GPU` counts, and custom resources or labels (e.g. `{GPU: 1,
    "accelerator_type:H200": 0.001}`, or `{prefill_box: 1}` given to `ray start
    --resources`). Empty: no CPU reserved, any Ray node. Ignored by backend local."""

    @field_validator("resources")
    @classmethod
    def _resources_non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        # Ray's own rules, checked here so a bad amount fails before Ray starts (Ray says
        # it only when the first actor is created, in a garbled message).
        for k, x in v.items():
            if x < 0:
                raise ValueError(f"{k}: {x} is negative: give an amount of 0 or more")
            if 0 < x < RAY_MIN_RESOURCE:
                raise ValueError(f"{k}: {x} is below the smallest amount Ray counts ({RAY_MIN_RESOURCE}): give 0 "
                                 f"or at least {RAY_MIN_RESOURCE}")
            if x > 1 and not float(x).is_integer():
                raise ValueError(f"{k}: {x}: Ray takes amounts above 1 in whole units only: give {int(x)} or "
                                 f"{int(x) + 1} (or a fraction below 1, e.g. 0.5, to share one)")
        return v

    @field_validator("devices")
    @classmethod
    def _devices_fit(cls, devices: list[str], info) -> list[str]:
        bad = [d for d in devices if not _DEVICE.fullmatch(d)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a device: use cpu, auto or cuda:N (e.g. cuda:0)")
        replicas = info.data.get("replicas", 0)
        if not devices:  # nodes added by `pdcluster scale` take theirs from this list too
            raise ValueError("no devices: give one device (cpu, auto, cuda:N), or one per replica")
        if 1 < len(devices) < replicas:
            raise ValueError(f"{len(devices)} devices for {replicas} replicas: give one device, one per replica, "
                             "or more (nodes added by `pdcluster scale` take the next ones)")
        return devices

    def device_of(self, index: int) -> str:
        return self.devices[index] if len(self.devices) > 1 else self.devices[0]


class ColocatedSettings(RoleSettings):
    replicas: int = Field(default=0, ge=0)


class RaySettings(_Section):
    """backend ray: which Ray cluster, and the namespace our actors are named in."""

    address: str = "auto"
    """`auto`: join the Ray cluster running on this machine (`ray start --head` ran here, or
    RAY_ADDRESS is set); `local`: start a private one for this cluster (a laptop); or
    HOST:PORT of a head node."""
    namespace: str = "pdcluster"
    max_restarts: int = Field(default=3, ge=0)
    """How often Ray restarts a node's actor that died (then it rejoins the router). Past
    that, the launcher replaces it with a fresh actor under the same id, after a backoff."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] | None = None
    """Place the nodes `pdcluster up` starts as one Ray placement group with this strategy
    (one bundle per node, its role's resources): STRICT_PACK keeps them on one machine
    (e.g. prefill and decode over NVLink), STRICT_SPREAD one per machine. Null: each actor
    is placed on its own. A node added by `pdcluster scale` takes the bundle of a node of its
    role that left, when there is one; else it is placed on its own."""

    @field_validator("address")
    @classmethod
    def _address_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty: use auto, local or HOST:PORT of the Ray head")
        return v.strip()

    @field_validator("namespace")
    @classmethod
    def _namespace_given(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("empty: give a name (e.g. pdcluster); the actors are named in it")
        return v.strip()


_SECTIONS = ("model", "router", "kv_transfer", "engine", "prefill", "decode", "colocated", "structured_outputs",
             "ray")


def section_of(role: str) -> str:
    """The cluster.yaml section of a node role (`both` nodes are `colocated`)."""
    return "colocated" if role == "both" else role


@dataclass(slots=True, frozen=True)
class NodeSpec:
    """One serving process to start. `port`/`kv_port` are 0 when the node should pick free
    ports (nodes_base_port: 0)."""

    role: Role          # prefill (kv_producer) | decode (kv_consumer) | both (colocated)
    index: int          # position among the nodes of its role
    device: str         # cpu or cuda:N (auto already resolved)
    engine: EngineSettings
    port: int = 0
    kv_port: int = 0
    shares_kv: bool = False  # role `both` only: lends and pulls KV (ClusterConfig.colocated_share_kv)

    @property
    def name(self) -> str:
        return f"{self.role}-{self.index}"

    @property
    def kv_role(self) -> str | None:
        """`both` nodes transfer nothing, unless they lend KV to each other (kv_both)."""
        if self.role == "both":
            return "kv_both" if self.shares_kv else None
        return KV_ROLES[self.role]


class ClusterConfig(_Section):
    model: ModelSettings = Field(default_factory=ModelSettings)
    router: RouterSettings = Field(default_factory=RouterSettings)
    kv_transfer: KVTransferSettings = Field(default_factory=KVTransferSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)
    prefill: RoleSettings = Field(default_factory=RoleSettings)
    decode: RoleSettings = Field(default_factory=RoleSettings)
    colocated: ColocatedSettings = Field(default_factory=ColocatedSettings)
    structured_outputs: StructuredOutputsSettings = Field(default_factory=StructuredOutputsSettings)
    backend: Literal["local", "ray"] = "local"
    ray: RaySettings = Field(default_factory=RaySettings)
    nodes_base_port: int = Field(default=0, ge=0, le=65535)
    """0: every node picks free ports. Else node k (in node_specs() order) listens on
    base + 2k (HTTP/control) and base + 2k + 1 (KV handshake)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_defaults(cls, data: Any) -> Any:
        # `router:` with every child commented out reads as None: mean the defaults.
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if not (k in _SECTIONS and v is None)}
            if isinstance(data.get("log_level"), str):
                data["log_level"] = data["log_level"].lower()
        return data

    @model_validator(mode="after")
    def _serving_topology(self) -> ClusterConfig:
        p, d, c = self.prefill.replicas, self.decode.replicas, self.colocated.replicas
        problems = []
        if p and not d:
            problems.append(f"prefill.replicas: {p} prefill node(s) but no decode node: a prefill node "
                            "cannot serve alone; set decode.replicas to 1 or more, or prefill.replicas to 0")
        elif d and not p:
            problems.append(f"decode.replicas: {d} decode node(s) but no prefill node: set prefill.replicas "
                            "to 1 or more, or use colocated.replicas for nodes that do both")
        elif not (p or c):
            problems.append("prefill.replicas: no serving node: set prefill.replicas and decode.replicas "
                            "to 1 or more, or colocated.replicas to 1 or more")
        base, n = self.nodes_base_port, p + d + c
        if base and base + PORTS_PER_NODE * n - 1 > 65535:
            problems.append(f"nodes_base_port: {n} nodes need ports {base}..{base + PORTS_PER_NODE * n - 1}, "
                            "past 65535: lower it, or use 0 to pick free ports")
        elif base and self.router.port and base <= self.router.port < base + PORTS_PER_NODE * n:
            problems.append(f"router.port: {self.router.port} falls in the nodes' ports "
                            f"{base}..{base + PORTS_PER_NODE * n - 1}: move one of them")
        problems += self._engine_problems()
        if problems:
            raise PydanticCustomError("cluster_topology", "\n".join(problems))
        return self

    @model_validator(mode="after")
    def _fits_backend_ray(self) -> ClusterConfig:
        """What backend ray cannot honour is refused, not ignored: Ray decides where a node
        runs, so the node picks its ports there, and Ray gives it its GPU."""
        if self.backend != "ray":
            return self
        problems = []
        if self.nodes_base_port:
            problems.append(f"nodes_base_port: {self.nodes_base_port}: with backend ray every node picks free ports "
                            "on the machine Ray places it on (several may share one): remove it, or set it to 0")
        for role, settings in self.roles():
            section = section_of(role)
            if "devices" not in settings.model_fields_set:
                continue
            gpus = [d for d in settings.devices if d.startswith("cuda")]
            if gpus:
                problems.append(f"{section}.devices: {gpus[0]}: with backend ray, Ray gives each node its GPUs: ask "
                                f"for them with {section}.resources: {{GPU: 1}} and leave devices out (auto), or "
                                "use cpu")
            elif "cpu" in settings.devices and settings.resources.get("GPU", 0) > 0:
                problems.append(f"{section}.devices: cpu, but {section}.resources asks Ray for GPU "
                                f"{settings.resources['GPU']}, which would sit idle: drop one of the two")
        if problems:
            raise PydanticCustomError("cluster_topology", "\n".join(problems))
        return self

    def role_engine(self, settings: RoleSettings) -> EngineSettings:
        """The top-level `engine:` with the role's overrides (only the keys written there)."""
        return self.engine.model_copy(update=settings.engine.model_dump(exclude_unset=True))

    def _engine_problems(self) -> list[str]:
        """What each role's engine (the top-level `engine:` with its overrides) would refuse
        only once its nodes start, or what would make their KV useless to each other."""
        problems, block_sizes = [], {}
        for role, settings in self.roles():
            where = f"{section_of(role)}.engine"
            engine = self.role_engine(settings)
            if (not engine.enable_chunked_prefill and engine.max_model_len is not None
                    and engine.max_num_batched_tokens < engine.max_model_len):
                source = where if {"enable_chunked_prefill", "max_model_len", "max_num_batched_tokens"} & (
                    settings.engine.model_fields_set) else "engine"
                problem = (f"{source}.max_num_batched_tokens: {engine.max_num_batched_tokens} is below max_model_len "
                           f"{engine.max_model_len} with enable_chunked_prefill false: a prompt that long could never "
                           "be scheduled; raise it, or turn chunked prefill on")
                if problem not in problems:
                    problems.append(problem)
            if settings.replicas and (role != "both" or self.colocated_share_kv):
                block_sizes[where] = engine.block_size
        if len(set(block_sizes.values())) > 1:
            problems.append("engine.block_size: the nodes that move KV between them need one block size, got "
                            + ", ".join(f"{k}.block_size {v}" for k, v in block_sizes.items()))
        return problems

    @property
    def colocated_share_kv(self) -> bool:
        """Whether `both` nodes lend KV to each other (and to decode nodes) and pull it: a
        mode other than `never` given in the file. The default keeps colocated nodes whole."""
        return self.router.disaggregation.mode in ("always", "conditional")

    def idle_colocated_nodes(self) -> str | None:
        """What to say when colocated nodes would get no work: beside prefill and decode
        nodes with `router.disaggregation.mode` unset (`always`, which sends every request
        to the prefill/decode pair and keeps colocated nodes whole), they serve nothing."""
        if self.colocated.replicas and self.prefill.replicas and self.router.disaggregation.mode is None:
            return (f"colocated: {self.colocated.replicas} node(s) beside prefill and decode nodes serve nothing "
                    "while router.disaggregation.mode is unset: set it to conditional (they serve, and lend or "
                    "take prefills when that pays) or always, or set colocated.replicas to 0")
        return None

    @classmethod
    def default(cls) -> ClusterConfig:
        """The embedded default (the shipped cluster.yaml): builtin:tiny in float32, one
        prefill and one decode node (`auto`: the first GPUs, cpu without one), NIXL transfer,
        recompute on failure."""
        return cls()

    def roles(self) -> list[tuple[Role, RoleSettings]]:
        return [("prefill", self.prefill), ("decode", self.decode), ("both", self.colocated)]

    def node_specs(self, num_gpus: int | None = None) -> list[NodeSpec]:
        """Every node to start: prefill nodes, then decode, then colocated (`both`).

        `auto` devices become cuda:0, cuda:1, ... round-robin in that order (cpu without a
        GPU); `num_gpus` is how many there are, asked of torch when None and needed.
        """
        specs = []
        autos = 0
        for role, settings in self.roles():
            engine = self.role_engine(settings)
            for i in range(settings.replicas):
                device = settings.device_of(i)
                if device == "auto":
                    if num_gpus is None:
                        num_gpus = _visible_gpu_count()
                    device = f"cuda:{autos % num_gpus}" if num_gpus else "cpu"
                    autos += 1
                port = self.nodes_base_port + PORTS_PER_NODE * len(specs) if self.nodes_base_port else 0
                specs.append(NodeSpec(role, i, device, engine, port, port + 1 if port else 0,
                                      shares_kv=role == "both" and self.colocated_share_kv))
        return specs

    def devices_not_here(self, specs: list[NodeSpec], num_gpus: int | None = None) -> list[str]:
        """One line per node whose `cuda:N` this machine does not have (`num_gpus` visible,
        asked of torch when None): said before anything starts, naming the field, instead
        of as a CUDA error in the tail of a node's log once the others have loaded."""
        problems = []
        for s in specs:
            if not s.device.startswith("cuda:"):
                continue
            num_gpus = _visible_gpu_count() if num_gpus is None else num_gpus
            if int(s.device.partition(":")[2]) < num_gpus:
                continue
            have = ("torch sees no CUDA GPU here: use cpu (or auto)" if not num_gpus else
                    f"this machine has {num_gpus} GPU{'s' * (num_gpus != 1)} (cuda:0..cuda:{num_gpus - 1})")
            problems.append(f"{section_of(s.role)}.devices: {s.device} for {s.name}: {have}")
        return problems

    def share_gpus(self, specs: list[NodeSpec]) -> list[NodeSpec]:
        """`specs` with the KV memory of nodes that share a GPU divided between them. Each
        node sizes its KV cache from the GPU memory free when it starts, and the nodes of a
        cluster start together: each would take `memory_fraction` of the same memory, and
        the last to allocate would run out. So where `memory_fraction` is left unset, the
        nodes of one GPU split the default (0.85) evenly (what explicit fractions there
        leave of it); explicit fractions of one GPU must sum to at most 1
        (ClusterConfigError). For nodes of this machine (`backend: local`): Ray gives each
        node a GPU of its own."""
        by_gpu: dict[str, list[NodeSpec]] = {}
        for s in specs:
            if s.device.startswith("cuda") and s.engine.num_blocks is None:
                by_gpu.setdefault(s.device, []).append(s)
        default = EngineSettings.model_fields["memory_fraction"].default
        share: dict[str, float] = {}
        problems = []
        for device, group in by_gpu.items():
            if len(group) < 2:
                continue
            unset = [s for s in group if "memory_fraction" not in s.engine.model_fields_set]
            given = sum(s.engine.memory_fraction for s in group if s not in unset)
            names = " and ".join(s.name for s in group)
            if given > 1 + 1e-9 or (unset and given > default - 0.05 * len(unset)):
                sections = "/".join(sorted({section_of(s.role) for s in group}))
                fractions = " + ".join(f"{s.engine.memory_fraction:g}" for s in group if s not in unset)
                wrong = (f"their fractions ({fractions}) sum to more than 1" if not unset else
                         f"the fractions set ({fractions}) leave too little of {default:g} for "
                         f"{', '.join(s.name for s in unset)}")
                problems.append(f"{sections}.engine.memory_fraction: {names} share {device} and start together, each "
                                f"sizing its KV cache from the memory free then, and {wrong}: give fractions that "
                                f"sum to at most 1 (about {default / len(group):.2f} each), or leave memory_fraction "
                                f"unset to split {default:g} evenly")
                continue
            for s in unset:
                share[s.name] = (default - given) / len(unset)
        if problems:
            raise ClusterConfigError(problems)
        return [replace(s, engine=s.engine.model_copy(update={"memory_fraction": share[s.name]}))
                if s.name in share else s for s in specs]

    def kv_nodes_sharing_a_gpu(self, specs: list[NodeSpec]) -> str | None:
        """'prefill-0 and decode-0 share cuda:0' when nodes that move KV between them over
        NIXL sit on one GPU (UCX has no fast path between processes of one device), else None."""
        if self.kv_transfer.connector != "nixl":
            return None
        by_device: dict[str, list[str]] = {}
        for s in specs:
            if s.device.startswith("cuda") and s.kv_role is not None:
                by_device.setdefault(s.device, []).append(s.name)
        for device, names in by_device.items():
            if len(names) > 1:
                return f"{' and '.join(names)} share {device}"
        return None

    def node_spec(self, role: Role, index: int, num_gpus: int | None = None, busy: Sequence[str] = ()) -> NodeSpec:
        """A node added while serving (`pdcluster scale`): the role's settings, free ports,
        and its device by index (`devices` cycled). `auto`: the GPU that the fewest of the
        running nodes (their devices: `busy`) use, the lowest on a tie; round-robin by index
        when `busy` is not known."""
        settings = dict(self.roles())[role]
        engine = self.role_engine(settings)
        device = settings.devices[index % len(settings.devices)]
        if device == "auto":
            num_gpus = _visible_gpu_count() if num_gpus is None else num_gpus
            gpu = min(range(num_gpus), key=lambda g: (list(busy).count(f"cuda:{g}"), g)) if busy and num_gpus else index
            device = f"cuda:{gpu % num_gpus}" if num_gpus else "cpu"
        return NodeSpec(role, index, device, engine, shares_kv=role == "both" and self.colocated_share_kv)

    def with_topology(self, prefill: int = 0, decode: int = 0, colocated: int = 0) -> ClusterConfig:
        """The same cluster on the same hardware, split differently (for the benchmark).

        The device pool is the distinct devices the nodes of this file use, in node order
        (prefill, decode, colocated). The new nodes take devices from it round-robin in that
        same order: with a pool [cuda:0, cuda:1], 1P1D puts prefill on cuda:0 and decode on
        cuda:1, 2P1D puts prefills on cuda:0, cuda:1 and the decode back on cuda:0, and
        colocated2 puts one node on each. Per-role engine overrides are kept.
        """
        pool = list(dict.fromkeys(s.device_of(i) for _, s in self.roles() for i in range(s.replicas)))
        data = self.model_dump(exclude_unset=True)  # unset keys keep their defaults, overrides stay partial
        taken = 0
        for section, n in (("prefill", prefill), ("decode", decode), ("colocated", colocated)):
            devices = [pool[(taken + i) % len(pool)] for i in range(max(n, 1))]  # none: scale-ups' device
            data[section] = {**data.get(section, {}), "replicas": n, "devices": devices}
            taken += n
        try:
            return ClusterConfig.model_validate(data)
        except ValidationError as e:
            where = f"topology {prefill}P{decode}D+{colocated}colocated"
            raise ClusterConfigError([f"{where}: {line}" for err in e.errors() for line in _explain(err)]) from None

    def kv_transfer_config(self, node: NodeSpec, **fields: Any):
        """The node's kv_connector.config.KVTransferConfig (None for colocated nodes, which
        transfer nothing). `fields` set the rest, e.g. engine_id, kv_ip, kv_port."""
        if node.kv_role is None:
            return None
        from kv_connector.config import KVTransferConfig
        kv = self.kv_transfer
        return KVTransferConfig(kv_connector=kv.connector, kv_role=node.kv_role,
                                kv_buffer_device="cpu" if node.device == "cpu" else "cuda",
                                kv_connector_extra_config=dict(kv.extra), load_failure_policy=kv.load_failure_policy,
                                abort_timeout_s=kv.abort_timeout_s, transfer_timeout_s=kv.transfer_timeout_s,
                                **({"kv_port": node.kv_port} | fields))


def parse_topology(name: str) -> tuple[int, int, int]:
    """A benchmark topology name as (prefill, decode, colocated) replicas: `1P1D`, `2P1D`
    (x prefill + y decode nodes), `colocated2` (2 role-`both` nodes). Case-insensitive.
    A name may end in `@MODE`, its router.disaggregation.mode (topology_mode), e.g.
    `colocated2@conditional`."""
    topology_mode(name)
    m = re.fullmatch(r"(\d+)p(\d+)d|colocated(\d+)", name.strip().lower().partition("@")[0])
    if not m:
        raise ValueError(f"topology {name!r}: write xPyD (e.g. 1P1D, 2P1D) or colocatedN (e.g. colocated2)")
    p, d, c = (int(g) if g else 0 for g in m.groups())
    if not (p and d) and not c:
        raise ValueError(f"topology {name!r} has no serving node: it needs x, y >= 1 or N >= 1")
    return p, d, c


def topology_mode(name: str) -> str | None:
    """The disaggregation mode a topology name asks for after `@` (None: the file's)."""
    _, at, mode = name.strip().lower().partition("@")
    modes = typing.get_args(typing.get_args(DisaggregationSettings.model_fields["mode"].annotation)[0])
    if at and mode not in modes:
        raise ValueError(f"topology {name!r}: {mode!r} after @ is not a disaggregation mode: use "
                         f"{', '.join(modes)} (e.g. colocated2@conditional)")
    return mode or None


def _visible_gpu_count() -> int:
    import torch  # only when a device is `auto`
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --- loading and explaining ----------------------------------------------------------
class ClusterConfigError(ValueError):
    """A cluster.yaml that cannot be used. `problems` holds one line per problem, each
    starting with the file name and the field's path; str() joins them with newlines."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def load_cluster_config(path: str | os.PathLike) -> ClusterConfig:
    """Read and check a cluster.yaml; raise ClusterConfigError naming every problem."""
    name = str(path)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClusterConfigError([f"{name}: no such file"]) from None
    except IsADirectoryError:
        raise ClusterConfigError([f"{name}: is a directory, not a cluster.yaml file"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ClusterConfigError([f"{name}: cannot read it: {e}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ClusterConfigError([f"{name}: not valid YAML: {where}{what}"]) from None
    if data is None:
        raise ClusterConfigError([f"{name}: the file is empty: start from the shipped cluster.yaml "
                                  f"(keys: {', '.join(ClusterConfig.model_fields)})"])
    if not isinstance(data, dict):
        raise ClusterConfigError([f"{name}: the top level must be a mapping of keys "
                                  f"({', '.join(ClusterConfig.model_fields)}), not a {_kind(data)}"])
    try:
        config = ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ClusterConfigError([f"{name}: {line}" for err in e.errors() for line in _explain(err)]) from None
    problems = _check_model_path(config)
    if problems:
        raise ClusterConfigError([f"{name}: {line}" for line in problems])
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping: PyYAML keeps the last,
    so a second `decode:` section would silently replace the first. Keys merged in with
    `<<: *anchor` may still be overridden: that is what merging is for."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key}: given twice (first on line {seen[key].start_mark.line + 1}): merge them into "
                    "one (YAML would keep only the last)", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def _check_model_path(config: ClusterConfig) -> list[str]:
    """A model directory must exist before nodes start (ray nodes may see other disks).
    Relative paths are taken from the current directory, as the engine will."""
    path = config.model.path
    if path.startswith("builtin:") or config.backend != "local":
        return []
    if not Path(path).expanduser().is_dir():
        return [f"model.path: {path!r} is not a directory: give a Hugging Face model directory "
                "or builtin:NAME (e.g. builtin:tiny)"]
    if not (Path(path).expanduser() / "config.json").is_file():
        return [f"model.path: {path!r} has no config.json: is it a Hugging Face model directory?"]
    return []


def _explain(err: dict[str, Any]) -> list[str]:
    loc = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in err["loc"]).lstrip(".")
    kind, got = err["type"], err.get("input")
    if kind == "cluster_topology":
        return err["msg"].splitlines()
    if kind == "extra_forbidden":
        parent, key = err["loc"][:-1], str(err["loc"][-1])
        allowed = list(_model_at(parent).model_fields)
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        where = ".".join(map(str, parent)) + "." if parent else ""
        return [f"{where}{key}: unknown key{hint}; allowed keys: {', '.join(allowed)}"]
    if kind == "value_error":
        msg = str(err["ctx"]["error"])
    elif kind == "literal_error":
        msg = f"{got!r} is not one of {err['ctx']['expected'].replace(' or ', ', ')}"
    elif kind in ("model_type", "model_attributes_type", "dict_type"):
        msg = f"expected a mapping of keys, not a {_kind(got)}"
    elif kind == "missing":
        msg = "required"
    else:  # pydantic's own words, plus what it got
        msg = f"{err['msg'][0].lower()}{err['msg'][1:]}, got {got!r}"
    return [f"{loc or '(top level)'}: {msg}"]


def _model_at(loc: tuple) -> type[BaseModel]:
    """The pydantic model that validates the mapping at `loc`, e.g. ("prefill", "engine")."""
    model: type[BaseModel] = ClusterConfig
    for part in loc:
        ann = model.model_fields[part].annotation
        model = next(t for t in (ann, *typing.get_args(ann)) if isinstance(t, type) and issubclass(t, BaseModel))
    return model


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null", dict: "mapping"}.get(type(value), type(value).__name__)
