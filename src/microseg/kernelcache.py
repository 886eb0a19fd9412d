"""Where the compiled kernels are cached.

Numba caches a compiled function beside its source and keys the cached copy on that one
file's time stamp and size. A kernel that compiles in a kernel of another module (the
datapath's fast kernel calls conntrack's) would go on running the old code after only the
other module changed, until its own file changed too. So microseg keeps Numba's cache in a
folder named after a digest of all of the package's Python sources: after any change to the
code (an upgrade, a checkout) every kernel compiles afresh, once, and the folders of earlier
digests are removed.

The folder is ``__pycache__/numba/<digest>`` inside the package when that is writable (a
source checkout, a user's venv), else ``$XDG_CACHE_HOME/microseg/numba/<digest>`` (default
``~/.cache``). A NUMBA_CACHE_DIR set by the user is used as it is.
"""

from __future__ import annotations

import hashlib
import os
import shutil


def source_digest(package_dir: str) -> str:
    """A digest of every ``.py`` file below ``package_dir``: their paths and contents."""
    h = hashlib.blake2b(digest_size=10)
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            h.update(os.path.relpath(path, package_dir).encode())
            h.update(b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
            h.update(b"\0")
    return h.hexdigest()


def _bases(package_dir: str) -> list[str]:
    """Where the cache may live, first choice first."""
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(package_dir, "__pycache__", "numba"), os.path.join(home, "microseg", "numba")]


def prepare(package_dir: str) -> str | None:
    """The cache folder for the package's code as it is now (made if needed, earlier digests'
    folders removed), or None where no place is writable."""
    try:
        digest = source_digest(package_dir)
    except OSError:
        return None
    for base in _bases(package_dir):
        where = os.path.join(base, digest)
        try:
            os.makedirs(where, exist_ok=True)
            if not os.access(where, os.W_OK):
                continue
        except OSError:
            continue
        try:
            for old in os.listdir(base):
                if old != digest:
                    shutil.rmtree(os.path.join(base, old), ignore_errors=True)
        except OSError:
            pass
        return where
    return None
