#!/usr/bin/env bash
# `make demo`: runs `probe demo` (private stack on free loopback ports, appkey
# hello_www, a provider, say() through probe, everything cleaned up), from an empty
# temporary directory, as a user of the installed package would.
set -euo pipefail
PROBE=$(cd "$(dirname "${1:-.venv/bin/probe}")" && pwd)/$(basename "${1:-.venv/bin/probe}")
workdir=$(mktemp -d)
trap 'rm -rf "$workdir"' EXIT
cd "$workdir"
"$PROBE" demo
