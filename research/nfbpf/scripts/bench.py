#!/usr/bin/env python3
"""Traffic for the cost measurement (run inside nfb-client).

  bench.py pingpong HOST N   one TCP connection, N request/response round trips
                             -> program sees only ESTABLISHED / ESTABLISHED_REPLY
  bench.py conns HOST N      N short TCP connections (SYN is NEW, rest established)
  bench.py udp HOST N        N 64-byte datagrams from one socket to HOST:80; the sink
                             never replies, so every packet is ctinfo NEW + DNAT
                             -> every packet takes the full judge path
"""
import socket, sys, time

mode, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
t0 = time.time()
if mode == "pingpong":
    c = socket.create_connection((host, 80), timeout=2)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = c.makefile("rb")
    f.readline()
    for i in range(n):
        c.sendall(b"x\n")
        f.readline()
    c.close()
elif mode == "conns":
    ok = 0
    for i in range(n):
        try:
            c = socket.create_connection((host, 80), timeout=0.5)
            c.recv(16); c.close(); ok += 1
        except OSError:
            pass
    print("conns ok=%d/%d" % (ok, n))
elif mode == "udp":
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.connect((host, 80))
    msg = b"u" * 64
    for i in range(n):
        u.send(msg)
dt = time.time() - t0
print("%s %s n=%d %.2fs" % (mode, host, n, dt))
