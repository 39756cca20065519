"""A small threaded TCP forwarder on 127.0.0.1 that a test or bench controls: storage outages and slow uploads.

``TcpProxy(target_port)`` listens on a free port (read back from the OS) and forwards every connection to
``127.0.0.1:target_port``. :meth:`TcpProxy.cut` resets every live connection and every new one (the client
sees "connection reset" or a closed connection, as when a load balancer or NAT drops it); :meth:`restore`
forwards again. ``throttle(bytes_per_s)`` slows the client-to-server direction only (request bodies:
uploads), so that a test can act while a large upload is in flight; ``bytes_up`` counts the bytes forwarded
in that direction, which is how a test sees an upload progress.
"""

import contextlib
import socket
import struct
import threading
import time
from typing import Any

_CHUNK = 16 * 1024


def _reset(sock):
    """Drop ``sock`` with a TCP RST (SO_LINGER 0). ``shutdown`` first: it wakes a thread blocked in ``recv``."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target_port``; ``cut``/``restore``/``throttle`` at will."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, int(target_port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._live: set[socket.socket] = set()  # sockets of forwarded connections (both ends)
        self._cut = False
        self._rate: float | None = None  # bytes/s client -> server, None: unlimited
        self.bytes_up = 0  # client -> server bytes forwarded
        self.bytes_down = 0
        self.connections = 0  # forwarded connections opened
        self.rejected = 0  # connections reset because the proxy was cut
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name=f"tcp-proxy-{self.port}", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def query(self) -> str:
        """The URI query that points pyarrow at this proxy: ``?endpoint_override=127.0.0.1:PORT&scheme=http``."""
        return f"?endpoint_override={self.endpoint}&scheme=http"

    def cut(self) -> None:
        """Storage goes away: reset live connections, and reset every new one until :meth:`restore`."""
        with self._lock:
            self._cut = True
            live, self._live = self._live, set()
        for sock in live:
            _reset(sock)

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def throttle(self, bytes_per_s: float | None) -> None:
        """Forward client -> server at most ``bytes_per_s`` (None: unlimited again)."""
        self._rate = bytes_per_s

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the forwarding --------------------------------------------------------------------------------------

    def _accept(self):
        self._listener.settimeout(0.2)
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                cut = self._cut
                if cut:
                    self.rejected += 1
            if cut:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._cut:  # cut while connecting
                    self.rejected += 1
                    _reset(client)
                    _reset(upstream)
                    continue
                self._live.update((client, upstream))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src, dst, up):
        started, sent = time.monotonic(), 0
        try:
            while True:
                rate = self._rate if up else None
                data = src.recv(min(_CHUNK, max(1024, int(rate) // 10)) if rate else _CHUNK)
                if not data:
                    break
                if rate:
                    sent += len(data)
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)  # pacing: this direction never runs ahead of the rate
                else:
                    started, sent = time.monotonic(), 0
                dst.sendall(data)
                with self._lock:
                    if up:
                        self.bytes_up += len(data)
                    else:
                        self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            with self._lock:
                was_live = src in self._live
                self._live.discard(src)
                self._live.discard(dst)
            if was_live:  # one side closed: close both (a cut has already reset them)
                for sock in (dst, src):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        sock.close()
