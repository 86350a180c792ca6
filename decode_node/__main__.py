import sys

from decode_node import KV_ROLE
from decode_node.service import DecodeNodeServer
from engine.node_server import run_node

argv = sys.argv[1:]
colocated = "--colocated" in argv
if colocated:
    argv.remove("--colocated")
sys.exit(run_node(argv, None if colocated else KV_ROLE, DecodeNodeServer))
