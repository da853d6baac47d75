#!/bin/sh
# Entrypoint of the kvrecall images (run under tini, which forwards signals and reaps).
#
#   <image>                       -> kvrecall <the image's CMD>
#   <image> serve --device cpu    -> kvrecall serve --device cpu     (any kvrecall subcommand)
#   <image> bench e2e --help      -> kvrecall bench e2e --help
#   <image> --device cpu          -> kvrecall serve --device cpu     (flags only: the daemon)
#   <image> sh -c '...'           -> runs that command as is         (debugging)
#
# Configuration is the command's flags or the KVRECALL_* environment variables, which mirror
# them (KVRECALL_LISTEN, KVRECALL_DEVICE, KVRECALL_METRICS_PORT, ...).
set -eu

case "${1:-}" in
  "" | -*)
    set -- kvrecall serve "$@"
    ;;
  serve | health | stats | worker | demo | eval | soak | bench)
    set -- kvrecall "$@"
    ;;
esac

if [ "${1:-}" = kvrecall ] && [ "${2:-}" = serve ]; then
  # The socket directory is a volume shared with the workers. Fail early, with a message an
  # operator can act on, when it is not writable by this (non-root) user.
  sock_dir=/run/kvrecall
  if [ -d "$sock_dir" ] && [ ! -w "$sock_dir" ]; then
    echo "kvrecall-entrypoint: $sock_dir is not writable by uid $(id -u);" \
         "the socket volume must be owned by uid $(id -u) (a fresh named volume is)." >&2
    exit 1
  fi
  echo "kvrecall-entrypoint: variant=${KVRECALL_VARIANT:-?} uid=$(id -u)" \
       "shm=$(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $2}')" >&2
fi

exec "$@"
