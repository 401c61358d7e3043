# Shared by scripts/*: install what the build, the demo and the tests need, on Debian/Ubuntu.
# Sourced, not run.
#
# What to install is decided by what the build and the tests actually open, never by whether a
# command with the right name happens to be on PATH. The one list is REQUIREMENTS below: each entry
# is "package: the check that proves it", and `ensure_packages` installs the package of every
# entry whose check fails, then checks again and names any package that still fails.

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# The workspace's rust-version: cargo refuses older toolchains with a clear message, but say it
# before a long install.
rust_version_required() {
  sed -n 's/^rust-version *= *"\([0-9.]*\)".*/\1/p' Cargo.toml | head -n 1
}

# protoc must compile a file that imports one of protobuf's well-known types, exactly as
# etcd-client's build script does: this needs protoc (protobuf-compiler) *and* its include files
# (libprotobuf-dev, only a "recommends" of protobuf-compiler).
check_protoc_compiles() {
  command -v protoc >/dev/null 2>&1 || return 1
  local dir rc
  dir=$(mktemp -d)
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\nmessage M { google.protobuf.FileDescriptorProto f = 1; }\n' >"$dir/probe.proto"
  protoc -I "$dir" --descriptor_set_out="$dir/out" "$dir/probe.proto" >/dev/null 2>&1
  rc=$?
  rm -rf "$dir"
  return "$rc"
}
check_protoc() { command -v protoc >/dev/null 2>&1 && protoc --version >/dev/null 2>&1; }
# rustc links every binary and build script with `cc`, and the C parts of the dependencies
# (ring, aws-lc-sys, bundled SQLite) are compiled with it: `cc` is gcc's, but crt1.o, libc's headers
# and libc.so/libm/libpthread to link against are in libc6-dev, only a "recommends" of gcc.
check_cc() { command -v cc >/dev/null 2>&1 && cc --version >/dev/null 2>&1; }
check_cc_links() {
  command -v cc >/dev/null 2>&1 || return 1
  local dir rc
  dir=$(mktemp -d)
  printf '#include <stdio.h>\n#include <math.h>\n#include <pthread.h>\nint main(void) { printf("%%f", sqrt(2.0)); return pthread_self() == 0; }\n' >"$dir/probe.c"
  # Linked, not run: a noexec /tmp must not look like a missing package.
  cc -o "$dir/probe" "$dir/probe.c" -lm -lpthread -ldl >/dev/null 2>&1
  rc=$?
  rm -rf "$dir"
  return "$rc"
}
# reqwest (rustls with the platform verifier) loads the system's CA store when a client is built,
# even for plain-http endpoints, and fails with "builder error" if it finds no certificate at all.
check_ca_certificates() { grep -q 'BEGIN CERTIFICATE' "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" 2>/dev/null; }
# jemalloc (tikv-jemalloc-sys, the server's allocator) is built by its own configure script and
# `make`, which gcc does not pull in.
check_make() { make --version >/dev/null 2>&1; }
check_etcd() { "${LEASEHOLD_ETCD_BIN:-etcd}" --version >/dev/null 2>&1; }
check_etcdctl() { ETCDCTL_API=3 etcdctl version >/dev/null 2>&1; }
check_promtool() { promtool --version >/dev/null 2>&1; }
check_docker_compose() { docker-compose version >/dev/null 2>&1; }
check_curl() { curl --version >/dev/null 2>&1; }
check_python3() { python3 -c 'import json, socket' >/dev/null 2>&1; }
# The CLI's terminal test runs `leasehold` on a pty through util-linux's `script`.
check_script() { script --version >/dev/null 2>&1; }
# `python3 -m venv` needs ensurepip, which Debian ships in python3-venv.
check_python3_venv() { python3 -c 'import ensurepip, venv' >/dev/null 2>&1; }
# The status page's browser test: Debian's Chromium, driven from Node.js (playwright-core, from
# npm, installed below into target/tools), which needs npm to install.
check_chromium() { "${LEASEHOLD_CHROMIUM:-/usr/bin/chromium}" --version >/dev/null 2>&1; }
check_node() { node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)' >/dev/null 2>&1; }
check_npm() { npm --version >/dev/null 2>&1; }

# package: check that proves it. The demo needs the first group; the tests need all of them.
# (No sqlite3 CLI: the demo's ledger links SQLite through rusqlite's bundled build.)
REQUIREMENTS=(
  "gcc:check_cc"
  "libc6-dev:check_cc_links"
  "make:check_make"
  "ca-certificates:check_ca_certificates"
  "protobuf-compiler:check_protoc"
  "libprotobuf-dev:check_protoc_compiles"
  "etcd-server:check_etcd"
  "etcd-client:check_etcdctl"
  "python3:check_python3"
  "curl:check_curl"
  "--tests--"
  "prometheus:check_promtool"
  "docker-compose:check_docker_compose"
  "python3-venv:check_python3_venv"
  "bsdutils:check_script"
  "chromium:check_chromium"
  "nodejs:check_node"
  "npm:check_npm"
)

# Prints the packages whose check fails. With `demo`, only the entries before "--tests--".
missing_packages() {
  local scope=${1:-tests} entry package check
  for entry in "${REQUIREMENTS[@]}"; do
    if [ "$entry" = "--tests--" ]; then
      [ "$scope" = demo ] && break
      continue
    fi
    package=${entry%%:*}
    check=${entry#*:}
    "$check" || printf '%s\n' "$package"
  done
}

# Installs every package whose check fails, then fails loudly (naming each package and its check)
# if any check still fails: a half-installed machine never gets as far as a cryptic build error.
ensure_packages() {
  local scope=${1:-tests}
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs), version $(rust_version_required) or later" >&2; exit 1; }
  local missing
  missing=$(missing_packages "$scope" | tr '\n' ' ')
  if [ -n "${missing// /}" ]; then
    echo "==> installing ${missing}"
    as_root apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  # Debian's etcd-server may start a system etcd on 2379; we never use it (tests pick free ports).
  verify_packages "$scope"
}

# Fails, naming the package, for every requirement whose check still fails.
verify_packages() {
  local scope=${1:-tests} entry package check failed=0
  for entry in "${REQUIREMENTS[@]}"; do
    if [ "$entry" = "--tests--" ]; then
      [ "$scope" = demo ] && break
      continue
    fi
    package=${entry%%:*}
    check=${entry#*:}
    if ! "$check"; then
      echo "missing after installation: package '$package' (check '$check' fails)" >&2
      failed=1
    fi
  done
  if [ "$failed" -ne 0 ]; then
    echo "install the packages named above (apt-get install $(missing_packages "$scope" | tr '\n' ' ')) and run this again" >&2
    exit 1
  fi
}

# Python tools, pinned, in a venv under target/ so they never touch the system Python and do not
# depend on which python3 comes first on PATH (pyenv's or Debian's): schemathesis for the OpenAPI
# fuzzing test, PyYAML for the compose checks. Exports LEASEHOLD_PYTHON and LEASEHOLD_SCHEMATHESIS
# for the tests.
SCHEMATHESIS_VERSION=4.32.5
PYYAML_VERSION=6.0.2
ensure_python_tools() {
  local venv=target/tools/py-schemathesis-$SCHEMATHESIS_VERSION-pyyaml-$PYYAML_VERSION
  if ! "$venv/bin/python" -c 'import yaml, schemathesis' >/dev/null 2>&1; then
    rm -rf "$venv"
    echo "==> installing schemathesis $SCHEMATHESIS_VERSION and PyYAML $PYYAML_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
      "schemathesis==$SCHEMATHESIS_VERSION" "PyYAML==$PYYAML_VERSION"
  fi
  "$venv/bin/python" -c 'import yaml, schemathesis' || { echo "the Python tools venv $venv is broken; delete it and run again" >&2; exit 1; }
  export LEASEHOLD_PYTHON="$PWD/$venv/bin/python"
  export LEASEHOLD_SCHEMATHESIS="$PWD/$venv/bin/schemathesis"
}

# playwright-core (npm, pinned) drives Chromium for the status page test; it never downloads a
# browser of its own (it is given Debian's). Exports LEASEHOLD_PLAYWRIGHT_DIR for the test.
PLAYWRIGHT_VERSION=1.65.1
ensure_ui_tools() {
  local dir=target/tools/node-playwright-$PLAYWRIGHT_VERSION
  if ! (cd "$dir" 2>/dev/null && node -e 'require("playwright-core")') >/dev/null 2>&1; then
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "==> installing playwright-core $PLAYWRIGHT_VERSION into $dir"
    (cd "$dir" && npm install --silent --no-audit --no-fund --ignore-scripts "playwright-core@$PLAYWRIGHT_VERSION" >/dev/null)
  fi
  (cd "$dir" && node -e 'require("playwright-core")') || { echo "playwright-core in $dir is broken; delete it and run again" >&2; exit 1; }
  export LEASEHOLD_PLAYWRIGHT_DIR="$PWD/$dir/node_modules"
}
