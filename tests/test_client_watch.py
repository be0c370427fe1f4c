"""The web's check that a client is still connected, on sockets above fd 1024 (select's limit,
which ~1000 open streams reach)."""

from __future__ import annotations

import os
import socket

from flask import Flask

from web.generation import client_watch


def high_fd_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    fd = os.dup2(a.fileno(), 1500)
    high = socket.socket(fileno=fd)
    a.close()
    return high, b


def test_client_watch_sees_open_and_closed_connections_past_fd_1024():
    server_side, client_side = high_fd_pair()
    assert server_side.fileno() >= 1024
    app = Flask(__name__)
    with app.test_request_context(environ_base={"gunicorn.socket": server_side}):
        gone = client_watch()
    assert gone() is False
    client_side.sendall(b"pipelined bytes")
    assert gone() is False, "data waiting is not a closed connection"
    client_side.close()
    server_side.recv(100)
    assert gone() is True
    server_side.close()
