#!/usr/bin/env bash
# The Python >= 3.12 environment for the sglang-jax backend: a Debian 13 (trixie) root made with
# debootstrap (Debian 12 hosts have no Python 3.12), Python 3.13 from Debian's own packages, and a
# venv inside it holding this repository (editable, extras sglang + test-sglang) and sglang-jax.
#
#   .ci/sglang_root.sh build            build the root (or reuse it), then bring the venv up to date
#   .ci/sglang_root.sh run CMD...       run CMD in the root's venv, in /src (this repository)
#   .ci/sglang_root.sh run --net CMD... the same with the host's network (default: loopback only)
#
# ROLLOUT_SGLANG_ROOT   where the root lives (default /var/cache/rollout-sglang-root); an
#                       existing, complete root is reused, a missing one is built from scratch
# ROLLOUT_DEBIAN_MIRROR the Debian mirror (default: the one the host's apt sources use)
# ROLLOUT_SGLANG_REFS   a host directory bound at /refs inside (the host-made references)
#
# Each stage leaves a stamp file in the root; a stage whose stamp is present is skipped (the venv's
# stamp holds a hash of pyproject.toml and the pinned versions below, so a dependency change reinstalls). Every
# command runs in its own mount namespace (proc, sys, dev, the repository bound in; all unmounted
# when it ends) and, unless --net, its own network namespace with only loopback up. Needs root.
#
# msgpack: sglang-jax 0.0.2 requires `msgpack-python~=0.5.6` (the old name of msgpack); Ray and
# rollout need `msgpack>=1`. Both distributions install the same `msgpack` module, so whichever is
# installed last wins. sglang-jax never imports msgpack at run time (only its own tests do), Ray
# needs 1.x (`strict_map_key`), so the venv installs everything, then reinstalls msgpack 1.x with
# --no-deps last. tests/sglang/test_environment.py checks the result.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${ROLLOUT_SGLANG_ROOT:-/var/cache/rollout-sglang-root}"
VENV=/opt/venv
SGLANG_JAX="sglang-jax==0.0.2"
MSGPACK="msgpack>=1.0,<2"

log() { printf '[sglang-root %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

host_mirror() {
  if [ -n "${ROLLOUT_DEBIAN_MIRROR:-}" ]; then echo "$ROLLOUT_DEBIAN_MIRROR"; return; fi
  local m
  m="$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | grep -oE 'https?://[^ ]+/debian/?$' | head -n1 || true)"
  echo "${m:-http://deb.debian.org/debian}"
}

# Run a shell snippet chrooted into $ROOT, in fresh mount (and optionally network) namespaces.
in_root() {
  local net="$1"; shift
  local script="$1"; shift
  local unshare_args=(--mount --propagation private)
  if [ "$net" = "lo" ] && ! command -v ip >/dev/null; then
    log "no 'ip' command (iproute2) to bring loopback up in a network namespace: using the host's network"
    net=host
  fi
  [ "$net" = "lo" ] && unshare_args+=(--net)
  local binds="mount -t proc proc '$ROOT/proc'; mount --rbind /sys '$ROOT/sys'; mount --rbind /dev '$ROOT/dev';"
  binds+=" mkdir -p '$ROOT/src' '$ROOT/refs'; mount --bind '$REPO' '$ROOT/src';"
  if [ -n "${ROLLOUT_SGLANG_REFS:-}" ]; then
    mkdir -p "$ROLLOUT_SGLANG_REFS"
    binds+=" mount --bind '$ROLLOUT_SGLANG_REFS' '$ROOT/refs';"
  fi
  # pip inside reaches the index as the host's pip does: the same config, certificates and local
  # wheel directories (bound read-only where the host has them).
  for d in /opt/wheels /opt/pypi /opt/pypi-more; do
    [ -d "$d" ] && binds+=" mkdir -p '$ROOT$d'; mount --bind -o ro '$d' '$ROOT$d';"
  done
  [ "$net" = "lo" ] && binds+=" ip link set lo up;"
  local env_args=(HOME=/root LANG=C.UTF-8 PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
                  RAY_TMPDIR="${RAY_TMPDIR:-/tmp/ray}" JAX_PLATFORMS=cpu ROLLOUT_SGLANG_REFS=/refs)
  while IFS='=' read -r k v; do env_args+=("$k=$v"); done < <(env | grep -E '^(PIP_|CI=|XLA_FLAGS=|ROLLOUT_)' \
    | grep -vE '^(ROLLOUT_SGLANG_REFS|ROLLOUT_SGLANG_ROOT)=' || true)
  unshare "${unshare_args[@]}" -- bash -c "set -e; $binds exec chroot '$ROOT' /usr/bin/env -i $(printf '%q ' "${env_args[@]}") bash -c \"\$0\" in-root \"\$@\"" \
    "$script" "$@"
}

copy_host_config() {
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  cp /etc/hosts "$ROOT/etc/hosts"  # Ray resolves this host's name
  [ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
  if [ -f "$HOME/.config/pip/pip.conf" ]; then
    mkdir -p "$ROOT/root/.config/pip" && cp "$HOME/.config/pip/pip.conf" "$ROOT/root/.config/pip/pip.conf"
  fi
  # After apt: ca-certificates' postinst rewrites the bundle, and pip then fails with
  # CERTIFICATE_VERIFY_FAILED where the host trusts more than Debian's defaults.
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
}

build_root() {
  if [ -f "$ROOT/.stamp-system" ]; then
    log "reusing the root at $ROOT"
    copy_host_config
    return
  fi
  command -v debootstrap >/dev/null || { log "installing debootstrap"; apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
  local t0=$SECONDS mirror; mirror="$(host_mirror)"
  if [ ! -f "$ROOT/.stamp-debootstrap" ]; then
    rm -rf "$ROOT"
    mkdir -p "$(dirname "$ROOT")"
    log "debootstrap trixie from $mirror into $ROOT"
    debootstrap --variant=minbase trixie "$ROOT" "$mirror" >/tmp/rollout-debootstrap.log 2>&1 \
      || { tail -n 30 /tmp/rollout-debootstrap.log >&2; exit 1; }
    touch "$ROOT/.stamp-debootstrap"
    log "debootstrap took $((SECONDS - t0)) s"
  fi
  cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
  t0=$SECONDS
  log "installing Python 3.13 and a compiler in the root"
  in_root host 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-dev gcc g++ ca-certificates >/dev/null'
  copy_host_config
  touch "$ROOT/.stamp-system"
  log "system packages took $((SECONDS - t0)) s"
}

venv_hash() { { cat "$REPO/pyproject.toml"; echo "$SGLANG_JAX $MSGPACK"; } | sha256sum | cut -c1-16; }

build_venv() {
  local want; want="$(venv_hash)"
  if [ -f "$ROOT/.stamp-venv" ] && [ "$(cat "$ROOT/.stamp-venv")" = "$want" ]; then
    log "venv up to date"
  else
    local t0=$SECONDS
    log "installing the venv (rollout[sglang,test-sglang], $SGLANG_JAX, then $MSGPACK last)"
    in_root host "set -e; [ -x $VENV/bin/python ] || python3 -m venv $VENV
      python -m pip install -q --upgrade pip
      python -m pip install -q -e '/src[sglang,test-sglang]' '$SGLANG_JAX'
      python -m pip install -q --force-reinstall --no-deps '$MSGPACK'"
    echo "$want" >"$ROOT/.stamp-venv"
    log "venv took $((SECONDS - t0)) s"
  fi
  # The editable install points at /src, where each run binds the checkout it runs from (CI's
  # fresh clone, a developer's worktree): nothing to reinstall when only the code changed.
}

main() {
  [ "$(id -u)" = 0 ] || { echo "sglang_root.sh needs root (debootstrap, chroot, mounts)" >&2; exit 1; }
  local cmd="${1:-}"; shift || true
  case "$cmd" in
    build)
      build_root
      build_venv
      ;;
    run)
      [ -f "$ROOT/.stamp-venv" ] || { echo "no root at $ROOT: run '$0 build' first" >&2; exit 1; }
      local net=lo
      if [ "${1:-}" = "--net" ]; then net=host; shift; fi
      [ "$#" -gt 0 ] || { echo "usage: $0 run [--net] CMD..." >&2; exit 2; }
      in_root "$net" 'cd /src && exec "$@"' "$@"
      ;;
    *)
      sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
      exit 2
      ;;
  esac
}

main "$@"
