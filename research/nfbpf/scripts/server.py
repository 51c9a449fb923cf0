#!/usr/bin/env python3
"""Backend: dual-stack TCP on :8080 (+ UDP sink on :8080). Sends '<name>\n' on accept, then echoes lines."""
import socket, sys, threading

name = sys.argv[1].encode()
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", 8080))
s.listen(512)

def handle(c):
    with c:
        try:
            c.sendall(name + b"\n")
            f = c.makefile("rb")
            for line in f:
                c.sendall(name + b" echo " + line)
        except OSError:
            pass

def udp_sink():
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", 8080))
    while True:
        u.recv(2048)  # discard; never reply (so the UDP conntrack stays unreplied)

threading.Thread(target=udp_sink, daemon=True).start()
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
