#!/usr/bin/env python3
"""Client-side checks against the fake ClusterIP.

  client.py conn HOST N [timeout]   N fresh TCP connections; tally which backend answered
  client.py hold HOST SECONDS       one long-lived connection; sends a line every 0.2s,
                                    prints the backend and every reply (established flow)
"""
import socket, sys, time, collections

def connect(host, timeout):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.settimeout(timeout)
    # single SYN: a retransmitted SYN would create a fresh conntrack entry and
    # be load-balanced again (possibly to the allowed backend)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
    c.connect((host, 80))
    return c

if sys.argv[1] == "conn":
    host, n = sys.argv[2], int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
    tally = collections.Counter()
    for _ in range(n):
        try:
            c = connect(host, timeout)
            tally[c.recv(64).decode().strip()] += 1
            c.close()
        except (socket.timeout, TimeoutError):
            tally["TIMEOUT(dropped)"] += 1
        except OSError as e:
            tally["ERR " + e.strerror] += 1
    print(host, dict(sorted(tally.items())))
elif sys.argv[1] == "hold":
    host, secs = sys.argv[2], float(sys.argv[3])
    c = connect(host, 2.0)
    f = c.makefile("rb")
    print("hold: connected to", f.readline().decode().strip(), flush=True)
    end, i, ok = time.time() + secs, 0, 0
    c.settimeout(2.0)
    try:
        while time.time() < end:
            c.sendall(b"ping %d\n" % i)
            f.readline(); ok += 1; i += 1
            time.sleep(0.2)
        print("hold: %d/%d round trips OK over %.1fs" % (ok, i, secs), flush=True)
    except OSError as e:
        print("hold: FAILED after %d round trips: %s" % (ok, e), flush=True)
