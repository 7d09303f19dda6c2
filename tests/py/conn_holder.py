#!/usr/bin/env python3
"""Holds a known set of sockets for the connection-census tests (tests/src/netns_pods.rs).

Usage: conn_holder.py SPEC_JSON

Run inside a network namespace (`ip netns exec NS python3 conn_holder.py SPEC`). Builds, in this
order, everything SPEC asks for, prints "ready" on stdout once it is all in place, keeps every
socket open (echoing on the served ones, ticking on the active ones) and exits when its stdin
closes. Any failure prints "error: ..." and exits 1 before "ready".

SPEC keys (all optional):
  rlimit      int: raise RLIMIT_NOFILE to this many descriptors (beyond the hard limit only with
              CAP_SYS_RESOURCE; otherwise up to the hard limit).
  serve       [{addr, port, backlog}]: listeners (IPv6 when addr has a colon) that accept everything, hold the connections,
              echo what they receive and close a connection when its peer closes.
  listen      [{addr, port, backlog}]: listeners that never accept: their accept queue fills up.
  connect     [{addr, port, count, active, src, src_port}]: `count` established connections to
              addr:port (blocking connects); the first `active` of them send one byte every
              100 ms and read the echo, the rest stay silent. `src` binds the local address,
              `src_port` the local port (SO_REUSEADDR, so several connections to different
              remotes can share it).
  targets     {prefix, count, port}: one connection to each of `count` distinct addresses,
              prefix.0.1, prefix.0.2, ... (prefix is the first two octets, "10.78"), on port.
  fill        [{addr, port, count, overflow}]: `count` blocking connects that complete the
              handshake and then stay silent (to fill a peer's accept queue), then `overflow`
              non-blocking connects whose SYN the full queue drops (one ListenOverflows each);
              these are closed after 200 ms, before their first SYN retransmission, so the
              counter moves exactly once per overflow connect.
  time_wait   int: that many loopback connections (127.0.0.1, a temporary listener) closed
              client side first, so each client socket ends in TIME_WAIT; the listener and the
              server sides are gone before "ready".
  udp         int: that many UDP sockets bound to 127.0.0.1:0.
"""

import json
import os
import resource
import selectors
import socket
import sys
import time

TICK = 0.1


def fail(msg):
    print(f"error: {msg}", flush=True)
    sys.exit(1)


def main():
    if len(sys.argv) != 2:
        fail("usage: conn_holder.py SPEC_JSON")
    spec = json.loads(sys.argv[1])
    if "rlimit" in spec:
        n = int(spec["rlimit"])
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
        except (ValueError, OSError):
            # No CAP_SYS_RESOURCE (a container): the hard limit is as far as we can go.
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))

    def family(addr):
        # serve/listen/connect: an IPv6 address ("::1") gets an IPv6 socket.
        return socket.AF_INET6 if ":" in addr else socket.AF_INET

    keep = []  # every socket we must hold open
    sel = selectors.DefaultSelector()
    servers = []
    for s in spec.get("serve", []):
        ls = socket.socket(family(s["addr"]), socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((s["addr"], s["port"]))
        ls.listen(s.get("backlog", 4096))
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ, ("accept", ls))
        servers.append(ls)
        keep.append(ls)
    for s in spec.get("listen", []):
        ls = socket.socket(family(s["addr"]), socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((s["addr"], s["port"]))
        ls.listen(s["backlog"])
        keep.append(ls)

    def accept_pending():
        for ls in servers:
            while True:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, ("echo", c))
                keep.append(c)

    active = []
    for c in spec.get("connect", []):
        for i in range(c["count"]):
            s = socket.socket(family(c["addr"]), socket.SOCK_STREAM)
            if "src" in c or "src_port" in c:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((c.get("src", "::" if ":" in c["addr"] else "0.0.0.0"), c.get("src_port", 0)))
            s.settimeout(10)
            try:
                s.connect((c["addr"], c["port"]))
            except OSError as e:
                fail(f"connect {c['addr']}:{c['port']} #{i}: {e}")
            keep.append(s)
            if i < c.get("active", 0):
                s.setblocking(False)
                sel.register(s, selectors.EVENT_READ, ("drain", s))
                active.append(s)
            # Keep our own accept queues short (a hostNetwork pod connecting to itself).
            accept_pending()

    t = spec.get("targets")
    if t:
        a, b = (int(x) for x in t["prefix"].split("."))
        for i in range(t["count"]):
            n = i + 1
            addr = f"{a}.{b}.{n // 256}.{n % 256}"
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect((addr, t["port"]))
            except OSError as e:
                fail(f"connect {addr}:{t['port']}: {e}")
            keep.append(s)

    for f in spec.get("fill", []):
        for i in range(f["count"]):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect((f["addr"], f["port"]))
            except OSError as e:
                fail(f"fill {f['addr']}:{f['port']} #{i}: {e}")
            keep.append(s)
        dropped = []
        for _ in range(f.get("overflow", 0)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            err = s.connect_ex((f["addr"], f["port"]))
            if err not in (0, 115):  # EINPROGRESS
                fail(f"overflow connect {f['addr']}:{f['port']}: errno {err}")
            dropped.append(s)
        if dropped:
            time.sleep(0.2)
            for s in dropped:
                s.close()

    tw = int(spec.get("time_wait", 0))
    if tw:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind(("127.0.0.1", 0))
        ls.listen(tw)
        for _ in range(tw):
            c = socket.create_connection(ls.getsockname(), timeout=10)
            srv, _ = ls.accept()
            srv.settimeout(10)
            c.close()  # the client closes first: it is the side that ends in TIME_WAIT
            if srv.recv(1) != b"":
                fail("time_wait: expected EOF")
            srv.close()
        ls.close()
        time.sleep(0.05)

    for _ in range(int(spec.get("udp", 0))):
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", 0))
        keep.append(u)

    accept_pending()
    sel.register(0, selectors.EVENT_READ, ("stdin", None))
    print("ready", flush=True)

    next_tick = time.monotonic()
    while True:
        now = time.monotonic()
        if active and now >= next_tick:
            for s in active:
                try:
                    s.send(b"x")
                except OSError:
                    pass
            next_tick = now + TICK
        timeout = max(0.0, next_tick - time.monotonic()) if active else None
        for key, _ in sel.select(timeout):
            kind, s = key.data
            if kind == "stdin":
                if not os.read(0, 4096):
                    return
            elif kind == "accept":
                accept_pending()
            elif kind == "echo":
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(s)
                    s.close()
                else:
                    try:
                        s.send(data)
                    except OSError:
                        pass
            elif kind == "drain":
                try:
                    s.recv(4096)
                except OSError:
                    pass


if __name__ == "__main__":
    main()
