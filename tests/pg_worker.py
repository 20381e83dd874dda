"""A worker process for the tests: `python -m tests.pg_worker URL [--concurrency N]
[--lease S] [--poll S] [--only NAME,...] [--log-level LEVEL]`, performing the actions of
`tests.pg_actions` (only those named with `--only`)."""

from __future__ import annotations

import argparse
import logging

from ablauf_lang.runners.worker import run_worker
from tests.pg_actions import ACTIONS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--poll", type=float, default=5.0)
    parser.add_argument("--only", default=None, help="comma-separated action names")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s worker %(message)s")
    actions = ACTIONS
    if args.only is not None:
        names = set(args.only.split(","))
        actions = {k: v for k, v in ACTIONS.items() if k in names}
    run_worker(args.url, actions, args.concurrency, lease=args.lease, poll=args.poll)


if __name__ == "__main__":
    main()
