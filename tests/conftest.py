"""Shared test configuration: hypothesis profiles (derandomised in CI)."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings

# Compiled programs are cached (`lang.cache`): the tests keep theirs out of the user's
# cache directory, in one folder for the session (subprocesses inherit it).
os.environ.setdefault("ABLAUF_CACHE", tempfile.mkdtemp(prefix="ablauf-cache-"))

# A throwaway PostgreSQL server (`pg_server`, `pg_url`), a Kafka-protocol broker
# (`kafka_broker`, `kafka_bootstrap`, `kafka_s3_broker`), a real terminal (`tmux`) and a
# headless Chromium (`browser`).
pytest_plugins = ["tests.pg", "tests.kafka", "tests.terminal", "tests.browser"]

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
