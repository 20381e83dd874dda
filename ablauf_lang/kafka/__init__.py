"""The Kafka runner: a restarter topic, one topic per action, workers in consumer groups.

    topics      topic names from a prefix, the partition of a run (pure)
    client      confluent-kafka: the import guard, settings, topic creation, reachability
    restarter   consumes the restarter topic: restart, record in the store, dispatch
    actions     consumes action topics: claim, perform, report the result
    runs        submitting a run, waking one (after a person's resume or retry)

See docs/distributed.md ("Kafka").
"""
