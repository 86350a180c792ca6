import sys

from engine.node_server import run_node
from prefill_node import KV_ROLE
from prefill_node.service import PrefillNodeServer

sys.exit(run_node(None, KV_ROLE, PrefillNodeServer))
