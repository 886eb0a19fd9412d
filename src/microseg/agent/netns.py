"""Entering a named network namespace (``/run/netns/NAME``, as ``ip netns`` makes them) for a
moment, from the calling thread: sockets made inside stay in that namespace after the thread
returns to its own."""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


class InNetns:
    """``with InNetns("name"):`` runs the block's network calls (sockets, interface names,
    ioctls) in namespace ``name``; the thread goes back to its own namespace on exit."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            fd = os.open(os.path.join("/run/netns", self.name), os.O_RDONLY)
        except OSError:
            os.close(self._home)
            raise
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                os.close(self._home)
                raise OSError(err, f"setns {self.name}: {os.strerror(err)}")
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc):
        _libc.setns(self._home, CLONE_NEWNET)
        os.close(self._home)
