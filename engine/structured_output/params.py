"""What one request's output must match: vLLM's `StructuredOutputsParams`, names and meaning.

Exactly one of `json`, `regex`, `choice`, `grammar`, `json_object` is set. The router
fills in the backend (`auto`: xgrammar, falling back to guidance per grammar, see
manager.py) and the options, so a node needs no configuration of its own: a request carries everything its grammar is compiled from,
which is also what lets a decode node (or another one after a failover) rebuild the
same grammar state from the tokens already produced.

No torch and no backend import here: `engine/sampling_params.py` imports this module on
the router's light path.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

# Backends a user may name. `auto` is resolved by the router (see router/structured.py).
BACKEND_NAMES = ("auto", "xgrammar", "guidance", "outlines", "lm-format-enforcer")
# vLLM accepts "llguidance" as a synonym for "guidance".
BACKEND_ALIASES = {"llguidance": "guidance"}
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
MAX_CONSTRAINT_CHARS = 64 * 1024  # a JSON schema, regex, grammar or choice list, as text
# What each backend needs installed: the module to look for, and what to tell the user.
REQUIREMENTS = {"xgrammar": ("xgrammar", "pip install 'pdcluster[structured]' (or pip install xgrammar)"),
                "guidance": ("llguidance", "pip install 'pdcluster[structured]' (or pip install llguidance)"),
                "outlines": ("outlines_core", "pip install outlines-core"),
                "lm-format-enforcer": ("lmformatenforcer", "pip install lm-format-enforcer")}


def backend_unavailable(name: str) -> str | None:
    """Why backend `name` cannot run in this environment (what to install), or None."""
    module, install = REQUIREMENTS.get(name, (None, ""))
    if module is not None and importlib.util.find_spec(module) is None:
        return f"structured output backend {name!r} is not installed on this server: {install}"
    if name == "lm-format-enforcer":
        return ("structured output backend 'lm-format-enforcer' is installed, but pdcluster does not drive it: "
                "use xgrammar, guidance or outlines")
    return None


def resolve_backend(name: str) -> str:
    """`auto` -> xgrammar, else guidance, whichever is installed (vLLM's preference); a
    named backend is checked. Raises ValueError saying what to install."""
    name = BACKEND_ALIASES.get(name, name)
    if name == "auto":
        for candidate in ("xgrammar", "guidance"):
            if backend_unavailable(candidate) is None:
                return candidate
        raise ValueError("structured outputs need a grammar backend: pip install 'pdcluster[structured]' "
                         "(xgrammar and llguidance)")
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown structured output backend {name!r}: use one of {', '.join(BACKEND_NAMES)}")
    problem = backend_unavailable(name)
    if problem:
        raise ValueError(problem)
    return name


@dataclass(slots=True)
class StructuredOutputsParams:
    json: str | dict | None = None          # a JSON schema (dict, or its JSON text)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None              # EBNF/GBNF (xgrammar) or Lark (guidance)
    json_object: bool | None = None         # any JSON object
    backend: str = "auto"
    disable_any_whitespace: bool = False     # JSON without free whitespace (compact)
    disable_additional_properties: bool = False  # objects get additionalProperties: false
    whitespace_pattern: str | None = None    # accepted for vLLM compatibility; see validate()
    # Set by the router when a reasoning parser is on: the grammar applies only after this
    # token appears in the output (vLLM's "structured output applies to the answer").
    reasoning_end_token_id: int | None = None

    def __post_init__(self) -> None:
        self.backend = BACKEND_ALIASES.get(self.backend, self.backend)
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured output json schema is not valid JSON: {e}") from None
        set_kinds = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError("give exactly one structured output constraint (json, regex, choice, grammar or "
                             f"json_object); got {', '.join(set_kinds) or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("the json schema must be a JSON object")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("choice must be a non-empty list of strings")
        size = self._size()
        if size > MAX_CONSTRAINT_CHARS:
            # Compiling runs in the node's loop: a huge constraint would stall every request there.
            raise ValueError(f"the structured output constraint is {size} characters long: at most "
                             f"{MAX_CONSTRAINT_CHARS}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"unknown structured output backend {self.backend!r}: use one of "
                             f"{', '.join(BACKEND_NAMES)}")
        if self.whitespace_pattern is not None:
            raise ValueError("whitespace_pattern is not supported: use disable_any_whitespace=true for compact "
                             "JSON, or leave it out")

    def _size(self) -> int:
        if self.choice is not None:
            return sum(len(c) + 1 for c in self.choice)
        if isinstance(self.json, dict):
            return len(json.dumps(self.json))
        return max((len(v) for v in (self.regex, self.grammar) if isinstance(v, str)), default=0)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> Any:
        """The constraint's value: a schema dict, a regex, a choice list, a grammar text."""
        return {"type": "object"} if self.kind == "json_object" else getattr(self, self.kind)

    def cache_key(self) -> tuple:
        """What decides the compiled grammar (not the reasoning gate): equal keys, one compile."""
        return (self.backend, self.kind, json.dumps(self.spec, sort_keys=True), self.disable_any_whitespace,
                self.disable_additional_properties)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredOutputsParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown structured_outputs fields {unknown}: use {sorted(known)}")
        return cls(**data)
