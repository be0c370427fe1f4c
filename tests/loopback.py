"""A raw TCP server on loopback for the outbound-request tests (config/network.py): it counts
the connections it accepts, so a test can show that a refused URL reached nothing, and it
can answer one byte at a time, so a test can show that a deadline bounds a whole transfer."""

from __future__ import annotations

import socket
import threading
import time

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class Listener:
    """Answers every request with ``reply``, sleeping ``drip`` seconds before each byte.
    ``heads`` holds what each connection sent first (the request line and headers)."""

    def __init__(self, host: str = "127.0.0.1", reply: bytes = OK, drip: float = 0.0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{self.port}"
        self.reply, self.drip = reply, drip
        self.heads: list[bytes] = []
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def connections(self) -> int:
        return len(self.heads)

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.heads.append(b"")
            threading.Thread(target=self._answer, args=(conn, len(self.heads) - 1),
                             daemon=True).start()

    def _answer(self, conn: socket.socket, index: int) -> None:
        with conn:
            conn.settimeout(10)
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    head += chunk
                self.heads[index] = head
                if not self.drip:
                    conn.sendall(self.reply)
                    return
                for i in range(len(self.reply)):
                    time.sleep(self.drip)
                    conn.sendall(self.reply[i:i + 1])
            except OSError:
                return  # the client gave up, as it should

    def close(self) -> None:
        self._closed = True
        self.sock.close()


class HTTPServer:
    """A threaded HTTP server on loopback that answers each GET with ``answer(path, headers)``
    -> (status, extra headers, body); ``wrap`` may wrap its socket (TLS)."""

    def __init__(self, answer, wrap=None):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                status, headers, body = answer(self.path, self.headers)
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if wrap is not None:
            self.server.socket = wrap(self.server.socket)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
