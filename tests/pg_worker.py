"""A worker process for the tests: `python -m tests.pg_worker URL [--concurrency N]
[--lease S] [--poll S]`, performing the actions of `tests.pg_actions`."""

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
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s worker %(message)s")
    run_worker(args.url, ACTIONS, args.concurrency, lease=args.lease, poll=args.poll)


if __name__ == "__main__":
    main()
