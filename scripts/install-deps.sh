#!/usr/bin/env bash
# Install the Debian packages the local stack (and the interop tests) run on, only if
# something is missing.
set -euo pipefail

missing=()
[ -f /usr/share/java/zookeeper.jar ] || missing+=(zookeeper)
command -v java >/dev/null 2>&1 || missing+=(default-jre-headless)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mariadbd >/dev/null 2>&1 || command -v mysqld >/dev/null 2>&1 || missing+=(mariadb-server)
command -v mariadb-install-db >/dev/null 2>&1 || command -v mysql_install_db >/dev/null 2>&1 \
  || missing+=(mariadb-server)
python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
# The multi-host test (tests/test_multihost.py) makes network namespaces with `ip`.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)  # the console's browser tests
# The interop tests generate Apache Thrift's own Python code from idl/demo.thrift.
command -v thrift >/dev/null 2>&1 || missing+=(thrift-compiler)
# The polyglot tests (tests/test_polyglot.py) build Java and Node clients and servers
# from idl/polyglot.thrift: javac, Apache Thrift's Java library, Node and npm (npm's
# `thrift`, pinned to the compiler's version, is installed by the test itself).
command -v javac >/dev/null 2>&1 || missing+=(default-jdk-headless)
[ -f /usr/share/java/thrift.jar ] || missing+=(libthrift-java)
[ -f /usr/share/java/slf4j-nop.jar ] || missing+=(libslf4j-java)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing Debian packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root or sudo to apt-get install ${missing[*]}" >&2; exit 1; }
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# Installing a server package must not start a system service for us (it would
# take the standard ports): a temporary policy-rc.d forbids service starts.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
$SUDO apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${missing[@]}" | sort -u) >/dev/null
