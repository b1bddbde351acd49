#!/usr/bin/env bash
# Builds FerretDB (the MongoDB wire protocol on PostgreSQL or SQLite; main.go calls its
# embeddable package) from this Go module into <tools>/ferretdb-<version>-<build>/bin/ferretdb,
# where <tools> is $WEIR_TOOLS_DIR (default ~/.cache/weir-tools) and <version> is the FerretDB version in
# go.mod. Skipped when already built; concurrent callers serialise on a lock file and
# whoever waits finds it built. About a minute the first time on 2 cores.
#
# Callers: testkit/src/ferretdb.rs (when a test needs the server and the binary is
# missing) and scripts/install-test-deps.sh.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The build of main.go, in the directory's name so that a changed main.go builds afresh;
# keep in step with FERRETDB_BUILD in testkit/src/ferretdb.rs and scripts/install-test-deps.sh.
build=pg
tools="${WEIR_TOOLS_DIR:-$HOME/.cache/weir-tools}"
version="$(sed -n 's/^require github\.com\/FerretDB\/FerretDB v\([0-9][0-9.]*\)$/\1/p' "$here/go.mod")"
if [ -z "$version" ]; then
  echo "ferretdb/build.sh: no FerretDB version in $here/go.mod" >&2
  exit 1
fi
dest="$tools/ferretdb-$version-$build"
[ -x "$dest/bin/ferretdb" ] && exit 0

command -v go >/dev/null || {
  echo "ferretdb/build.sh: no \`go\` on PATH: install Go 1.26 or newer" >&2
  exit 1
}
mkdir -p "$tools"
exec 9>"$tools/ferretdb-$version.lock"
flock 9
[ -x "$dest/bin/ferretdb" ] && exit 0

started=$SECONDS
echo "ferretdb/build.sh: building FerretDB $version into $dest/bin" >&2
rm -rf "$dest/bin.partial"
mkdir -p "$dest/bin.partial"
(
  cd "$here"
  GOFLAGS="-mod=readonly -buildvcs=false" go build -o "$dest/bin.partial/ferretdb" .
)
rm -rf "$dest/bin"
mv "$dest/bin.partial" "$dest/bin"
echo "ferretdb/build.sh: built in $((SECONDS - started)) s" >&2
