# Helpers of the hooks shipped with ganeti-vol (doc/hooks.md).  Sourced, never run.
#
# A hook sources this file as "$(dirname "$0")/../ganeti-vol-hooks.sh": it sits at the
# top of the hooks directory, where Ganeti looks for no hooks.  The settings are read
# from ganeti-vol-hooks.conf next to it ('ganeti-vol hooks install' writes it once).

gv_hook=${0##*/}
gv_dir=$(dirname "$0")/..

# Defaults of every setting (ganeti-vol-hooks.conf documents them).
GANETI_VOL=
GANETI_VOL_CONFIG=
EXPORT_DIR=/srv/ganeti/export
VERIFY_EXPORT=yes
VERIFY_PARAMS=yes
VERIFY_PARAMS_NODES=instance
CHECK_SPACE=yes
CHECK_SPACE_PERCENT=100
CHECK_SPACE_RESERVE_MIB=1024

if [ -r "$gv_dir/ganeti-vol-hooks.conf" ]; then
  . "$gv_dir/ganeti-vol-hooks.conf"
fi
if [ -n "$GANETI_VOL_CONFIG" ]; then
  export GANETI_VOL_CONFIG
fi

# gv_log MESSAGE...: to stdout (the hook's output, which Ganeti keeps) and to syslog.
gv_log() {
  echo "$gv_hook: $*"
  if command -v logger >/dev/null 2>&1; then
    logger -t ganeti-vol-hooks -p daemon.notice -- "$gv_hook: $*" 2>/dev/null || :
  fi
}

# gv_var NAME: GANETI_POST_<NAME> in the post phase if set, else GANETI_<NAME>.
gv_var() {
  eval "gv_v=\${GANETI_POST_$1-\${GANETI_$1-}}"
  printf '%s' "$gv_v"
}

# gv_enabled VALUE: true for yes, true, on or 1.
gv_enabled() {
  case "$1" in
    [Yy][Ee][Ss]|[Tt][Rr][Uu][Ee]|[Oo][Nn]|1) return 0 ;;
  esac
  return 1
}

# gv_this_node NAME: true if the node name NAME (short or FQDN, or localhost) is this node.
gv_this_node() {
  case "$1" in
    localhost|localhost.*) return 0 ;;
  esac
  gv_me=$(uname -n)
  [ -n "$1" ] && [ "${1%%.*}" = "${gv_me%%.*}" ]
}

# gv_find_ganeti_vol: set GANETI_VOL to a command running ganeti-vol, or return 1.
# Ganeti gives hooks PATH=/sbin:/bin:/usr/sbin:/usr/bin, without /usr/local/bin.
gv_find_ganeti_vol() {
  [ -n "$GANETI_VOL" ] && return 0
  for gv_c in ganeti-vol /usr/local/bin/ganeti-vol; do
    if command -v "$gv_c" >/dev/null 2>&1; then
      GANETI_VOL=$gv_c
      return 0
    fi
  done
  return 1
}

# gv_export_here: for instance-export hooks.  Sets gv_name; exits 0 unless the export
# is a local one written to this node (Ganeti runs these hooks on the master, the
# primary and the target node).
gv_export_here() {
  gv_name=$(gv_var INSTANCE_NAME)
  if [ -z "$gv_name" ]; then
    gv_log "GANETI_INSTANCE_NAME is not set: not run as a Ganeti instance-export hook?"
    exit 1
  fi
  gv_mode=$(gv_var EXPORT_MODE)
  if [ "${gv_mode:-local}" != local ]; then
    gv_log "export of $gv_name is a $gv_mode export: nothing to do on this node"
    exit 0
  fi
  gv_node=$(gv_var EXPORT_NODE)
  if [ -n "$gv_node" ] && ! gv_this_node "$gv_node"; then
    gv_log "export of $gv_name goes to node $gv_node, not to this one: nothing to do here"
    exit 0
  fi
}
