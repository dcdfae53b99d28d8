#!/usr/bin/env bash
# Install Debian's SLURM (slurmctld, slurmd, client tools) and munge, without starting services.
# Needs root. A policy-rc.d that exits 101 stops the packages' scripts from starting daemons
# (there is no systemd here); it is removed again if this script put it there.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
   && command -v sbatch >/dev/null; then
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "installing SLURM needs root" >&2; exit 1; }
created=0
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && created=1
fi
trap '[ "$created" = 1 ] && rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "installed: $(dpkg-query -W -f '${Package} ${Version}  ' slurmctld slurmd slurm-client munge)"
