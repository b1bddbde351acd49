#!/usr/bin/env bash
# The whole test suite, as CI runs it: installs what is missing, checks formatting, lints,
# the generated-file drift, then runs every test with cargo-nextest against real servers
# (one Kafka broker and one PostgreSQL, MariaDB and FerretDB server shared by the run; Redis
# per test).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
step() { printf '\n==> %s\n' "$*" >&2; }

# A CI run builds once from clean: incremental state would only add gigabytes on its disk.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi

step "installing test dependencies (skipped when present)"
scripts/install-test-deps.sh

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "generated files match the Rust types"
cargo xtask check

step "building tests"
cargo nextest run --workspace --locked --no-run
cargo build --locked -p weir-testkit --bin weir-test-services

step "starting the shared Kafka broker, PostgreSQL, MariaDB and FerretDB servers"
services_dir="$(mktemp -d)"
env_file="$services_dir/services.env"
# The services live while fd 3 is open: when this script exits, however it exits, their
# standard input closes and they stop and delete their data.
exec 3> >(exec target/debug/weir-test-services --env-file "$env_file")
services_pid=$!
stop_services() {
  exec 3>&-
  wait "$services_pid" 2>/dev/null || true
  rm -rf "$services_dir"
}
trap stop_services EXIT
deadline=$((SECONDS + 180))
until [ -f "$env_file" ]; do
  if ! kill -0 "$services_pid" 2>/dev/null; then
    echo "test.sh: weir-test-services exited before the servers were ready" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "test.sh: the servers were not ready within 180 s" >&2
    exit 1
  fi
  sleep 0.2
done
set -a
# shellcheck disable=SC1090
. "$env_file"
set +a
echo "kafka at $WEIR_TEST_KAFKA_BOOTSTRAP, postgres at $WEIR_TEST_POSTGRES_URL, mariadb at $WEIR_TEST_MYSQL_URL, ferretdb at $WEIR_TEST_MONGODB_URL" >&2

step "cargo nextest run"
profile=default
if [ -n "${CI:-}" ]; then profile=ci; fi
cargo nextest run --workspace --locked --profile "$profile"
