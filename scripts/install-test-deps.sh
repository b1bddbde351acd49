#!/usr/bin/env bash
# Installs what the test suite needs, skipping whatever is already there, so a second run
# takes seconds:
#   - PostgreSQL, Redis and MariaDB (Debian packages), and libssl-dev, which librdkafka's
#     TLS and SASL/SCRAM are built against
#   - the pinned Apache Kafka broker jars (Maven Central, via testkit/kafka/pom.xml) into
#     the tools directory ($WEIR_TOOLS_DIR, default ~/.cache/weir-tools)
#   - kube-apiserver, etcd and kubectl, built with Go from testkit/kube/go.mod into the tools
#     directory (about 5 minutes the first time; needs Go 1.26)
#   - FerretDB (the MongoDB wire protocol, for the MongoDB sink), built with Go from
#     testkit/ferretdb/go.mod into the tools directory (about a minute the first time)
#   - Helm's Go SDK behind a Python API (helm-python-sdk, from PyPI) in a virtualenv in the
#     tools directory, for the chart tests
#   - cargo-nextest
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="${WEIR_TOOLS_DIR:-$HOME/.cache/weir-tools}"
kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$root/testkit/kafka/pom.xml")"
nextest_version="0.9.151"

say() { printf 'install-test-deps: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages.
missing=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v mariadb-install-db >/dev/null || missing+=(mariadb-server)
command -v java >/dev/null || missing+=(default-jdk-headless)
command -v mvn >/dev/null || missing+=(maven)
command -v openssl >/dev/null || missing+=(openssl)
# librdkafka is built against the system's OpenSSL 3 (TLS and SASL/SCRAM to Kafka).
pkg-config --exists openssl 2>/dev/null || missing+=(libssl-dev pkg-config)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "postgresql, redis-server, mariadb-server, java, mvn, openssl, libssl-dev, python3-venv: present"
fi

# The Kafka broker's jars.
libs="$tools/kafka-$kafka_version/libs"
if [ -f "$libs/.complete" ]; then
  say "kafka $kafka_version jars: present in $libs"
else
  say "fetching kafka $kafka_version jars from Maven Central into $libs"
  rm -rf "$libs.partial"
  mkdir -p "$libs.partial"
  mvn -q -B -Dstyle.color=never -f "$root/testkit/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs.partial"
  rm -rf "$libs"
  mv "$libs.partial" "$libs"
  touch "$libs/.complete"
fi

# The Kubernetes API server, etcd and kubectl (testkit/kube/build.sh skips the build when done).
kube_version="$(sed -n 's/^[[:space:]]*k8s\.io\/kubernetes v\([0-9][0-9.]*\).*/\1/p' "$root/testkit/kube/go.mod")"
if [ -f "$tools/kube-$kube_version/.complete" ] && [ -x "$tools/kube-$kube_version/bin/kubectl" ]; then
  say "kube-apiserver $kube_version, etcd and kubectl: present in $tools/kube-$kube_version/bin"
elif ! command -v go >/dev/null; then
  say "no \`go\` on PATH: install Go 1.26 or newer to build kube-apiserver $kube_version"
  exit 1
else
  say "building kube-apiserver $kube_version, etcd and kubectl into $tools/kube-$kube_version/bin (about 5 minutes, once)"
  WEIR_TOOLS_DIR="$tools" "$root/testkit/kube/build.sh"
fi

# FerretDB (testkit/ferretdb/build.sh skips the build when done).
ferretdb_version="$(sed -n 's/^require github\.com\/FerretDB\/FerretDB v\([0-9][0-9.]*\)$/\1/p' "$root/testkit/ferretdb/go.mod")-pg"
if [ -x "$tools/ferretdb-$ferretdb_version/bin/ferretdb" ]; then
  say "ferretdb $ferretdb_version: present in $tools/ferretdb-$ferretdb_version/bin"
elif ! command -v go >/dev/null; then
  say "no \`go\` on PATH: install Go 1.26 or newer to build FerretDB $ferretdb_version"
  exit 1
else
  say "building ferretdb $ferretdb_version into $tools/ferretdb-$ferretdb_version/bin (about a minute, once)"
  WEIR_TOOLS_DIR="$tools" "$root/testkit/ferretdb/build.sh"
fi

# Helm (its Go SDK as a Python wheel: no helm binary is published on a reachable registry).
helm_sdk_version="0.2.2"
helm_env="$tools/helm-python-$helm_sdk_version"
if [ -f "$helm_env/.complete" ]; then
  say "helm-python-sdk $helm_sdk_version: present in $helm_env"
else
  say "installing helm-python-sdk $helm_sdk_version into $helm_env"
  rm -rf "$helm_env"
  python3 -m venv "$helm_env"
  "$helm_env/bin/pip" install --quiet --disable-pip-version-check "helm-python-sdk==$helm_sdk_version"
  touch "$helm_env/.complete"
fi

# cargo-nextest.
if cargo nextest --version >/dev/null 2>&1; then
  say "cargo-nextest: present"
else
  say "installing cargo-nextest $nextest_version (a few minutes, once)"
  cargo install --locked --quiet "cargo-nextest@$nextest_version"
fi
