#!/usr/bin/env bash
# Two simulated hosts on this machine: network namespaces NS_A and NS_B joined by a veth pair,
# addresses PREFIX.1 and PREFIX.2 in a private /24 (traffic stays between the two namespaces).
# Each namespace gets /etc/netns/NS/hosts (which `ip netns exec` mounts over /etc/hosts) naming
# both hosts, HOST_A and HOST_B, as a cluster's DNS would: run commands there with on_host.sh.
#   usage: netns_up.sh NS_A NS_B [PREFIX] [HOST_A] [HOST_B]   e.g. netns_up.sh gtA gtB 10.213.7 nodeA nodeB
# Needs root and iproute2. Undo with netns_down.sh NS_A NS_B.
set -euo pipefail
A=${1:?usage: netns_up.sh NS_A NS_B [PREFIX]}
B=${2:?usage: netns_up.sh NS_A NS_B [PREFIX]}
PREFIX=${3:-10.213.7}
HOST_A=${4:-nodeA}
HOST_B=${5:-nodeB}
for ns in "$A" "$B"; do
  mkdir -p "/etc/netns/$ns"
  printf '127.0.0.1 localhost\n%s %s\n%s %s\n' "$PREFIX.1" "$HOST_A" "$PREFIX.2" "$HOST_B" > "/etc/netns/$ns/hosts"
done
ip netns add "$A"
ip netns add "$B"
ip link add "v-$A" type veth peer name "v-$B"   # names <= 15 characters
ip link set "v-$A" netns "$A"
ip link set "v-$B" netns "$B"
ip -n "$A" addr add "$PREFIX.1/24" dev "v-$A"
ip -n "$B" addr add "$PREFIX.2/24" dev "v-$B"
for ns in "$A" "$B"; do
  ip -n "$ns" link set lo up
  ip -n "$ns" link set "v-$ns" up
done
command -v ping >/dev/null && { ip netns exec "$A" ping -c 1 -W 2 "$PREFIX.2" >/dev/null || echo "warning: ping $PREFIX.2 from $A failed" >&2; }
echo "$A: $HOST_A $PREFIX.1 (v-$A)  <->  $B: $HOST_B $PREFIX.2 (v-$B)"
