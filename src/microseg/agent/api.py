"""The agent's REST control API, served beside its Prometheus metrics (``--metrics``).

The same handlers as the control socket (:meth:`microseg.agent.agent.Agent.handle`), JSON in
and out, under ``/v1/``:

=====================  ==========================================================
``GET /v1/status``     the agent's status (``microseg ctl status``)
``GET /v1/stats``      its counters
``GET /v1/conntrack``  live connections; query ``src``, ``dst``, ``proto``, ``state``,
                       ``zone``, ``limit``
``POST /v1/trace``     what the datapath does with one packet: ``{"packet": "...",
                       "state": "live"}``
``POST /v1/reload``    reload the policy file: ``{"policy": PATH}`` (optional)
``GET /v1/openapi.json``  the OpenAPI 3 document (:func:`openapi`)
=====================  ==========================================================

Errors are JSON too, ``{"ok": false, "error": "..."}``, with the HTTP status that fits: 400
(a bad request: bad JSON, a bad filter, a packet that does not parse), 401 (a wrong token),
403 (a mutating call while the agent has no token file), 404, 405, 409 (refused: a reload the
agent will not do), 413 (a body over 64 KiB), 503 (the agent's loop did not answer in time).

Security: the server listens only on loopback or a Unix socket (mode 0600), as the metrics.
Read-only calls need no token; ``POST /v1/reload`` needs ``Authorization: Bearer TOKEN``
with the token of ``--api-token-file`` (a file of mode 0600 or stricter, owned by the agent's
user or root). ``POST /v1/trace`` changes nothing live (it runs on a copy), so it is read-only.

Requests are handed to the agent's packet loop (:meth:`Agent.call`) and answered between two
batches, exactly as control-socket requests are; the HTTP thread never touches the datapath.
"""

from __future__ import annotations

import hmac
import json
import os
import stat
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from ..errors import InputError

MAX_BODY = 1 << 16
API_VERSION = "1.0.0"

# request handler: a control request (``{"cmd": ...}``) -> its reply
Handler = Callable[[dict], dict]


def load_token(path: str) -> str:
    """The bearer token in ``path``: the file must be a regular file of mode 0600 or stricter
    (no group or other bits), owned by root or this user, and not empty."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"--api-token-file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"--api-token-file {path}: not a regular file")
    if st.st_mode & 0o077:
        raise InputError(
            f"--api-token-file {path}: mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 "
            f"(readable by its owner only)"
        )
    if st.st_uid not in (0, os.getuid()):
        raise InputError(f"--api-token-file {path}: owned by uid {st.st_uid}, not root or this user")
    with open(path, encoding="utf-8", errors="replace") as f:
        token = f.read().strip()
    if not token or any(c.isspace() for c in token):
        raise InputError(f"--api-token-file {path}: one token, no spaces (it is empty or has several words)")
    return token


# -- the OpenAPI document ----------------------------------------------------------------------
def _err(desc: str) -> dict:
    return {
        "description": desc,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _ok(desc: str, schema: str) -> dict:
    return {
        "description": desc,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def openapi() -> dict:
    """The OpenAPI 3 document of the API (also committed as ``docs/api/openapi.json``)."""
    query = [
        ("src", "string", "the original source address"),
        ("dst", "string", "the original destination address"),
        ("proto", "string", "tcp, udp, icmp, icmpv6 or a protocol number"),
        ("state", "string", "TCP state (ESTABLISHED, SYN_SENT, TIME_WAIT, ...)"),
        ("zone", "integer", "the conntrack zone: a tenant's VNI"),
        ("limit", "integer", "at most this many entries (default 10000)"),
    ]
    params = [
        {
            "name": n,
            "in": "query",
            "required": False,
            "description": d,
            "schema": {"type": t, **({"minimum": 0} if t == "integer" else {})},
        }
        for n, t, d in query
    ]
    obj: dict[str, Any] = {"type": "object", "additionalProperties": True}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "microseg agent control API",
            "version": API_VERSION,
            "description": "One host's microseg agent: status, counters, conntrack, packet "
            "traces and policy reloads. Served on loopback or a Unix socket only, beside "
            "/metrics. Mutating calls need a bearer token (the agent's --api-token-file).",
        },
        "servers": [{"url": "/"}],
        "paths": {
            "/v1/status": {
                "get": {
                    "operationId": "getStatus",
                    "summary": "The agent's status: host, policy, ports, underlay, store",
                    "responses": {"200": _ok("status", "Status"), "503": _err("the agent did not answer")},
                }
            },
            "/v1/stats": {
                "get": {
                    "operationId": "getStats",
                    "summary": "The agent's counters: verdicts, drops, conntrack, ports",
                    "responses": {"200": _ok("counters", "Stats"), "503": _err("the agent did not answer")},
                }
            },
            "/v1/conntrack": {
                "get": {
                    "operationId": "listConntrack",
                    "summary": "Live connections, filtered",
                    "parameters": params,
                    "responses": {
                        "200": _ok("connections", "Conntrack"),
                        "400": _err("a bad filter"),
                        "503": _err("the agent did not answer"),
                    },
                }
            },
            "/v1/trace": {
                "post": {
                    "operationId": "trace",
                    "summary": "What the running datapath does with one packet (on a copy of the live state)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/TraceRequest"}}
                        },
                    },
                    "responses": {
                        "200": _ok("the packet's way through the datapath", "Trace"),
                        "400": _err("a bad request or a packet that does not parse"),
                        "413": _err("the body is over 64 KiB"),
                        "503": _err("the agent did not answer"),
                    },
                }
            },
            "/v1/reload": {
                "post": {
                    "operationId": "reload",
                    "summary": "Reload the policy file (or another one); refused for an agent on the store",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": False,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/ReloadRequest"}}
                        },
                    },
                    "responses": {
                        "200": _ok("the new policy runs", "Reload"),
                        "400": _err("a bad request"),
                        "401": _err("a missing or wrong token"),
                        "403": _err("the agent has no token file: mutating calls are off"),
                        "409": _err("refused: the running policy stays"),
                        "413": _err("the body is over 64 KiB"),
                        "503": _err("the agent did not answer"),
                    },
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "getOpenapi",
                    "summary": "This document",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3 document",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["ok", "error"],
                    "properties": {"ok": {"type": "boolean", "enum": [False]}, "error": {"type": "string"}},
                },
                "Status": {
                    **obj,
                    "required": ["ok", "host", "address", "ready", "policy", "ports"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "host": {"type": "string"},
                        "address": {"type": "string"},
                        "pid": {"type": "integer"},
                        "ready": {"type": "boolean"},
                        "policy": {"type": "object"},
                        "ports": {"type": "object", "additionalProperties": {"type": "string"}},
                        "policy_revision": {"type": "integer", "nullable": True},
                    },
                },
                "Stats": {
                    **obj,
                    "required": ["ok", "host", "packets", "verdicts", "drops", "conntrack"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "host": {"type": "string"},
                        "packets": {"type": "integer"},
                        "bytes": {"type": "integer"},
                        "verdicts": {"type": "object"},
                        "drops": {"type": "object"},
                        "conntrack": {"type": "object"},
                    },
                },
                "Conntrack": {
                    "type": "object",
                    "required": ["ok", "count", "entries", "truncated"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "count": {"type": "integer"},
                        "entries": {"type": "array", "items": {"type": "object"}},
                        "truncated": {"type": "boolean"},
                    },
                },
                "TraceRequest": {
                    "type": "object",
                    "required": ["packet"],
                    "properties": {
                        "packet": {
                            "type": "string",
                            "example": "src=acme/web-1 dst=acme/db-1 proto=tcp dport=5432",
                        },
                        "state": {
                            "type": "string",
                            "enum": ["live", "new", "established"],
                            "default": "live",
                        },
                    },
                },
                "Trace": {**obj, "required": ["ok"], "properties": {"ok": {"type": "boolean"}}},
                "ReloadRequest": {
                    "type": "object",
                    "properties": {
                        "policy": {"type": "string", "description": "a policy file on the agent's host"}
                    },
                },
                "Reload": {
                    "type": "object",
                    "required": ["ok", "version", "cut", "hash"],
                    "properties": {
                        "ok": {"type": "boolean"},
                        "version": {"type": "integer"},
                        "cut": {"type": "integer"},
                        "hash": {"type": "string"},
                    },
                },
            },
        },
    }


# -- the WSGI application ----------------------------------------------------------------------
_STATUS = {
    200: "200 OK",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    403: "403 Forbidden",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    409: "409 Conflict",
    411: "411 Length Required",
    413: "413 Payload Too Large",
    503: "503 Service Unavailable",
}

# path -> (method, control command, mutating, status of a refusal)
ROUTES = {
    "/v1/status": ("GET", "status", False, 503),
    "/v1/stats": ("GET", "stats", False, 503),
    "/v1/conntrack": ("GET", "conntrack", False, 400),
    "/v1/trace": ("POST", "trace", False, 400),
    "/v1/reload": ("POST", "reload", True, 409),
    "/v1/openapi.json": ("GET", None, False, 500),
}
_QUERY = ("src", "dst", "proto", "state", "zone", "limit")


class ApiApp:
    """WSGI application for ``/v1/...``; everything else goes to ``fallback`` (the
    Prometheus app, for ``/metrics``). ``handler`` answers control requests; ``token`` (None:
    mutating calls are refused with 403)."""

    def __init__(self, handler: Handler, token: str | None = None, fallback=None):
        self.handler = handler
        self.token = token
        self.fallback = fallback
        self._doc = json.dumps(openapi(), indent=2, sort_keys=True).encode() + b"\n"

    def __call__(self, environ: dict, start_response) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        if not path.startswith("/v1/") and path != "/v1" and self.fallback is not None:
            return self.fallback(environ, start_response)
        code, body, extra = self._dispatch(environ, path)
        data = body if isinstance(body, bytes) else json.dumps(body, default=str).encode() + b"\n"
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *extra]
        start_response(_STATUS.get(code, f"{code} Error"), headers)
        return [data]

    def _dispatch(self, environ: dict, path: str) -> tuple[int, Any, list]:
        route = ROUTES.get(path.rstrip("/") if path != "/" else path)
        if route is None:
            return 404, {"ok": False, "error": f"no such endpoint {path} (see /v1/openapi.json)"}, []
        method, cmd, mutating, refused = route
        got = environ.get("REQUEST_METHOD", "GET").upper()
        if got == "HEAD" and method == "GET":
            got = "GET"
        if got != method:
            return 405, {"ok": False, "error": f"{path}: use {method}"}, [("Allow", method)]
        if cmd is None:
            return 200, self._doc, []
        if mutating:
            if self.token is None:
                return (
                    403,
                    {"ok": False, "error": f"{path}: mutating calls are off (no --api-token-file)"},
                    [],
                )
            auth = environ.get("HTTP_AUTHORIZATION", "")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self.token.encode()
            ):
                return (
                    401,
                    {"ok": False, "error": f"{path}: a bearer token is required"},
                    [("WWW-Authenticate", "Bearer")],
                )
        req: dict[str, Any] = {}
        if method == "GET":
            try:
                qs = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=False, strict_parsing=False)
            except ValueError as exc:
                return 400, {"ok": False, "error": f"bad query: {exc}"}, []
            unknown = sorted(set(qs) - set(_QUERY)) if cmd == "conntrack" else sorted(qs)
            if unknown:
                return 400, {"ok": False, "error": f"{path}: unknown query parameter {unknown[0]!r}"}, []
            req = {k: v[-1] for k, v in qs.items()}
        else:
            try:
                n = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                return 400, {"ok": False, "error": "bad Content-Length"}, []
            if n > MAX_BODY:
                return 413, {"ok": False, "error": f"the body is over {MAX_BODY} bytes"}, []
            raw = environ["wsgi.input"].read(n) if n > 0 else b""
            if raw.strip():
                try:
                    req = json.loads(raw)
                except (ValueError, UnicodeDecodeError) as exc:
                    return 400, {"ok": False, "error": f"the body is not JSON: {exc}"}, []
                if not isinstance(req, dict):
                    return 400, {"ok": False, "error": "the body must be a JSON object"}, []
            elif cmd == "trace":
                return (
                    400,
                    {"ok": False, "error": 'trace: give a JSON body {"packet": "...", "state": "live"}'},
                    [],
                )
            if cmd == "reload" and req.get("policy") is not None and not isinstance(req["policy"], str):
                return 400, {"ok": False, "error": "reload: policy must be a path"}, []
        req.pop("cmd", None)
        try:
            out = self.handler({**req, "cmd": cmd})
        except TimeoutError as exc:
            return 503, {"ok": False, "error": str(exc) or "the agent did not answer in time"}, []
        if not out.get("ok"):
            return refused, {"ok": False, "error": str(out.get("error", "refused"))}, []
        return 200, out, []
