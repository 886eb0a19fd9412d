"""The agent's control socket: a Unix stream socket, one JSON request line in, one JSON reply
line out, then the connection closes (in the spirit of ``ovs-appctl``).

Requests are ``{"cmd": "status"}``, ``{"cmd": "stats"}``, ``{"cmd": "reload", "policy":
PATH}`` (``policy`` optional: the file the agent runs), ``{"cmd": "conntrack", ...filters}``
and ``{"cmd": "trace", "packet": "src=... dst=... proto=... dport=..."}``; ``microseg ctl``
is the command-line client. The socket file is created mode 0600
and the server also checks the peer's credentials (``SO_PEERCRED``): only root and the
agent's own user are answered.
"""

from __future__ import annotations

import argparse
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
    words = line.decode().split()  # also accept "status", "reload P.yaml", "trace src=..."
    plain: dict[str, Any] = {"cmd": words[0]}
    if len(words) > 1:
        if words[0] == "trace":
            plain["packet"] = " ".join(words[1:])
        else:
            plain["policy"] = words[1]
    return plain


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


# ---------------------------------------------------------------------------------------------
# microseg ctl: the command-line client
# ---------------------------------------------------------------------------------------------
def register(sub: Any) -> None:
    p = sub.add_parser(
        "ctl",
        help="ask a running agent (status, stats, reload, conntrack, trace)",
        description="Send one request to a running `microseg agent` over its control socket "
        "and print the answer (in the spirit of ovs-appctl). Exit status 0 when the agent "
        "answered ok, 1 when it refused, 2 when it could not be reached.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--control", metavar="PATH", help="the agent's --control socket")
    where.add_argument("--lab", metavar="HOST", help="the agent of HOST in the running lab")
    p.add_argument("--state-dir", metavar="DIR", help="the lab's state directory (with --lab)")
    p.add_argument("--json", action="store_true", help="print the agent's JSON answer as it is")
    verbs = p.add_subparsers(dest="ctl_cmd", metavar="CMD")
    verbs.required = True
    # --json also after the command (the value given before it stays unless repeated)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    verbs.add_parser("status", help="host, ports, policy, underlay peers", parents=[common])
    verbs.add_parser("stats", help="counters, drops by reason, CPU seconds", parents=[common])
    r = verbs.add_parser("reload", help="load a policy file (default: the one it runs)", parents=[common])
    r.add_argument("policy", nargs="?", metavar="P.yaml")
    c = verbs.add_parser(
        "conntrack", help="the live connections, as conntrack -L prints them", parents=[common]
    )
    c.add_argument("--zone", type=int, help="a tenant's VNI")
    c.add_argument("--src", help="original source address")
    c.add_argument("--dst", help="original destination address")
    c.add_argument("--proto", help="tcp, udp, icmp, icmpv6 or a number")
    c.add_argument("--state", help="TCP state (ESTABLISHED, TIME_WAIT, ...)")
    c.add_argument("--limit", type=int, default=10000, help="at most this many (default 10000)")
    t = verbs.add_parser("trace", help="what the running datapath does with one packet", parents=[common])
    t.add_argument("packet", help='as `microseg trace` takes it, e.g. "src=web-1 dst=db-1 tcp dport=5432"')
    t.add_argument(
        "--state",
        choices=("live", "new", "established"),
        default="live",
        help="live: against a copy of the agent's conntrack (default); new: as a first packet; "
        "established: after the connection's opening exchange",
    )
    p.set_defaults(func=run_ctl)


def _socket_path(args: Any) -> str:
    if args.control:
        return args.control
    from .lab import DEFAULT_STATE_DIR, State

    st = State(args.state_dir or DEFAULT_STATE_DIR)
    if not st.exists():
        raise ControlError("no lab is up (lab up first, or give --state-dir)")
    hosts = st.load()["hosts"]
    if args.lab not in hosts:
        raise ControlError(f"the lab has no host {args.lab!r} (hosts: {', '.join(sorted(hosts))})")
    return str(hosts[args.lab]["control"])


def run_ctl(args: Any) -> int:
    import sys

    path = _socket_path(args)
    cmd = args.ctl_cmd
    req: dict[str, Any] = {}
    if cmd == "reload" and args.policy:
        req["policy"] = os.path.abspath(args.policy)
    elif cmd == "conntrack":
        req = {k: getattr(args, k) for k in ("zone", "src", "dst", "proto", "state", "limit")}
        req = {k: v for k, v in req.items() if v is not None}
    elif cmd == "trace":
        req = {"packet": args.packet, "state": args.state}
    reply = request(path, cmd, timeout=30.0, **req)  # unreachable: ControlError, exit 2
    ok = bool(reply.get("ok"))
    if args.json or not ok:
        if not ok:
            print(f"microseg ctl: error: the agent refused: {reply.get('error', reply)}", file=sys.stderr)
        else:
            print(json.dumps(reply, indent=2, sort_keys=True))
        return 0 if ok else 1
    if cmd == "conntrack":
        from ..conntrack.commands import format_line

        for e in reply["entries"]:
            print(format_line(e))
        more = " (more not shown)" if reply.get("truncated") else ""
        print(f"conntrack: {reply['count']} flow entries{more}", file=sys.stderr)
    elif cmd == "trace":
        for i, step in enumerate(reply["steps"], 1):
            print(f"{i:2d}. {step['stage']:<18} {step['detail']}")
        print(f"verdict: {reply['verdict']}")
    else:
        print(json.dumps({k: v for k, v in reply.items() if k != "ok"}, indent=2, sort_keys=True))
    return 0
