"""`pdcluster status [--url URL]`: the router's GET /cluster as a table.

Sends `Authorization: Bearer $PDCLUSTER_API_KEY` when that variable is set. Exit codes:
0 the table was printed, 1 the router could not be reached or answered badly (one line).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:8000"


def run_status(url: str | None) -> int:
    url = (url or DEFAULT_URL).rstrip("/")
    key = os.environ.get("PDCLUSTER_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        r = httpx.get(f"{url}/cluster", headers=headers, timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False)
    except httpx.HTTPError as e:
        print(f"pdcluster status: cannot reach the router at {url}: {_reason(e)}", file=sys.stderr)
        return 1
    if r.status_code in (401, 403):
        print(f"pdcluster status: {url} refused the request (HTTP {r.status_code}): set PDCLUSTER_API_KEY "
              "to the cluster's api key", file=sys.stderr)
        return 1
    try:
        r.raise_for_status()
        nodes = r.json()["nodes"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        print(f"pdcluster status: {url}/cluster answered HTTP {r.status_code} without a node list "
              f"({_reason(e)}): is this a pdcluster router?", file=sys.stderr)
        return 1
    console = Console()
    if not console.is_terminal:  # piped: print the whole table, not one squeezed to 80 columns
        console = Console(width=max(console.width, 200))
    console.print(cluster_table(url, nodes))
    return 0


def cluster_table(url: str, nodes: list[dict[str, Any]]) -> Table:
    healthy = sum(bool(n.get("healthy")) for n in nodes)
    table = Table(title=f"pdcluster at {url}: {healthy}/{len(nodes)} nodes healthy", title_justify="left")
    for column in ("id", "role", "address", "pid", "healthy"):
        table.add_column(column, no_wrap=True)
    for column in ("KV blocks free/total", "running", "waiting"):
        table.add_column(column, justify="right", no_wrap=True)
    states = any(n.get("state", "serving") != "serving" for n in nodes)
    placed = any(n.get("placement") for n in nodes)  # backend ray: which Ray node, which resources
    if states:
        table.add_column("state", no_wrap=True)
    if placed:
        table.add_column("Ray node", no_wrap=True)
        table.add_column("resources", no_wrap=True)
    for n in nodes:
        ok = n.get("healthy")
        row = [str(n.get("id", "?")), str(n.get("role", "?")), str(n.get("address", "")), str(n.get("pid") or "-"),
               "[green]yes[/green]" if ok else "[red]no[/red]",
               f"{_num(n.get('kv_blocks_free'))}/{_num(n.get('kv_blocks_total'))}",
               _num(n.get("running")), _num(n.get("waiting"))]
        if states:
            row.append(str(n.get("state", "")))
        if placed:
            p = n.get("placement") or {}
            row.append(f"{p.get('ray_node_id', '-')[:12]} ({p.get('ip', '?')})" if p else "-")
            row.append(", ".join(f"{k}={v:g}" for k, v in (p.get("resources") or {}).items()) or "-")
        table.add_row(*row)
    return table


def _num(value: Any) -> str:
    return "-" if value is None else str(value)


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__
