"""The compiled kernels' cache follows the package's code (microseg.kernelcache): a change in
any source file, not only the kernel's own, leads to a fresh compile."""

from __future__ import annotations

import os
import subprocess
import sys

from microseg import kernelcache as KC


def _tree(root):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "pkg" / "sub" / "b.py").write_text("B = 2\n")
    return str(root / "pkg")


def test_the_digest_follows_every_source_file_and_nothing_else(tmp_path):
    pkg = _tree(tmp_path)
    d0 = KC.source_digest(pkg)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "x.nbi").write_bytes(b"cache")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert KC.source_digest(pkg) == d0
    (tmp_path / "pkg" / "sub" / "b.py").write_text("B = 3\n")  # a module the kernel calls into
    d1 = KC.source_digest(pkg)
    assert d1 != d0
    (tmp_path / "pkg" / "sub" / "b.py").rename(tmp_path / "pkg" / "sub" / "c.py")
    assert KC.source_digest(pkg) not in (d0, d1)


def test_prepare_makes_the_digest_folder_and_removes_earlier_ones(tmp_path):
    pkg = _tree(tmp_path)
    first = KC.prepare(pkg)
    assert first is not None and os.path.isdir(first)
    assert first.startswith(os.path.join(pkg, "__pycache__", "numba"))
    (tmp_path / "pkg" / "a.py").write_text("A = 2\n")
    second = KC.prepare(pkg)
    assert second != first and os.path.isdir(second) and not os.path.exists(first)


def test_prepare_falls_back_to_the_user_cache_where_the_package_is_read_only(tmp_path, monkeypatch):
    pkg = _tree(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    (tmp_path / "blocker").write_text("a file where a folder would have to be")
    orig = KC._bases
    monkeypatch.setattr(KC, "_bases", lambda p: [str(tmp_path / "blocker" / "numba"), *orig(p)[1:]])
    where = KC.prepare(pkg)
    assert where is not None and where.startswith(str(tmp_path / "xdg" / "microseg" / "numba"))


def _cache_dir_seen(env) -> str:
    code = "import microseg, numba.core.config as c; print(c.CACHE_DIR)"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_importing_microseg_points_numba_at_the_digest_folder():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    import microseg

    pkg = os.path.dirname(os.path.abspath(microseg.__file__))
    assert _cache_dir_seen(env) == os.path.join(pkg, "__pycache__", "numba", KC.source_digest(pkg))


def test_a_cache_folder_the_user_chose_is_kept(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "mine"))
    assert _cache_dir_seen(env) == str(tmp_path / "mine")
