import sys

from decode_node import KV_ROLE
from decode_node.service import ColocatedNodeServer, DecodeNodeServer
from engine.node_server import run_node

argv = sys.argv[1:]
colocated = "--colocated" in argv
if colocated:
    argv.remove("--colocated")
# A colocated node gets a connector only when its spec carries kv_transfer settings
# (router.disaggregation.mode not `never`): then it both lends and pulls KV.
sys.exit(run_node(argv, "kv_both" if colocated else KV_ROLE, ColocatedNodeServer if colocated else DecodeNodeServer))
