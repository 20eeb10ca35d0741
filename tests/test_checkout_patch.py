"""A new commit's checkout is made from the last one: the cost follows the change.

gitopsd.engine.source materialises each fetched commit into its own
directory. For a commit that changes a few files of a big monorepo it
hard-links the previous checkout's files and checks out only the changed
paths (`_patch`). These tests fetch real commits through that path and
compare every checkout with a fresh one made from an empty cache, across the
changes that are easy to get wrong: deletions that empty a directory, a file
become a link or a directory and back, a retargeted link, an executable bit,
odd names.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from test_source import Upstream, git_identity, upstream  # noqa: F401

from gitopsd.engine import source


def tree(root: Path) -> dict[str, tuple]:
    """Every entry below `root`: (kind, executable bit, content or link target); directories included."""
    out: dict[str, tuple] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory, name)
            rel = str(path.relative_to(root))
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", bool(st.st_mode & stat.S_IXUSR), path.read_bytes())
    return out


def fresh(upstream: Upstream, tmp_path: Path, n: int) -> Path:
    """The checkout of the current commit from an empty cache (checked out whole)."""
    return source.fetch(upstream.url, "main", cache_dir=tmp_path / f"fresh-{n}").path


def change(work: Path, step: str) -> None:
    """One commit's worth of change to the working tree (git add -A follows)."""
    w = work
    if step == "modify":
        (w / "apps/a/cm.yaml").write_text("a: 2\n")
    elif step == "add nested":
        (w / "apps/new/deep/er").mkdir(parents=True)
        (w / "apps/new/deep/er/x.yaml").write_text("x: 1\n")
    elif step == "delete emptying a directory":
        (w / "apps/new/deep/er/x.yaml").unlink()
        for d in ("apps/new/deep/er", "apps/new/deep", "apps/new"):
            (w / d).rmdir()
    elif step == "rename":
        os.rename(w / "apps/b/cm.yaml", w / "apps/b/renamed.yaml")
    elif step == "file become a link":
        (w / "apps/a/cm.yaml").unlink()
        os.symlink("../b/renamed.yaml", w / "apps/a/cm.yaml")
    elif step == "link retargeted":
        (w / "apps/a/cm.yaml").unlink()
        os.symlink("../c/cm.yaml", w / "apps/a/cm.yaml")
    elif step == "executable bit":
        os.chmod(w / "apps/c/cm.yaml", 0o755)
    elif step == "directory become a file":
        for f in (w / "apps/c").iterdir():
            f.unlink()
        (w / "apps/c").rmdir()
        (w / "apps/c").write_text("now a file\n")
    elif step == "file become a directory":
        (w / "apps/c").unlink()
        (w / "apps/c").mkdir()
        (w / "apps/c/cm.yaml").write_text("c: back\n")
    elif step == "directory become a link":
        for f in (w / "apps/b").iterdir():
            f.unlink()
        (w / "apps/b").rmdir()
        os.symlink("c", w / "apps/b")
    elif step == "odd names":
        (w / "apps/-dash dir").mkdir()
        (w / "apps/-dash dir/ünï cødé.yaml").write_text("u: 1\n")
    elif step == "many at once":
        for i in range(30):
            (w / f"apps/many/{i:02d}").mkdir(parents=True)
            (w / f"apps/many/{i:02d}/cm.yaml").write_text(f"i: {i}\n")
    elif step == "nothing":
        pass
    else:
        raise AssertionError(step)


STEPS = ["modify", "add nested", "delete emptying a directory", "rename", "file become a link", "link retargeted",
         "executable bit", "directory become a file", "file become a directory", "directory become a link",
         "odd names", "many at once", "nothing"]


def test_a_checkout_made_from_the_last_one_is_the_commits_tree(upstream, tmp_path):
    upstream.commit({"apps/a/cm.yaml": "a: 1\n", "apps/b/cm.yaml": "b: 1\n", "apps/c/cm.yaml": "c: 1\n",
                     "README.md": "fleet\n"})
    cache = tmp_path / "cache"
    source.fetch(upstream.url, "main", cache_dir=cache)

    for n, step in enumerate(STEPS):
        change(upstream.work, step)
        upstream.commit({}, message=step)
        patched = source.fetch(upstream.url, "main", cache_dir=cache).path
        assert tree(patched) == tree(fresh(upstream, tmp_path, n)), step


def test_a_checkout_made_from_the_last_one_shares_its_unchanged_files_and_never_writes_them(upstream, tmp_path):
    upstream.commit({f"apps/{n:02d}/cm.yaml": f"v: {n}\n" for n in range(20)})
    cache = tmp_path / "cache"
    old = source.fetch(upstream.url, "main", cache_dir=cache).path

    upstream.commit({"apps/07/cm.yaml": "v: changed\n"})
    new = source.fetch(upstream.url, "main", cache_dir=cache).path

    assert os.stat(new / "apps/03/cm.yaml").st_ino == os.stat(old / "apps/03/cm.yaml").st_ino
    assert os.stat(new / "apps/07/cm.yaml").st_ino != os.stat(old / "apps/07/cm.yaml").st_ino
    assert (old / "apps/07/cm.yaml").read_text() == "v: 7\n"      # the older checkout is as it was
    assert (new / "apps/07/cm.yaml").read_text() == "v: changed\n"


@pytest.mark.parametrize("damage", ["gone", "parent is a file"])
def test_a_changed_path_that_cannot_be_removed_safely_makes_the_checkout_whole(upstream, tmp_path, damage):
    """A changed path whose parent is missing is simply checked out; one whose parent is not a directory
    (nothing git makes; here a hand-altered cache) is never written through: the tree is checked out whole."""
    upstream.commit({"apps/a/cm.yaml": "a: 1\n", "apps/b/cm.yaml": "b: 1\n"})
    cache = tmp_path / "cache"
    old = source.fetch(upstream.url, "main", cache_dir=cache).path
    if damage == "gone":
        for f in (old / "apps/a").iterdir():
            f.unlink()
        (old / "apps/a").rmdir()
    else:
        for f in (old / "apps/a").iterdir():
            f.unlink()
        (old / "apps/a").rmdir()
        (old / "apps/a").write_text("in the way\n")

    upstream.commit({"apps/a/cm.yaml": "a: 2\n"})
    patched = source.fetch(upstream.url, "main", cache_dir=cache).path

    assert (patched / "apps/a/cm.yaml").read_text() == "a: 2\n"
    if damage == "parent is a file":
        assert tree(patched) == tree(fresh(upstream, tmp_path, 0))


def test_the_next_checkout_starts_from_a_spare_made_after_the_last_fetch(upstream, tmp_path):
    """After a fetch the tree is hard-linked again, off the fetch's path (`spares/<sha>`); the next commit's
    checkout consumes that spare instead of linking thousands of directories while a push waits."""
    from helpers import wait_for

    upstream.commit({f"apps/{n:02d}/cm.yaml": f"v: {n}\n" for n in range(20)})
    cache = tmp_path / "cache"
    first = source.fetch(upstream.url, "main", cache_dir=cache)
    spare = first.path.parent.parent / "spares" / first.revision.sha
    wait_for("the spare of the last checkout", spare.is_dir, 30, 0.05)

    upstream.commit({"apps/07/cm.yaml": "v: changed\n", "apps/new/cm.yaml": "v: new\n"})
    patched = source.fetch(upstream.url, "main", cache_dir=cache).path

    assert not spare.exists()   # consumed
    assert tree(patched) == tree(fresh(upstream, tmp_path, 0))
    assert (first.path / "apps/07/cm.yaml").read_text() == "v: 7\n"
