"""Classes found by a registered name or by a `module:Class` path.

What the reasoning-parser and tool-call-parser registries share, in vLLM's shape
(`ReasoningParserManager.list_registered()`, `.get(name)`). A path is imported, never
unpickled, and must name a subclass of the registry's base class. Errors list what is
registered, so a 400 tells the client what it may ask for.
"""

from __future__ import annotations

import importlib


class ClassRegistry:
    kind = "plugin"      # what the classes are, for messages ("reasoning parser")
    base: type = object  # every class must subclass it
    base_path = ""       # where the base lives, for messages
    _classes: dict[str, type]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls._classes = {}  # one table per registry

    @classmethod
    def register(cls, name: str, klass: type) -> None:
        cls._classes[name] = klass

    @classmethod
    def list_registered(cls) -> list[str]:
        return sorted(cls._classes)

    @classmethod
    def get(cls, name: str) -> type:
        """A registered name, or `module:Class`. ValueError lists what is registered."""
        if name in cls._classes:
            return cls._classes[name]
        if ":" in name:
            module, _, attr = name.partition(":")
            try:
                klass = getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"{cls.kind} {name!r} cannot be imported: {e}") from None
            if not (isinstance(klass, type) and issubclass(klass, cls.base)):
                raise ValueError(f"{cls.kind} {name!r} is not a subclass of {cls.base_path}")
            return klass
        raise ValueError(f"unknown {cls.kind} {name!r}: registered are "
                         f"{', '.join(cls.list_registered())}, or give a module:Class path")
