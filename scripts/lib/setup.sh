# Shared by scripts/*: install what the build and the tests need, on Debian/Ubuntu.
# Sourced, not run. Installs only what is missing: etcd (Debian's etcd-server) and protoc
# (protobuf-compiler, needed by etcd-client's build).

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

ensure_packages() {
  local missing=()
  command -v etcd >/dev/null 2>&1 || [ -n "${LEASEHOLD_ETCD_BIN:-}" ] || missing+=(etcd-server)
  command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
  command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  # The scripts pick free ports with it; schemathesis runs on it.
  command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-venv)
  # Static validation of compose/ and of /metrics: docker-compose (config -q works without an
  # engine), promtool, and PyYAML for the compose checks.
  command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
  command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
  python3 -c 'import yaml' >/dev/null 2>&1 || missing+=(python3-yaml)
  for extra in "$@"; do
    case "$extra" in
      sqlite3) command -v sqlite3 >/dev/null 2>&1 || missing+=(sqlite3) ;;
    esac
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # Debian's package may start a system etcd on 2379; we never use it (tests pick free ports).
  command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }
}

# schemathesis (PyPI, pinned) for the OpenAPI fuzzing test, in a venv under target/ so it never
# touches the system Python. Exports LEASEHOLD_SCHEMATHESIS for the test.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
  local venv=target/tools/schemathesis-$SCHEMATHESIS_VERSION
  if [ ! -x "$venv/bin/schemathesis" ]; then
    command -v python3 >/dev/null 2>&1 || { as_root apt-get update -qq; as_root apt-get install -y -qq python3 >/dev/null; }
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      rm -rf "$venv"
      as_root apt-get update -qq
      DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq python3-venv >/dev/null
      python3 -m venv "$venv"
    fi
    echo "==> installing schemathesis $SCHEMATHESIS_VERSION"
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  export LEASEHOLD_SCHEMATHESIS="$PWD/$venv/bin/schemathesis"
}

