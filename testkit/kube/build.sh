#!/usr/bin/env bash
# Builds kube-apiserver, etcd and kubectl from this Go module (go.mod pins the versions; go.sum
# makes the build reproducible) into <tools>/kube-<version>/bin, where <tools> is
# $WEIR_TOOLS_DIR (default ~/.cache/weir-tools) and <version> is the k8s.io/kubernetes version
# in go.mod.
#
# Runs once: skipped when <tools>/kube-<version>/.complete and bin/kubectl exist (a tools
# directory made before kubectl joined the build gets kubectl alone). Callers that race (test
# processes of one run, scripts/install-test-deps.sh) serialise on a lock file beside it;
# whoever waits finds the binaries built. The first build takes about 5 minutes on 2 cores
# (the Go module and build caches make later builds quick).
#
# Callers: testkit/src/kube.rs (when a test needs the API server and the binaries are
# missing), the kubectl tests (operator/tests/integration/deploy.rs) and scripts/install-test-deps.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tools="${WEIR_TOOLS_DIR:-$HOME/.cache/weir-tools}"
version="$(sed -n 's/^[[:space:]]*k8s\.io\/kubernetes v\([0-9][0-9.]*\)\( .*\)\{0,1\}$/\1/p' "$here/go.mod")"
if [ -z "$version" ]; then
  echo "kube/build.sh: no k8s.io/kubernetes version in $here/go.mod" >&2
  exit 1
fi
dest="$tools/kube-$version"
done_already() { [ -f "$dest/.complete" ] && [ -x "$dest/bin/kubectl" ]; }
if done_already; then
  exit 0
fi

command -v go >/dev/null || {
  echo "kube/build.sh: no \`go\` on PATH: install Go 1.26 or newer" >&2
  exit 1
}
mkdir -p "$tools"
exec 9>"$tools/kube-$version.lock"
flock 9
if done_already; then
  exit 0
fi

major="${version%%.*}"
minor="${version#*.}"
minor="${minor%%.*}"
pkg=k8s.io/component-base/version
# What a release build stamps, so /version reports v<version> rather than v0.0.0-master.
ldflags="-X $pkg.gitVersion=v$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"

started=$SECONDS
if [ -f "$dest/.complete" ]; then
  echo "kube/build.sh: building kubectl $version into $dest/bin" >&2
  rm -rf "$dest/kubectl.partial"
  mkdir -p "$dest/kubectl.partial"
  (
    cd "$here"
    GOFLAGS="-mod=readonly -buildvcs=false" go build -ldflags "$ldflags" \
      -o "$dest/kubectl.partial/" k8s.io/kubernetes/cmd/kubectl
  )
  mv "$dest/kubectl.partial/kubectl" "$dest/bin/kubectl"
  rmdir "$dest/kubectl.partial"
else
  echo "kube/build.sh: building kube-apiserver $version, etcd and kubectl into $dest/bin" >&2
  rm -rf "$dest"
  mkdir -p "$dest/bin.partial"
  (
    cd "$here"
    GOFLAGS="-mod=readonly -buildvcs=false" go build -ldflags "$ldflags" -o "$dest/bin.partial/" \
      k8s.io/kubernetes/cmd/kube-apiserver ./cmd/etcd k8s.io/kubernetes/cmd/kubectl
  )
  mv "$dest/bin.partial" "$dest/bin"
  touch "$dest/.complete"
fi
echo "kube/build.sh: built in $((SECONDS - started)) s" >&2
