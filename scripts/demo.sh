#!/usr/bin/env bash
# `make demo`: a private local stack on free ports, appkey hello_www, the demo
# provider, one call from the demo client, then everything cleaned up.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DEMO_STACK=${DEMO_STACK:-.demo-stack}
PROBE="$PY -m probe.cli"
export PROBE_ENV=dev
export PROBE_SNAPSHOT_DIR="$DEMO_STACK/snapshots"

provider_pid=""
cleanup() {
  if [ -n "$provider_pid" ] && kill -0 "$provider_pid" 2>/dev/null; then
    kill -TERM "$provider_pid"; wait "$provider_pid" 2>/dev/null || true
  fi
  $PROBE stack down --dir "$DEMO_STACK" --wipe >/dev/null 2>&1 || true
}
trap cleanup EXIT

echo "== starting ZooKeeper, Redis and MariaDB in $DEMO_STACK"
$PROBE stack up --dir "$DEMO_STACK" --free-ports
export PROBE_CONFIG="$DEMO_STACK/config.yml"

echo "== registering appkey hello_www"
$PROBE appkey add hello_www

port=$($PY -c 'from probe.devstack import free_port; print(free_port())')
echo "== starting the demo provider on port $port"
$PY examples/demo_server.py "$port" > "$DEMO_STACK/provider.log" 2>&1 &
provider_pid=$!
for _ in $(seq 1 100); do
  if $PROBE nodes hello_www DemoService --json 2>/dev/null | grep -q '"live": true'; then break; fi
  kill -0 "$provider_pid" 2>/dev/null || { cat "$DEMO_STACK/provider.log"; exit 1; }
  sleep 0.1
done
$PROBE nodes hello_www

echo "== calling DemoService.say() through probe"
$PY examples/demo_client.py

echo "== stopping the provider (SIGTERM: deregister, drain, exit)"
kill -TERM "$provider_pid"; wait "$provider_pid" || true
provider_pid=""
$PROBE nodes hello_www
echo "== call statistics flushed to Redis by the provider and the client"
$PROBE stats hello_www
$PROBE stats hello_www --side client
echo "== cleaning up the stack"
