"""Build a connector from a registered name, a `module:Class` path, or a class object.

A class object cannot travel to another process by name when it was defined in
`__main__` or a closure, so `serialize_connector_spec` turns it into cloudpickle bytes
for the parent to hand to the worker processes it starts (a pipe or a file it wrote
itself). Bytes that came over a network socket are never unpickled: the network only
ever carries names.
"""

from __future__ import annotations

import importlib
from typing import Union

import cloudpickle

from kv_connector.base import KVCacheInfo, KVConnectorBase
from kv_connector.config import KVTransferConfig

# name -> "module:Class", imported on first use so a missing optional dependency (nixl)
# only matters to whoever picks that connector.
_REGISTRY: dict[str, str] = {
    "nixl": "kv_connector.nixl_connector:NixlConnector",
    "tcp": "kv_connector.tcp_connector:TcpConnector",
    "cuda_ipc": "kv_connector.cuda_ipc_connector:CudaIpcConnector",
}

ConnectorSpec = Union[str, type, bytes]


def register_connector(name: str, target: str) -> None:
    """Make `name` usable in `kv_connector:` (target is "module:Class")."""
    if ":" not in target:
        raise ValueError(f"connector target {target!r} must look like 'package.module:ClassName'")
    _REGISTRY[name] = target


def registered_connectors() -> list[str]:
    return sorted(_REGISTRY)


def serialize_connector_spec(spec: ConnectorSpec) -> str | bytes:
    """What a parent passes to a worker process: names as they are, classes pickled."""
    return cloudpickle.dumps(spec) if isinstance(spec, type) else spec


def resolve_connector_class(spec: ConnectorSpec) -> type[KVConnectorBase]:
    if isinstance(spec, bytes):  # from our own parent process, never from a socket
        spec = cloudpickle.loads(spec)
    if isinstance(spec, type):
        cls = spec
    else:
        target = _REGISTRY.get(spec, spec)
        if ":" not in target:
            raise ValueError(f"unknown KV connector {spec!r}: use one of {registered_connectors()} "
                             "or a 'module:Class' path")
        module_name, _, class_name = target.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ImportError(f"KV connector {spec!r}: cannot import {module_name} ({e})") from e
        cls = getattr(module, class_name, None)
        if cls is None:
            raise ValueError(f"KV connector {spec!r}: {module_name} has no class {class_name}")
    if not (isinstance(cls, type) and issubclass(cls, KVConnectorBase)):
        raise TypeError(f"KV connector {cls!r} must subclass kv_connector.base.KVConnectorBase")
    return cls


def build_connector(config: KVTransferConfig, kv_info: KVCacheInfo,
                    spec: ConnectorSpec | None = None) -> KVConnectorBase:
    """`spec` overrides config.kv_connector (used for class objects and pickled classes)."""
    return resolve_connector_class(spec if spec is not None else config.kv_connector)(config, kv_info)
