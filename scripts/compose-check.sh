#!/usr/bin/env bash
# Validate docker-compose.yml with `docker compose config` where Docker Compose is
# installed. Where it is not, say so: nothing is pretended to be checked.
# (tests/test_packaging.py checks the file's ports and credentials against the
# packaged config on every machine, Docker or not.)
set -euo pipefail
cd "$(dirname "$0")/.."
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "compose-check: docker-compose.yml NOT checked: no Docker Compose here" \
       "($(command -v docker >/dev/null 2>&1 && echo 'the docker client has no compose plugin' \
       || echo 'no docker command'))"
  exit 0
fi
"${compose[@]}" -f docker-compose.yml config --quiet
echo "compose-check: docker-compose.yml is valid (${compose[*]} config)"
