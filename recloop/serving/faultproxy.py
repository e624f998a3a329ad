"""A loopback TCP proxy that can black-hole a server: the fault injector of the serving fault tests and
of `bench/overload.py`.

`FaultProxy(host, port)` listens on a free loopback port and forwards every connection to the server.
`cut()` makes the network path a black hole: connections are still accepted and stay open, but no byte
moves in either direction (what a client sees when a server's host or link goes away without a RST or
FIN, the case that makes clients wait for timeouts rather than fail fast). `resume()` lets the bytes
flow again (what was held during the cut is delivered late, as TCP would). `close()` ends everything.

    with FaultProxy("127.0.0.1", 6379) as proxy:      # redis://127.0.0.1:{proxy.port}/0 reaches Redis
        proxy.cut(); ...; proxy.resume()

As a process (for a load generator that should not share its interpreter with the proxy):

    python -m recloop.serving.faultproxy 127.0.0.1:6379
    # prints the port it listens on, then reads "cut", "resume" or "close" lines on stdin
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading


class FaultProxy:
    """See the module docstring. Threads: one accepting, two per connection (one per direction)."""

    def __init__(self, host: str, port: int, *, listen_host: str = "127.0.0.1") -> None:
        self.target = (host, port)
        self._listener = socket.create_server((listen_host, 0))
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        self._acceptor.start()

    @property
    def is_cut(self) -> bool:
        return not self._flowing.is_set()

    def cut(self) -> None:
        """Black-hole the path: nothing is forwarded until `resume()`."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        """Stop listening and close every connection."""
        self._closed = True
        self._flowing.set()  # releases the pipes held by a cut, which then find their sockets closed
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        self._acceptor.join(timeout=5)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()  # the server itself is down: the client sees the connection closed
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), name="faultproxy-pipe", daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._flowing.wait()
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()  # bytes read just before a cut are held, not delivered, until resume
                if self._closed:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or ":" not in args[0]:
        print("usage: python -m recloop.serving.faultproxy HOST:PORT", file=sys.stderr)
        return 2
    host, _, port = args[0].rpartition(":")
    proxy = FaultProxy(host, int(port))
    print(proxy.port, flush=True)
    try:
        for line in sys.stdin:
            command = line.strip()
            if command == "cut":
                proxy.cut()
            elif command == "resume":
                proxy.resume()
            elif command == "close":
                proxy.close()
            elif command:
                print(f"unknown command {command!r} (cut, resume, close)", flush=True)
                continue
            print(f"ok {command}", flush=True)
            if command == "close":
                break
    finally:
        proxy.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
