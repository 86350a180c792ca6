"""Structured outputs: grammars that constrain what a request may generate.

`params` (the request's constraint, torch-free), `backends` (xgrammar, guidance,
outlines behind one interface, with a registry), `manager` (per-engine state: the
compile cache, one matcher per request, the bitmask applied to the logits batch).
"""

from engine.structured_output.params import BACKEND_NAMES, StructuredOutputsParams

__all__ = ["BACKEND_NAMES", "StructuredOutputsParams"]
