# Shared by the maintainer scripts of sluice-agent and sluice-relay: scripts/package
# pastes this file into each script in place of the line "#COMMON#", after setting
# PKG (this package), OTHER (the other sluice package) and CONFIG (its file in
# /etc/sluice).
#
# Every path is under $DPKG_ROOT, which dpkg sets for installs into another root
# (dpkg --root=DIR --force-script-chrootless; empty otherwise), and the running systemd
# is asked only when the install is into the running system: in a chroot, a container
# build or another root the scripts change files under that root and nothing else.

ROOT=${DPKG_ROOT:-}

systemd_here() {
  [ -z "$ROOT" ] && [ -d /run/systemd/system ]
}

# has_entry passwd|group NAME: the host's name service for the running system (getent),
# the root's own files for another root.
has_entry() {
  if [ -z "$ROOT" ]; then
    getent "$1" "$2" >/dev/null
  else
    grep -q "^$2:" "$ROOT/etc/$1" 2>/dev/null
  fi
}

# The numeric id of NAME in the root's passwd or group file (chown by name would look
# the name up on the host, which is wrong for another root).
file_id() {
  awk -F: -v n="$2" '$1 == n { print $3; exit }' "$ROOT/etc/$1"
}

# shadow CMD ARGS...: useradd, groupadd, userdel or groupdel on the root's own files
# (--prefix, shadow 4.6 and later, for another root).
shadow() {
  cmd=$1
  shift
  if [ -n "$ROOT" ]; then "$cmd" --prefix "$ROOT" "$@"; else "$cmd" "$@"; fi
}

# One system user and group "sluice" for both packages; created once, kept while either
# package is installed.
ensure_user() {
  if ! has_entry group sluice; then
    shadow groupadd --system sluice
  fi
  if ! has_entry passwd sluice; then
    shadow useradd --system --gid sluice --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin --comment "sluice log shipper" sluice
  fi
}

# /var/lib/$PKG, owned by sluice. systemd makes it too (StateDirectory=); this is for a
# host or container that runs the binary without systemd.
ensure_data_dir() {
  uid=$(file_id passwd sluice)
  gid=$(file_id group sluice)
  if [ -n "$uid" ] && [ -n "$gid" ]; then
    install -d -m 0750 -o "$uid" -g "$gid" "$ROOT/var/lib/$PKG"
  else
    install -d -m 0750 "$ROOT/var/lib/$PKG"
  fi
}

# The config may hold secrets (shared_key, passwords): root and group sluice only. Done
# at every configure, because dpkg installs a new conffile with the archive's root:root.
config_group() {
  gid=$(file_id group sluice)
  if [ -n "$gid" ] && [ -f "$ROOT/etc/sluice/$CONFIG" ]; then
    chgrp "$gid" "$ROOT/etc/sluice/$CONFIG"
    chmod 0640 "$ROOT/etc/sluice/$CONFIG"
  fi
}

# Whether dpkg still knows OTHER (installed, or removed with its config and data kept).
other_known() {
  status=$(dpkg-query --admindir="${DPKG_ADMINDIR:-$ROOT/var/lib/dpkg}" -W \
    -f='${db:Status-Status}' "$OTHER" 2>/dev/null) || return 1
  [ -n "$status" ] && [ "$status" != not-installed ]
}
