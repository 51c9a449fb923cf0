#!/usr/bin/env python3
"""N connections with the kernel's default SYN retries and a 5s timeout:
shows that a dropped SYN's retransmission is load-balanced again."""
import socket, sys, time, collections
host, n = sys.argv[1], int(sys.argv[2])
tally = collections.Counter()
for _ in range(n):
    t0 = time.time()
    try:
        c = socket.create_connection((host, 80), timeout=5)
        who = c.recv(16).decode().strip(); c.close()
        dt = time.time() - t0
        tally["%s after %s" % (who, "<0.5s" if dt < 0.5 else "%.0fs(SYN retransmit)" % dt)] += 1
    except OSError:
        tally["failed"] += 1
print(host, dict(sorted(tally.items())))
