#!/usr/bin/env bash
# Smoke test of the load-balanced deployment, on this machine, no Docker:
# PostgreSQL (started by the tests' harness with initdb and pg_ctl, or
# TEST_DATABASE_URL), three replicas of the release build and the
# distribution's nginx running deploy/nginx/mana-sync.conf as it is, all on
# loopback. Through the balancer it checks push and pull, a socket told of
# a push on each replica, a change stream without buffering, a replica
# stopped under load (/ready 503 first, its sockets closed with 1012 and
# reconnected to the others, nothing lost) and a rolling restart of all
# three under load (nothing lost). Each check prints a `checked:` line.
#
# Needs: cargo, PostgreSQL's server binaries (/usr/lib/postgresql/*/bin),
# nginx (`apt-get install nginx`, or NGINX=/path/to/nginx).
# tests/integration/deploy.rs runs this script in the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bin mana-sync
echo "smoke: replicas run $PWD/target/release/mana-sync"
MANA_SYNC_BIN="$PWD/target/release/mana-sync" \
    cargo test --locked --test integration balanced:: -- --ignored --nocapture --test-threads=1
echo "smoke: passed"
