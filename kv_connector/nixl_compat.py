"""Import shim for NIXL's Python API, whichever wheel is installed.

NIXL ships one wheel per CUDA major version (`nixl-cu12`, `nixl-cu13`, import names
`nixl_cu12`, `nixl_cu13`) plus a small meta package `nixl` that picks one of them by the
CUDA version it detects. We try, in order, `nixl._api` (the meta package: right choice on a
GPU host), `nixl_cu13._api`, `nixl_cu12._api` (the cu12 wheel also runs on CPU-only hosts,
UCX moving DRAM over shared memory/TCP). Importing this module raises `ImportError` naming
the pip extra to install when none of them loads.

    from kv_connector.nixl_compat import nixl_agent, nixl_agent_config

`make_agent` builds an agent whose progress thread sleeps between polls: the Python API
fixes the delay at 0, and a progress thread with no delay spins on a core for as long as
the agent lives, moving nothing (100% of a core per idle node, measured; 2-3% with 10 us).
"""

from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType

# Tried in this order; the first that imports wins.
NIXL_API_MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")


def _load_nixl_api() -> ModuleType:
    failures: list[str] = []
    for name in NIXL_API_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:  # also covers the meta package's "detected CUDA 13 but ..."
            failures.append(f"{name}: {e}")
    raise ImportError(
        "NIXL is not installed (or none of its wheels loads), so KV blocks cannot be moved between "
        "nodes. Install the wheel that matches your CUDA: pip install 'pdcluster[nixl-cu12]' "
        "(CUDA 12, also for CPU-only hosts) or pip install 'pdcluster[nixl-cu13]' (CUDA 13). "
        "Tried: " + "; ".join(failures))


nixl_api = _load_nixl_api()
NIXL_MODULE_NAME: str = nixl_api.__name__
nixl_agent = nixl_api.nixl_agent
nixl_agent_config = nixl_api.nixl_agent_config

_make_lock = threading.Lock()


def make_agent(name: str, config, progress_delay_us: int = 0):
    """nixl_agent(name, config), with the progress thread's delay between polls set to
    progress_delay_us (0: NIXL's own, a busy spin). The Python API does not pass a delay,
    so the C++ constructor it calls is wrapped while this agent is made; an API without
    that constructor gets NIXL's default."""
    bind = getattr(nixl_api, "nixlBind", None)
    original = getattr(bind, "nixlAgent", None)
    if original is None and progress_delay_us > 0:
        logging.getLogger(__name__).warning(
            "%s has no nixlBind.nixlAgent to pass a progress delay to: NIXL's progress thread will "
            "spin on a core while the agent lives", NIXL_MODULE_NAME)
    if progress_delay_us <= 0 or original is None:
        return nixl_agent(name, config)

    def with_delay(agent_name, agent_config):
        agent_config.pthrDelay = int(progress_delay_us)
        return original(agent_name, agent_config)

    with _make_lock:
        bind.nixlAgent = with_delay
        try:
            return nixl_agent(name, config)
        finally:
            bind.nixlAgent = original


__all__ = ["NIXL_API_MODULES", "NIXL_MODULE_NAME", "make_agent", "nixl_agent", "nixl_agent_config", "nixl_api"]
