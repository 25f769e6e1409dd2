"""An ssh ProxyCommand that drops the link: ``cutproxy.py HOST PORT LIMIT``.

It forwards stdin to HOST:PORT and back, and exits (both directions cut at
once, as when a cable is pulled or a router dies) once LIMIT bytes have gone
from the client to the server.
"""

import os
import select
import socket
import sys


def main() -> int:
    host, port, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sock = socket.create_connection((host, port))
    sent = 0
    inputs = [0, sock]
    while True:
        ready, _, _ = select.select(inputs, [], [])
        if 0 in ready:
            data = os.read(0, min(65536, max(1, limit - sent)))
            if not data:
                sock.shutdown(socket.SHUT_WR)
                inputs = [sock]
            else:
                sock.sendall(data)
                sent += len(data)
                if sent >= limit:
                    os._exit(0)
        if sock in ready:
            data = sock.recv(65536)
            if not data:
                return 0
            os.write(1, data)


if __name__ == "__main__":
    sys.exit(main())
