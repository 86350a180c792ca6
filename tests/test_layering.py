"""The packages form layers: each imports only from the ones below it, never upward, so
a reader can understand (and a test can use) a layer without the ones above.

    kernels, kv_connector  <  engine  <  prefill_node, decode_node, router  <  cluster  <  bench

`cluster/cli.py` is the one exception: the `pdcluster` command line is the composition
root, which the product's layout puts in cluster/; it loads `pdcluster bench` and
`pdcluster plan` (bench/) only when those subcommands run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"kernels": 0, "kv_connector": 0, "engine": 1, "prefill_node": 2, "decode_node": 2, "router": 2,
         "cluster": 3, "bench": 4}
ALLOWED = {("cluster/cli.py", "bench")}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(LAYER))
def test_a_package_imports_nothing_from_the_layers_above_or_beside_it(package):
    wrong = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for name in _imports(path):
            if name in LAYER and name != package and LAYER[name] >= LAYER[package] and (rel, name) not in ALLOWED:
                wrong.append(f"{rel} imports {name}")
    assert not wrong, "\n".join(wrong)
