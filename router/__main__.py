"""`python -m router --spec JSON` (started by `pdcluster up`)."""

import argparse
import logging
import os
import sys

import msgspec
import uvicorn

from engine.process import die_with_parent
from router.app import create_app
from router.spec import API_KEY_ENV, RouterLaunchSpec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the pdcluster router (started by `pdcluster up`)")
    parser.add_argument("--spec", required=True, help="RouterLaunchSpec as JSON")
    args = parser.parse_args(argv)
    spec = msgspec.json.decode(args.spec, type=RouterLaunchSpec)
    # Secrets come in the environment (readable by this user only), not in argv (`ps` shows argv to everyone).
    spec.api_key = spec.api_key or os.environ.pop(API_KEY_ENV, None) or None
    logging.basicConfig(level=spec.log_level.upper(), format="%(asctime)s %(levelname)s router %(name)s: %(message)s")
    die_with_parent()
    app = create_app(spec)
    uvicorn.run(app, host=spec.host, port=spec.port, loop="uvloop", log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
