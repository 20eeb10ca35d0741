"""A chart's dependencies, made ready for `helm template` without reaching out unasked.

`helm template` never fetches a dependency: each one Chart.yaml (or a v1
chart's requirements.yaml) lists must already be a subchart under charts/ —
vendored, as a directory or a `helm package` archive. Charts in Git often
are not: a `file://../common` library chart next to them, or a chart from a
repository on the network, resolved by `helm dependency build`.

Here:

- a dependency present under charts/ is used as it is (helm matches by the
  subchart's own name, as `CheckDependencies` does);
- a missing `file://` dependency inside the checkout is built from the
  commit, offline: the chart and those directories are copied (links were
  checked by the caller and here) into the render's private temp dir, and
  the real `helm package` puts each dependency under the copy's charts/ —
  the checkout is never written, so other apps rendering it see it as
  committed (not `helm dependency build`: it downloads every dependency
  again, vendored ones included);
- a missing dependency from a repository (`https://`, `oci://`) is fetched
  only when the app allows it (`helm: {allowRemoteDependencies: true}`),
  by `helm dependency build` on the copy (honouring Chart.lock), read at
  render time from outside the reviewed commit; otherwise the
  render fails naming it, with the two ways out (vendor it, or allow it);
- a dependency that names a repository by alias (`@stable`, `alias:x`) is
  refused: gitopsd's renders run with a private, empty helm home, so no
  alias exists there; give the repository's URL.

A local dependency's own missing dependencies are built first (depth-first),
with the same rules.
"""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from gitopsd.engine import confine, yamlload
from gitopsd.engine.confine import relative

CHART_FILE = "Chart.yaml"
REQUIREMENTS_FILE = "requirements.yaml"   # apiVersion v1 charts list dependencies here
# What is read of a vendored archive to learn its chart's name: its first members, and
# at most this much of its decompressed stream (a gzip bomb ahead of Chart.yaml stops here).
_ARCHIVE_MEMBERS = 16
_ARCHIVE_CHART_BYTES = 1024 * 1024
_ARCHIVE_READ_BYTES = 8 * 1024 * 1024
_REMOTE_SCHEMES = ("https://", "http://", "oci://")


@dataclass(frozen=True)
class Dependency:
    name: str
    repository: str     # "" when the chart must be vendored

    @property
    def local(self) -> bool:
        return self.repository.startswith("file://")

    @property
    def remote(self) -> bool:
        return self.repository.startswith(_REMOTE_SCHEMES)

    def shown(self) -> str:
        return f"{self.name!r} ({self.repository})" if self.repository else repr(self.name)


def declared(chart: Path) -> list[Dependency] | None:
    """The dependencies the chart at `chart` lists; None when its files cannot be read
    (helm reports that better)."""
    docs = []
    for name in (CHART_FILE, REQUIREMENTS_FILE):
        file = chart / name
        if not file.is_file():
            continue
        try:
            docs.append(yamlload.load_one(file.read_text()))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
    found: list[Dependency] = []
    for doc in docs:
        entries = doc.get("dependencies") if isinstance(doc, dict) else None
        for entry in entries if isinstance(entries, list) else ():
            if isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry["name"]:
                repo = entry.get("repository")
                found.append(Dependency(entry["name"], repo.strip() if isinstance(repo, str) else ""))
    return found


def vendored(chart: Path) -> set[str]:
    """Names of the subcharts under charts/ (directories and archives), by their own Chart.yaml."""
    names: set[str] = set()
    try:
        entries = sorted((chart / "charts").iterdir())
    except OSError:
        return names
    for entry in entries:
        if entry.is_dir():
            name = _chart_name((entry / CHART_FILE))
        elif entry.name.endswith(".tgz"):
            name = _archive_chart_name(entry)
        else:
            continue
        if name:
            names.add(name)
    return names


def missing(chart: Path) -> list[Dependency]:
    """The declared dependencies no subchart under charts/ provides."""
    have = vendored(chart)
    return [d for d in declared(chart) or () if d.name not in have]


Helm = Callable[[list[str], str], bool]


def prepare(real_root: Path, chart: Path, *, stage: Path, allow_remote: bool, problems,
            helm: Helm) -> Path | None:
    """The chart to template: `chart` itself when nothing is missing, else a copy under `stage`
    with its dependencies built; None (problems added) when they cannot be.

    `helm(args, what)` runs helm with `args` (`what` names the step in an
    error); it returns False when helm failed (and added the problem).
    """
    if not missing(chart):
        return chart
    staged: dict[Path, Path] = {}
    if not _stage(real_root, chart, stage=stage, staged=staged, allow_remote=allow_remote,
                  problems=problems, helm=helm, chain=()):
        return None
    return staged[chart]


def _check(real_root: Path, chart: Path, todo: list[Dependency], *, allow_remote: bool, problems) -> bool:
    """Whether every missing dependency of `chart` may be built; the reasons added when not."""
    ok = True
    rel = relative(real_root, chart)
    for dep in todo:
        if dep.local:
            continue
        if dep.remote and allow_remote:
            continue
        ok = False
        if dep.remote:
            problems.add(f"{rel}: dependency {dep.shown()} is not vendored under {rel}/charts/ and would be "
                         "fetched from the network at render time, from outside the reviewed commit; refused",
                         hint="vendor it (`helm dependency build` and commit charts/), or let the app fetch it: "
                              "helm: {allowRemoteDependencies: true}")
        elif dep.repository.startswith(("@", "alias:")):
            problems.add(f"{rel}: dependency {dep.shown()} names a helm repository by alias, and gitopsd "
                         "renders with an empty helm home where no alias exists",
                         hint="give the repository's URL in Chart.yaml, or vendor the chart under charts/")
        elif not dep.repository:
            problems.add(f"{rel}: dependency {dep.shown()} has no repository and is not under {rel}/charts/",
                         hint="commit the chart under charts/ (a directory or a `helm package` archive)")
        else:
            problems.add(f"{rel}: dependency {dep.shown()}: unsupported repository",
                         hint="use file://<path in the repository>, https:// or oci://")
    return ok


def _stage(real_root: Path, chart: Path, *, stage: Path, staged: dict[Path, Path], allow_remote: bool,
           problems, helm: Helm, chain: tuple[Path, ...]) -> bool:
    """Copy `chart` under `stage` (at its repo-relative path) and build its missing dependencies
    there, its local ones first (each staged the same way). Records chart -> copy in `staged`."""
    rel = relative(real_root, chart)
    if chart in chain:
        problems.add(f"{rel}: local chart dependencies form a cycle: "
                     + " -> ".join(relative(real_root, c) for c in (*chain, chart)))
        return False
    if chart in staged:
        return True
    copy = stage / "repo" / rel
    try:
        _copy_tree(chart, copy, seen=set())
    except OSError as exc:
        problems.add(f"{rel}: could not copy the chart to build its dependencies: {exc}")
        return False
    staged[chart] = copy
    todo = missing(chart)
    if not _check(real_root, chart, todo, allow_remote=allow_remote, problems=problems):
        return False
    fetching = any(d.remote for d in todo)
    # `helm dependency build` (below, when something must be fetched) rebuilds every dependency,
    # vendored local ones too: then each local one is staged, else only the missing ones.
    local: list[Path] = []
    for dep in (declared(chart) or ()) if fetching else todo:
        if not dep.local:
            continue
        where = dep.repository[len("file://"):]
        target = _local_dependency(real_root, chart, where, dep=dep, problems=problems)
        if target is None:
            return False
        if not _stage(real_root, target, stage=stage, staged=staged, allow_remote=allow_remote,
                      problems=problems, helm=helm, chain=(*chain, chart)):
            return False
        local.append(target)
    if fetching:
        # The copy's file:// paths are relative to the copy: each local dependency
        # was staged at its repo-relative place, so they resolve as in the repository.
        return helm(["dependency", "build", str(copy)], f"helm dependency build {rel}")
    return all(helm(["package", str(staged[target]), "--destination", str(copy / "charts")],
                    f"helm package {relative(real_root, target)} (a dependency of {rel})") for target in local)


def _local_dependency(real_root: Path, chart: Path, where: str, *, dep: Dependency, problems) -> Path | None:
    """The chart directory a file:// dependency names, inside the checkout, links checked; None (added)
    otherwise."""
    rel = relative(real_root, chart)
    if not where or where.startswith("/"):
        problems.add(f"{rel}: dependency {dep.shown()}: give a path relative to the chart, inside the repository")
        return None
    lexical = (chart / where)
    real = confine.resolve(lexical)
    if real is None or not real.is_relative_to(real_root):
        problems.add(f"{rel}: dependency {dep.shown()} resolves outside the repository",
                     hint="a chart may only depend on charts in the same commit (or on a repository URL)")
        return None
    if not (real / CHART_FILE).is_file():
        problems.add(f"{rel}: dependency {dep.shown()}: no {CHART_FILE} at {relative(real_root, real)}")
        return None
    problems.read(real)
    if not confine.check_tree(real_root, real, problems=problems):
        return None
    return real


def _copy_tree(src: Path, dst: Path, *, seen: set[Path]) -> None:
    """Copy what helm would load of `src`: links followed (the caller checked they stay in the
    checkout), each real directory once, so a link loop ends; `.git` left out."""
    real = confine.resolve(src)
    if real is None or real in seen:
        return
    seen.add(real)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.name == ".git":
            continue
        if entry.is_dir():
            _copy_tree(entry, dst / entry.name, seen=seen)
        elif entry.is_file():
            shutil.copyfile(entry, dst / entry.name)


def _chart_name(file: Path) -> str | None:
    try:
        meta = yamlload.load_one(file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else None


class _Capped(io.RawIOBase):
    """A stream that ends in an error after `limit` bytes."""

    def __init__(self, inner, limit: int) -> None:
        self.inner, self.left = inner, limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            raise OSError("archive larger than gitopsd reads to find its Chart.yaml")
        data = self.inner.read(min(len(buffer), self.left))
        self.left -= len(data)
        buffer[:len(data)] = data
        return len(data)


def _archive_chart_name(archive: Path) -> str | None:
    """The name in a packaged chart's <top>/Chart.yaml, reading only the archive's first members
    and at most _ARCHIVE_READ_BYTES of it decompressed; None when it is not found there."""
    try:
        with gzip.open(archive) as gz, tarfile.open(fileobj=_Capped(gz, _ARCHIVE_READ_BYTES), mode="r|") as tar:
            for _, member in zip(range(_ARCHIVE_MEMBERS), tar, strict=False):
                parts = member.name.split("/")
                if len(parts) == 2 and parts[1] == CHART_FILE and member.isfile():
                    if member.size > _ARCHIVE_CHART_BYTES:
                        return None
                    fh = tar.extractfile(member)
                    meta = yamlload.load_one(fh.read().decode("utf-8", "replace")) if fh else None
                    name = meta.get("name") if isinstance(meta, dict) else None
                    return name if isinstance(name, str) else None
    except (OSError, tarfile.TarError, EOFError, zlib.error, yaml.YAMLError):
        return None
    return None
