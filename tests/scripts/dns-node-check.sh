#!/usr/bin/env bash
# Runs INSIDE tests/scripts/kernel-vm (a kernel with the dummy link type), in a network namespace
# it creates: `nodekeeper dns-wiring` with a managed dummy interface. Checks that setup creates
# nodekeeper-dns (dummy, NOARP, up) holding exactly the listen addresses (/32, /128 nodad) and
# installs exactly one set of rules; that check restores a deleted address, a downed link, a
# deleted rule and a deleted interface and removes a stale address; that a SIGKILLed wiring owner
# under another config followed by a new setup leaves exactly the new set; that the fail-open
# guard takes the ClusterIP off the interface (keeping the link-local one) and the rules away
# when the stand-in cache is SIGKILLed, so dig through the ClusterIP reaches kube-dns via DNAT;
# and that teardown removes the interface and every rule.
# Prints "DNS NODE OK" on success. Everything vanishes with the VM.
set -euo pipefail
BIN=${NODEKEEPER_BIN:-target/debug/nodekeeper}
w=$(mktemp -d)
ns=nk-dns-vm
ip netns add $ns
X() { ip netns exec $ns "$@"; }
X ip link set lo up
fail() { echo "dns-node-check: $*" >&2; X ip -d addr >&2 || true; X iptables-save >&2 || true; exit 1; }
IF=nodekeeper-dns

cat >"$w/a.yaml" <<C
dns:
  listenIps: [169.254.20.10, "fd00:20::10"]
  clusterIps: [10.96.0.10]
  node:
    interface: $IF
    rules: iptables
    checkInterval: 1s
C
sed 's/10.96.0.10/10.96.0.11/' "$w/a.yaml" >"$w/b.yaml"
wiring() { X "$BIN" dns-wiring "$1" --config "$2" 2>>"$w/log" || { cat "$w/log" >&2; fail "dns-wiring $1 failed"; }; }
ours() { X "$1" | grep -c -- '--comment nodekeeper-dns' || true; }
expect_rules() { # v4 v6
  [ "$(ours iptables-save)" = "$1" ] || fail "expected $1 IPv4 rules, found $(ours iptables-save)"
  [ "$(ours ip6tables-save)" = "$2" ] || fail "expected $2 IPv6 rules, found $(ours ip6tables-save)"
}
addrs() { X ip -o addr show dev $IF | awk '{print $4}' | grep -v '^fe80' | sort | tr '\n' ' '; }
repairs() { sed -n 's/.*"repairs":\([0-9]*\).*/\1/p'; }

echo "== setup"
wiring setup "$w/a.yaml"
X ip -d link show $IF | grep -q 'dummy' || fail "$IF is not a dummy link"
X ip link show $IF | grep -q 'NOARP' || fail "$IF is not NOARP"
X ip link show $IF | grep -q ',UP' || fail "$IF is not up"
[ "$(addrs)" = "10.96.0.10/32 169.254.20.10/32 fd00:20::10/128 " ] || fail "addresses: $(addrs)"
X ip -o -6 addr show dev $IF | grep 'fd00:20::10' | grep -q nodad || fail "the IPv6 address is not nodad"
X ip -o -6 addr show dev $IF | grep 'fd00:20::10' | grep -q tentative && fail "the IPv6 address is tentative"
expect_rules 28 14
X iptables -t raw -S | grep nodekeeper-dns

echo "== setup again: idempotent"
wiring setup "$w/a.yaml"
expect_rules 28 14
[ "$(X ip -o link show | grep -c " $IF:")" = 1 ] || fail "more than one $IF"
[ "$(addrs)" = "10.96.0.10/32 169.254.20.10/32 fd00:20::10/128 " ] || fail "addresses: $(addrs)"

echo "== check repairs a deleted address, a downed link, a deleted rule, a stale address"
X ip addr del 10.96.0.10/32 dev $IF
X ip link set $IF down
X ip addr add 10.99.0.1/32 dev $IF
X iptables -t raw -D PREROUTING -d 10.96.0.10/32 -p udp -m udp --dport 53 -m comment --comment nodekeeper-dns -j NOTRACK
n=$(wiring check "$w/a.yaml" | repairs)
echo "repairs=$n"
[ "$n" -ge 4 ] || fail "check repaired $n things, expected at least 4"
X ip link show $IF | grep -q ',UP' || fail "$IF was not brought up"
[ "$(addrs)" = "10.96.0.10/32 169.254.20.10/32 fd00:20::10/128 " ] || fail "addresses after check: $(addrs)"
expect_rules 28 14
[ "$(wiring check "$w/a.yaml" | repairs)" = 0 ] || fail "a second check still repaired something"

echo "== check recreates a deleted interface"
X ip link del $IF
n=$(wiring check "$w/a.yaml" | repairs)
[ "$n" -ge 1 ] || fail "check did not recreate $IF"
[ "$(addrs)" = "10.96.0.10/32 169.254.20.10/32 fd00:20::10/128 " ] || fail "addresses after re-create: $(addrs)"

echo "== SIGKILL of a wiring owner under another config, then setup: exactly the new set"
# Background jobs run `ip netns exec` directly (not through X), so $! is the process itself.
ip netns exec $ns "$BIN" dns-wiring hold --config "$w/b.yaml" >"$w/hold.out" 2>"$w/hold.log" &
holder=$!
for _ in $(seq 100); do grep -q '"ready":true' "$w/hold.out" 2>/dev/null && break; sleep 0.2; done
grep -q '"ready":true' "$w/hold.out" || { cat "$w/hold.log" >&2; fail "hold did not get ready"; }
X iptables-save | grep -q '10.96.0.11/32' || fail "hold did not install its rules"
kill -9 $holder; wait $holder 2>/dev/null || true
wiring setup "$w/a.yaml"
expect_rules 28 14
X iptables-save | grep -q '10.96.0.11' && fail "a stale rule for 10.96.0.11 survived"
[ "$(addrs)" = "10.96.0.10/32 169.254.20.10/32 fd00:20::10/128 " ] || fail "addresses after stale cleanup: $(addrs)"

echo "== guard: SIGKILL the cache -> the ClusterIP answers from kube-dns"
# A node's default route, kube-dns on 10.0.0.53, and kube-proxy's DNAT for the ClusterIP.
X ip link add eth0 type dummy; X ip addr add 192.0.2.1/24 dev eth0; X ip link set eth0 up
X ip route add default via 192.0.2.254 dev eth0
X ip addr add 10.0.0.53/32 dev lo
for p in udp tcp; do X iptables -t nat -A OUTPUT -d 10.96.0.10/32 -p $p --dport 53 -j DNAT --to-destination 10.0.0.53:53; done
dnsmasq_on() { # name address answer
  ip netns exec $ns dnsmasq --keep-in-foreground --no-resolv --no-hosts --bind-interfaces --user=root \
    --listen-address="$2" --address=/probe.test/"$3" --pid-file="$w/$1.pid" 2>"$w/$1.log" &
}
dnsmasq_on kubedns 10.0.0.53 10.0.0.1; kubedns=$!
dnsmasq_on cache 169.254.20.10,10.96.0.10 10.0.0.2; cache=$!
ask() { X dig +short +time=1 +tries=1 @10.96.0.10 probe.test 2>/dev/null | head -1; }
for _ in $(seq 50); do [ "$(ask)" = 10.0.0.2 ] && break; sleep 0.2; done
[ "$(ask)" = 10.0.0.2 ] || fail "the stand-in cache does not answer through the ClusterIP"
ip netns exec $ns "$BIN" dns-guard --config "$w/a.yaml" --interval 1s --failures 3 2>"$w/guard.log" &
guard=$!
sleep 3
[ "$(ask)" = 10.0.0.2 ] || fail "the guard failed open while the cache answers"
expect_rules 28 14
kill -9 $cache; wait $cache 2>/dev/null || true
t0=$(date +%s%N)
until [ "$(ask)" = 10.0.0.1 ]; do
  [ $(( ($(date +%s%N) - t0) / 1000000 )) -lt 20000 ] || { cat "$w/guard.log" >&2; fail "no answer from kube-dns within 20 s"; }
  sleep 0.05
done
ms=$(( ($(date +%s%N) - t0) / 1000000 ))
echo "fail-open after ${ms} ms (VM under software emulation)"
# The guard removes the rules before it takes the ClusterIP off the interface and logs after both:
# under load the answers come back before it is done, so wait for its line.
for _ in $(seq 100); do grep -q 'failed open' "$w/guard.log" && break; sleep 0.1; done
grep -q 'failed open' "$w/guard.log" || { cat "$w/guard.log" >&2; fail "the guard did not log failing open"; }
expect_rules 0 0
[ "$(addrs)" = "169.254.20.10/32 fd00:20::10/128 " ] || fail "after failing open: $(addrs)"
kill -TERM $guard; wait $guard 2>/dev/null || true
kill $kubedns 2>/dev/null || true

echo "== teardown"
wiring setup "$w/a.yaml"
wiring teardown "$w/a.yaml"
X ip link show $IF >/dev/null 2>&1 && fail "$IF still exists"
expect_rules 0 0
wiring teardown "$w/a.yaml"
echo "DNS NODE OK"
