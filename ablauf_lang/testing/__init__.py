"""Workflow tests: recorded stepping sessions replayed as regression tests (`session`),
random schedules of failures and crashes checked against the recovery invariants
(`faults`), and the pytest plugin that collects both kinds of `*.abltest` file."""
