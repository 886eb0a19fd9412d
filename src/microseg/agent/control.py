"""The agent's control socket: a Unix stream socket, one JSON request line in, one JSON reply
line out, then the connection closes (in the spirit of ``ovs-appctl``).

Requests are ``{"cmd": "status"}``, ``{"cmd": "stats"}`` and ``{"cmd": "reload", "policy":
PATH}`` (``policy`` optional: the file the agent runs). The socket file is created mode 0600
and the server also checks the peer's credentials (``SO_PEERCRED``): only root and the
agent's own user are answered.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

from ..errors import MicrosegError

MAX_REQUEST = 1 << 16


class ControlError(MicrosegError):
    """The agent could not be reached or did not answer."""


def listen(path: str) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path`` (a stale file there is replaced),
    created with mode 0600."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(16)
    s.setblocking(False)
    return s


def peer_allowed(conn: socket.socket) -> bool:
    cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", cred)
    return uid in (0, os.getuid())


def read_request(conn: socket.socket, timeout: float = 2.0) -> dict:
    conn.settimeout(timeout)
    buf = b""
    while b"\n" not in buf and len(buf) < MAX_REQUEST:
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    line = buf.split(b"\n", 1)[0].strip()
    if not line:
        raise ValueError("empty request")
    if line.startswith(b"{"):
        req = json.loads(line)
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            raise ValueError('a request is {"cmd": "..."}')
        return req
    words = line.decode().split()  # also accept "status", "reload P.yaml"
    req = {"cmd": words[0]}
    if len(words) > 1:
        req["policy"] = words[1]
    return req


def send_reply(conn: socket.socket, reply: dict) -> None:
    conn.sendall(json.dumps(reply, sort_keys=True).encode() + b"\n")


def request(path: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict:
    """Send one request to the agent at ``path`` and return its reply."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc.strerror or exc}") from None
    finally:
        s.close()
    if not buf.strip():
        raise ControlError(f"control socket {path}: no reply")
    return json.loads(buf)
