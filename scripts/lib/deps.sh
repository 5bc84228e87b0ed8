# shellcheck shell=bash
# Installs what building and testing sluice needs, skipping what is already there.
# Sourced by scripts/test and scripts/quickstart; every function is idempotent.
#
#   deps_apt     Debian build and test packages (librdkafka is built from source by rdkafka-sys)
#   deps_venv    Python venv with tests/py/requirements.txt, in the cache dir outside the repo
#   deps_tansu   the tansu Kafka-API broker, pinned, built with the dynostore feature
#   deps_rust    the clippy and rustfmt components
#   deps_all     all of the above
#   deps_zigbuild  zig (PyPI ziglang, in its own venv) and cargo-zigbuild, pinned: only for
#                  scripts/package --portable, not part of deps_all
#
# Settings: SLUICE_CACHE (default ~/.cache/sluice), SLUICE_PYTHON (default python3).
# After deps_venv: SLUICE_VENV and SLUICE_VENV_PYTHON are set.

SLUICE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SLUICE_CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
SLUICE_VENV=${SLUICE_VENV:-$SLUICE_CACHE/venv}
SLUICE_VENV_PYTHON=$SLUICE_VENV/bin/python
SLUICE_TANSU_VERSION=0.6.0
SLUICE_ZIG_VERSION=0.17.1
SLUICE_ZIGBUILD_VERSION=0.24.1
CARGO_BIN=${CARGO_HOME:-$HOME/.cargo}/bin
case ":$PATH:" in *":$CARGO_BIN:"*) ;; *) PATH=$CARGO_BIN:$PATH ;; esac
export PATH

# nasm, autoconf, automake, libtool: isal-sys builds ISA-L (the agent's gzip) from source.
# logrotate: the e2e test tail_copytruncate.rs rotates with the real one (Debian's, 3.21).
# rpm: scripts/package builds the .rpm packages with its rpmbuild, and the e2e test
# packaging.rs reads them with rpm (dpkg-deb, dpkg and objdump are there already).
SLUICE_APT_PACKAGES=(build-essential cmake perl zlib1g-dev libssl-dev libsasl2-dev libzstd-dev
  pkg-config python3-venv logrotate rpm nasm autoconf automake libtool)

_deps_log() { printf '  %s\n' "$*"; }

deps_apt() {
  local missing=() p
  for p in "${SLUICE_APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]} == 0)); then
    _deps_log "apt: all ${#SLUICE_APT_PACKAGES[@]} packages present"
    return 0
  fi
  _deps_log "apt: installing ${missing[*]}"
  local sudo=()
  ((EUID == 0)) || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
}

# A stamp in the venv records the hash of requirements.txt and the base Python; the venv
# is rebuilt from scratch when either changed or when it cannot import the packages.
deps_venv() {
  local req=$SLUICE_ROOT/tests/py/requirements.txt
  local base=${SLUICE_PYTHON:-python3}
  command -v "$base" >/dev/null || { echo "deps_venv: $base not found" >&2; return 1; }
  local want
  want="$(sha256sum <"$req" | cut -d' ' -f1) $("$base" -c 'import sys; print(sys.version.split()[0])')"
  mkdir -p "$SLUICE_CACHE"
  (
    # One installer at a time (two checkouts testing at once share the cache).
    flock 9
    local stamp=$SLUICE_VENV/.sluice-stamp
    if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]] &&
      "$SLUICE_VENV_PYTHON" -c 'import confluent_kafka, boto3, moto, fluent, kubernetes_validate, yaml' 2>/dev/null; then
      _deps_log "venv: up to date ($SLUICE_VENV)"
      exit 0
    fi
    _deps_log "venv: creating $SLUICE_VENV from $req"
    rm -rf "$SLUICE_VENV"
    "$base" -m venv "$SLUICE_VENV"
    "$SLUICE_VENV_PYTHON" -m pip install --disable-pip-version-check --no-input -q -r "$req"
    "$SLUICE_VENV_PYTHON" -c 'import confluent_kafka, boto3, moto, fluent, kubernetes_validate, yaml'
    echo "$want" >"$stamp"
    _deps_log "venv: $("$SLUICE_VENV_PYTHON" -c 'import confluent_kafka as k; print("confluent-kafka", k.__version__, "librdkafka", k.libversion()[0])')"
  ) 9>"$SLUICE_CACHE/.venv.lock"
}

# tansu must be the pinned version AND have the dynostore storage engine (memory://).
deps_tansu() {
  local have=""
  if command -v tansu >/dev/null; then
    have=$(tansu --version 2>/dev/null || true)
    if [[ $have == "tansu $SLUICE_TANSU_VERSION" ]] && tansu --help 2>/dev/null | grep -q '^Storage engines:.*dynostore'; then
      _deps_log "tansu: $have with dynostore ($(command -v tansu))"
      return 0
    fi
  fi
  _deps_log "tansu: found '${have:-nothing}', installing $SLUICE_TANSU_VERSION (cargo install, about 11 minutes on 2 cores)"
  cargo install tansu --version "$SLUICE_TANSU_VERSION" --locked --features dynostore --force
  tansu --help | grep -q '^Storage engines:.*dynostore'
}

deps_rust() {
  command -v cargo >/dev/null || { echo "deps_rust: cargo not found (install Rust with rustup)" >&2; return 1; }
  local missing=()
  cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
  cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
  if ((${#missing[@]})); then
    _deps_log "rust: adding ${missing[*]}"
    rustup component add "${missing[@]}"
  fi
  _deps_log "rust: $(cargo --version), $(cargo clippy --version), $(cargo fmt --version)"
}

deps_all() {
  deps_apt
  deps_rust
  deps_venv
  deps_tansu
}

# cargo-zigbuild links against an old glibc's symbol list with zig as the C compiler and
# linker; zig comes from PyPI (ziglang) in a venv of its own, put first on PATH here.
deps_zigbuild() {
  local venv=$SLUICE_CACHE/zig-venv
  if ! "$venv/bin/python" -m ziglang version 2>/dev/null | grep -qx "$SLUICE_ZIG_VERSION"; then
    _deps_log "zig: installing ziglang $SLUICE_ZIG_VERSION into $venv"
    rm -rf "$venv"
    "${SLUICE_PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q "ziglang==$SLUICE_ZIG_VERSION"
  fi
  case ":$PATH:" in *":$venv/bin:"*) ;; *) PATH=$venv/bin:$PATH ;; esac
  export PATH
  if [[ "$(cargo zigbuild --version 2>/dev/null)" != "cargo-zigbuild $SLUICE_ZIGBUILD_VERSION" ]]; then
    _deps_log "cargo-zigbuild: installing $SLUICE_ZIGBUILD_VERSION (cargo install, about a minute)"
    cargo install cargo-zigbuild --version "$SLUICE_ZIGBUILD_VERSION" --locked --force
  fi
  _deps_log "zig $("$venv/bin/python" -m ziglang version), $(cargo zigbuild --version)"
}
