"""Confinement: every file a renderer reads stays inside the checkout.

A commit must never make the daemon read a file elsewhere on its disk:
another app's checkout under the source cache, the daemon's ServiceAccount
token, a mounted credential. The renderers would happily do it —
`resources: [../../../other-app]`, a `base` symlink out of the repository,
a chart's `templates -> ../shared` directory link holding a link out — and
the file would end up in a tenant's objects or in an error message.

So before kustomize or helm runs, we find every path it will load and
check that it resolves inside the checkout root:

- helm: the chart directory, walked the way helm loads it (following
  directory links, with loop protection), plus the values files;
- kustomize: the kustomization graph, walked in Python. Each kustomization
  file is parsed (bounded, see yamlload) and every field that names a file or
  a directory is checked: resources, bases, components, crds, configurations,
  patches of every flavour, replacements, openapi, generators, transformers,
  validators (and the builtin plugin configs they hold), the config map and
  secret generators' files and env files, the helm chart fields. Directories
  that hold kustomizations are followed (each once: cycles end there), and
  each one's tree is checked for symlinks out, since kustomize reads what is
  in them. Remote bases (URLs, `git@host:`, `github.com/...`) are refused
  unless the app opts in; `file://` clones are refused always (they read a
  repository elsewhere on the disk).

The walk also registers what it learns on the way with gitopsd.redact: every
value a secret generator (or a Secret manifest kustomize will read) carries,
so a tool's error message that echoes one is scrubbed; and it pre-scans every YAML
file kustomize will parse against the limits of yamlload, because kustomize
itself would take the daemon's memory with an alias bomb before we saw any
output. And it notes which of the files kustomize will read are
SOPS-encrypted (`encrypted`: manifests and generator inputs), for the
renderer to decrypt before kustomize runs (gitopsd.engine.decrypt).

Kustomize matches kustomization keys case-insensitively (Go's JSON decoder),
so this walk does too; two keys that differ only in case are refused rather
than guessed at. Scalars are read as written (`yes` is a path, not a
boolean), as kustomize reads them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import yaml

from gitopsd import redact
from gitopsd.engine import decrypt, yamlload
from gitopsd.errors import RenderError, yaml_error_parts

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")

OUTSIDE_HINT = ("a render may only read files of its own repository: keep paths inside it, "
                "and let symlinks point only within it")
REMOTE_HINT = ("vendor the remote base into the repository: a remote base is read at render time, "
               "from outside the reviewed commit (or opt the app in: allowRemoteBases: true, "
               "--allow-remote-bases on the command line)")
FILE_URL_HINT = "a file:// base clones a repository elsewhere on the daemon's disk; vendor it into this repository"


class Reporter(Protocol):
    def add(self, problem: str, *, hint: str | None = None) -> None: ...


# --------------------------------------------------------------------------
# Paths


def relative(real_root: Path, path: Path) -> str:
    """Repo-relative POSIX path for messages and tool arguments ("." for the root).

    `path` is lexical (it may run through symlinks inside the checkout), so
    it names the file the way the user reaches it.
    """
    return path.relative_to(real_root).as_posix() or "."


def resolve(path: Path) -> Path | None:
    """`path` with every symlink resolved; None for a symlink loop."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return None


def inside_root(real_root: Path, rel: str, *, what: str) -> Path:
    """Resolve `rel` under the (already resolved) root; refuse escapes.

    Both ways out are refused: `..` components and symlinks whose target lies
    outside the checkout. The message says which, since the fix differs.
    """
    if os.path.isabs(rel):
        raise RenderError([f"{what} {rel!r} is absolute"], hint="give paths relative to the repository root")
    lexical = os.path.normpath(Path(rel).as_posix())
    if lexical == ".." or lexical.startswith("../"):
        raise RenderError([f"{what} {rel!r} escapes the repository through '..'"],
                          hint="paths must stay inside the repository")
    target = resolve(real_root / rel)
    if target is None or not target.is_relative_to(real_root):
        raise RenderError([f"{what} {rel!r} resolves outside the repository through a symlink"],
                          hint="paths must stay inside the repository; symlinks may only point within it")
    if not target.exists():
        raise RenderError([f"{what} {rel!r} does not exist in the repository"])
    return target


def escape(real_root: Path, lexical: Path) -> str | None:
    """How the absolute, normalised `lexical` path leaves the checkout, or None.

    "through '..'" when it is outside before any symlink is followed; else
    "through the symlink <repo path>", naming the first link on the way that
    leads out, since that link is what the user has to fix.
    """
    if not lexical.is_relative_to(real_root):
        return "through '..'"
    resolved = resolve(lexical)
    if resolved is not None and resolved.is_relative_to(real_root):
        return None
    probe = real_root
    for part in lexical.relative_to(real_root).parts:
        probe = probe / part
        if probe.is_symlink():
            target = resolve(probe)
            if target is None or not target.is_relative_to(real_root):
                return f"through the symlink {relative(real_root, probe)}"
    return "through a symlink"


def link_out(real_root: Path, link: Path) -> str:
    """The problem text for a symlink that leads out of the checkout."""
    try:
        to = f" to {os.readlink(link)!r}"
    except OSError:
        to = ""
    return f"{relative(real_root, link)}: symlink{to} resolves outside the repository"


def check_tree(real_root: Path, top: Path, *, problems: Reporter, seen: set[Path] | None = None) -> bool:
    """Report every symlink under `top` that resolves outside the checkout.

    Directory links are followed, as helm follows them when it loads a chart
    (and as kustomize reads a linked base): a `templates -> ../shared` link
    inside the repository is walked, so a file link under it that leads out
    is found. `seen` holds the resolved directories already walked (loops end
    there; pass one set to share it across several trees). `.git` is skipped:
    neither tool reads it. Returns True when nothing leads out.
    """
    seen = set() if seen is None else seen
    ok = True
    stack = [top]
    while stack:
        directory = stack.pop()
        real = resolve(directory)
        if real is None or real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name, reverse=True)
        except OSError:
            continue  # unreadable: the tool reports it, with nothing read
        for entry in entries:
            if entry.name == ".git":
                continue
            path = Path(entry.path)
            if entry.is_symlink():
                target = resolve(path)
                if target is None:
                    continue  # a link loop: the tool fails on it, reading nothing
                if not target.is_relative_to(real_root):
                    problems.add(link_out(real_root, path), hint=OUTSIDE_HINT)
                    ok = False
                    continue
            if entry.is_dir():
                stack.append(path)
    return ok


# --------------------------------------------------------------------------
# Remote bases


_SCP_USER = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]*@")


def remote_kind(entry: str) -> str | None:
    """"url" when kustomize would fetch `entry` over the network, "file" for
    a file:// clone, None for a local path. Mirrors kustomize's own parsing
    (api/internal/git/repospec.go, loader.IsRemoteFile)."""
    s = entry[5:] if entry[:5].lower() == "git::" else entry
    low = s.lower()
    if low.startswith("file://"):
        return "file"
    if low.startswith(("https://", "http://", "ssh://")) or _SCP_USER.match(s):
        return "url"
    if low.startswith(("github.com/", "github.com:")):
        return "url"
    return None


# --------------------------------------------------------------------------
# The kustomization graph


def _raw_loader() -> type:
    """Bounded, and scalars as written: only null and merge keys are resolved,
    as kustomize's decoder into string fields sees them."""
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    kept = {"tag:yaml.org,2002:null", "tag:yaml.org,2002:merge"}
    resolvers = {first: [(tag, rx) for tag, rx in entries if tag in kept]
                 for first, entries in base.yaml_implicit_resolvers.items()}
    return type("RawYAMLLoader", (yamlload.Bounded, base), {"yaml_implicit_resolvers": resolvers})


_RAW_LOADER = _raw_loader()


class _CaseClash(Exception):
    def __init__(self, keys: list[str]) -> None:
        super().__init__(keys)
        self.keys = keys


def _fold(value: Any) -> Any:
    """Mapping keys casefolded at every level, as Go's JSON decoder matches
    them; raises _CaseClash for two keys that fold to one."""
    if isinstance(value, dict):
        out: dict = {}
        first: dict = {}
        for key, item in value.items():
            folded = key.casefold() if isinstance(key, str) else key
            if folded in out:
                raise _CaseClash([str(first[folded]), str(key)])
            first[folded] = key
            out[folded] = _fold(item)
        return out
    if isinstance(value, list):
        return [_fold(v) for v in value]
    return value


def _strings(value: Any) -> list[tuple[int, str]]:
    """(index, entry) for the string entries of a list field; anything else
    is kustomize's to refuse (its decoder fails on a wrong type)."""
    if isinstance(value, list):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, str)]
    return []


def _mappings(value: Any) -> list[tuple[int, dict]]:
    if isinstance(value, list):
        return [(i, v) for i, v in enumerate(value) if isinstance(v, dict)]
    return []


def _remove_quotes(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


class KustomizeWalk:
    """One walk of the kustomization graph from the app's directory.

    After `run`, `problems` holds every path that leads out (and every file
    over the YAML limits), every secret value met on the way is registered
    with gitopsd.redact, `ok` says whether kustomize may run, and
    `encrypted` maps each SOPS-encrypted file kustomize will read (resolved)
    to its sops format and what kustomize reads it as: "manifest" (a
    resource, patch, ...), "env" (a generator's env file) or "file" (a
    generator's file, whole).
    """

    def __init__(self, real_root: Path, *, allow_remote: bool, problems: Reporter,
                 budget: yamlload.Budget | None = None) -> None:
        self.root = real_root
        self.allow_remote = allow_remote
        self.problems = problems
        self.budget = budget or yamlload.Budget()
        self.ok = True
        self._visited: set[Path] = set()   # kustomization directories, resolved
        self._trees: set[Path] = set()     # directories whose symlinks are checked
        self._read: set[Path] = set()      # files pre-scanned
        self.encrypted: dict[Path, tuple[str, str]] = {}
        self._queue: list[tuple[Path, Path | None]] = []

    def run(self, top: Path) -> KustomizeWalk:
        self._queue.append((top, None))
        while self._queue:
            directory, plugin_base = self._queue.pop(0)
            self._visit(directory, plugin_base=plugin_base)
        return self

    @property
    def paths(self) -> set[Path]:
        """Every directory (resolved) kustomize may read below and every file the walk read:
        what decides the build's output (gitopsd.engine.render_cache keys renders on it)."""
        return self._visited | self._trees | self._read

    # -- reporting

    def _refuse(self, problem: str, *, hint: str | None = OUTSIDE_HINT) -> None:
        self.problems.add(problem, hint=hint)
        self.ok = False

    # -- directories

    def _visit(self, directory: Path, *, plugin_base: Path | None) -> None:
        """Check one kustomization directory and queue what it refers to.

        `plugin_base` is set for a directory named in generators or
        transformers: its resources are plugin configs, whose paths kustomize
        resolves against the kustomization that named the directory.
        """
        real = resolve(directory)
        if real is None or real in self._visited:
            return
        self._visited.add(real)
        if not check_tree(self.root, real, problems=self.problems, seen=self._trees):
            self.ok = False
        kfile = next((real / n for n in KUSTOMIZATION_FILES if (real / n).is_file()), None)
        if kfile is None:
            return  # kustomize says "unable to find one of ..." itself; nothing was read
        kfile_real = resolve(kfile)
        if kfile_real is None or not kfile_real.is_relative_to(self.root):
            return  # a link out, reported by check_tree; never read
        rel = relative(self.root, kfile)
        doc = self._load_kustomization(kfile, rel)
        if doc is not None:
            self._fields(doc, kdir=real, rel=rel, plugin_base=plugin_base)

    def _load_kustomization(self, kfile: Path, rel: str) -> dict | None:
        text = self._read_text(kfile, rel)
        if text is None:
            return None
        try:
            docs = _load_raw(text, budget=self.budget)
        except yaml.YAMLError as exc:
            # Kustomize must not run on a file we could not check: it might
            # read it differently and follow a path we never saw.
            self._refuse(_yaml_problem(rel, exc),
                         hint=yamlload.limits_hint() if isinstance(exc, yamlload.YAMLLimitError) else None)
            return None
        doc = docs[0] if docs else None
        if doc is None:
            return None  # empty: kustomize says so
        if not isinstance(doc, dict):
            self._refuse(f"{rel}: a kustomization must be a mapping, not a {type(doc).__name__}",
                         hint="see https://kubectl.docs.kubernetes.io/references/kustomize/kustomization/")
            return None
        try:
            return _fold(doc)
        except _CaseClash as clash:
            self._refuse_clash(rel, clash)
            return None

    def _refuse_clash(self, rel: str, clash: _CaseClash) -> None:
        self._refuse(f"{rel}: keys {' and '.join(repr(k) for k in clash.keys)} are one key to kustomize, "
                     "which matches keys regardless of case", hint="keep one of them")

    # -- kustomization fields

    def _fields(self, k: dict, *, kdir: Path, rel: str, plugin_base: Path | None) -> None:
        for field in ("resources", "bases", "components"):
            for i, entry in _strings(k.get(field)):
                path = self._entry(entry, kdir=kdir, rel=rel, where=f"{field}[{i}]", remote_ok=True)
                if path is None:
                    continue
                if path.is_dir():
                    self._queue.append((path, None))
                elif path.is_file():
                    docs = self._yaml_file(path)
                    if plugin_base is not None:
                        self._plugin_configs(docs, kdir=plugin_base, rel=relative(self.root, path))
        for field in ("crds", "configurations"):
            for i, entry in _strings(k.get(field)):
                self._file(entry, kdir=kdir, rel=rel, where=f"{field}[{i}]")
        for i, entry in _strings(k.get("patchesstrategicmerge")):
            self._patch(entry, kdir=kdir, rel=rel, where=f"patchesStrategicMerge[{i}]")
        for field, name in (("patches", "patches"), ("patchesjson6902", "patchesJson6902"),
                            ("replacements", "replacements")):
            for i, item in _mappings(k.get(field)):
                if isinstance(item.get("path"), str):
                    self._file(item["path"], kdir=kdir, rel=rel, where=f"{name}[{i}].path")
        openapi = k.get("openapi")
        if isinstance(openapi, dict) and isinstance(openapi.get("path"), str):
            self._file(openapi["path"], kdir=kdir, rel=rel, where="openapi.path")
        for field in ("generators", "transformers", "validators"):
            for i, entry in _strings(k.get(field)):
                self._plugin_entry(entry, kdir=kdir, rel=rel, where=f"{field}[{i}]")
        for field, name in (("configmapgenerator", "configMapGenerator"), ("secretgenerator", "secretGenerator")):
            for i, gen in _mappings(k.get(field)):
                self._generator(gen, kdir=kdir, rel=rel, where=f"{name}[{i}]", secret=field == "secretgenerator")
        for i, chart in _mappings(k.get("helmcharts")):
            self._helm_fields(chart, kdir=kdir, rel=rel, where=f"helmCharts[{i}]")
        for i, chart in _mappings(k.get("helmchartinflationgenerator")):
            self._helm_fields(chart, kdir=kdir, rel=rel, where=f"helmChartInflationGenerator[{i}]")
        if isinstance(k.get("helmglobals"), dict):
            self._helm_fields(k["helmglobals"], kdir=kdir, rel=rel, where="helmGlobals")

    def _entry(self, entry: str, *, kdir: Path, rel: str, where: str, remote_ok: bool) -> Path | None:
        """The resolved local path `entry` names, or None: refused (reported),
        or remote and allowed (kustomize fetches it; nothing local to check).

        Relative to the kustomization's resolved directory, `..` taken
        lexically first: what kustomize does (filepath.Join, then EvalSymlinks).
        """
        kind = remote_kind(entry)
        if kind == "file" and remote_ok:
            self._refuse(f"{rel}: {where} {entry!r} is a file:// repository on the daemon's disk", hint=FILE_URL_HINT)
            return None
        if kind == "url" and (remote_ok or entry.lower().startswith(("https://", "http://"))):
            if not self.allow_remote:
                self._refuse(f"{rel}: {where} {entry!r} is a remote base, and remote bases are off for this app",
                             hint=REMOTE_HINT)
            return None
        # Anything else is a local path to kustomize, however URL-like it looks.
        if os.path.isabs(entry):
            self._refuse(f"{rel}: {where} {entry!r} is an absolute path; it resolves outside the repository",
                         hint="give paths relative to the kustomization")
            return None
        lexical = Path(os.path.normpath(kdir / entry))
        how = escape(self.root, lexical)
        if how is not None:
            self._refuse(f"{rel}: {where} {entry!r} resolves outside the repository {how}")
            return None
        return resolve(lexical)

    def _file(self, entry: str, *, kdir: Path, rel: str, where: str) -> None:
        """Check a YAML file entry and pre-scan it."""
        path = self._entry(entry, kdir=kdir, rel=rel, where=where, remote_ok=False)
        if path is not None and path.is_file():
            self._yaml_file(path)

    def _patch(self, entry: str, *, kdir: Path, rel: str, where: str) -> None:
        """A strategic-merge patch is inline YAML or a file name. Kustomize
        tries the inline reading first; any one-line entry is checked as a
        path too (a false alarm needs an inline patch full of `..`)."""
        if "\n" not in entry:
            self._file(entry, kdir=kdir, rel=rel, where=where)

    def _plugin_entry(self, entry: str, *, kdir: Path, rel: str, where: str) -> None:
        """A generators/transformers/validators entry: inline plugin config(s),
        a file of them, or a kustomization directory whose output they are.
        One-line entries are checked as paths even when they parse as YAML:
        kustomize takes them as paths when they are not valid resources."""
        inline = self._inline_configs(entry)
        if inline is not None:
            self._plugin_configs(inline, kdir=kdir, rel=rel)
        if "\n" in entry:
            return
        path = self._entry(entry, kdir=kdir, rel=rel, where=where, remote_ok=True)
        if path is None:
            return
        if path.is_dir():
            self._queue.append((path, kdir))
        elif path.is_file():
            self._plugin_configs(self._yaml_file(path, raw=True), kdir=kdir, rel=relative(self.root, path))

    def _inline_configs(self, entry: str) -> list | None:
        """The documents of an inline plugin config, or None for a path."""
        if "\n" not in entry and ":" not in entry:
            return None
        try:
            docs = [d for d in _load_raw(entry, budget=self.budget) if d is not None]
        except yaml.YAMLError:
            return None
        if docs and all(isinstance(d, dict) for d in docs):
            return docs
        return None

    def _plugin_configs(self, docs: Iterable, *, kdir: Path, rel: str) -> None:
        """Paths inside builtin plugin configs (PatchTransformer's path,
        SecretGenerator's files, ...); kustomize loads them relative to the
        kustomization that names the plugin."""
        docs = [d for d in docs if isinstance(d, dict)]
        for n, doc in enumerate(docs):
            at = f"{rel}#{n}" if len(docs) > 1 else rel
            try:
                doc = _fold(doc)
            except _CaseClash as clash:
                self._refuse_clash(at, clash)
                continue
            for key, name in (("path", "path"), ("targetfilepath", "targetFilePath")):
                if isinstance(doc.get(key), str):
                    self._file(doc[key], kdir=kdir, rel=at, where=name)
            for i, entry in _strings(doc.get("paths")):
                self._patch(entry, kdir=kdir, rel=at, where=f"paths[{i}]")
            for i, item in _mappings(doc.get("replacements")):
                if isinstance(item.get("path"), str):
                    self._file(item["path"], kdir=kdir, rel=at, where=f"replacements[{i}].path")
            kind = doc.get("kind")
            if kind in ("ConfigMapGenerator", "SecretGenerator"):
                self._generator(doc, kdir=kdir, rel=at, where="", secret=kind == "SecretGenerator")
            elif kind == "HelmChartInflationGenerator":
                self._helm_fields(doc, kdir=kdir, rel=at, where="")

    def _generator(self, gen: dict, *, kdir: Path, rel: str, where: str, secret: bool) -> None:
        """configMapGenerator / secretGenerator entries: files ("[key=]path"),
        envs and env are files read raw; a secret generator's literals, file
        contents and env lines are secret values."""
        at = f"{where}." if where else ""
        sources: list[tuple[str, str, bool]] = []   # (where, path, is env file)
        for i, entry in _strings(gen.get("files")):
            sources.append((f"{at}files[{i}]", entry.split("=", 1)[1] if entry.count("=") == 1 else entry, False))
        for i, entry in _strings(gen.get("envs")):
            sources.append((f"{at}envs[{i}]", entry, True))
        if isinstance(gen.get("env"), str):
            sources.append((f"{at}env", gen["env"], True))
        for w, entry, env in sources:
            path = self._entry(entry, kdir=kdir, rel=rel, where=w, remote_ok=False)
            if path is None or not path.is_file():
                continue
            real = resolve(path) or path
            self._read.add(real)   # its content decides the output, wherever it lies
            text = self._read_text(real, relative(self.root, real))
            if text is None:
                continue
            fmt = decrypt.format_of(real)
            if decrypt.is_encrypted_text(text, fmt=fmt):
                self.encrypted[real] = (fmt, "env" if env else "file")
            elif secret:
                self._secret_text(text, env=env)
        if secret:
            for _, literal in _strings(gen.get("literals")):
                self._secret_literal(literal)

    def _helm_fields(self, chart: dict, *, kdir: Path, rel: str, where: str) -> None:
        """Kustomize's helm inflation needs --enable-helm, which gitopsd never
        passes; the paths are checked all the same, so a later opt-in cannot
        open a way out."""
        at = f"{where}." if where else ""
        for key, name in (("valuesfile", "valuesFile"), ("values", "values")):
            if isinstance(chart.get(key), str) and chart[key]:
                self._entry(chart[key], kdir=kdir, rel=rel, where=f"{at}{name}", remote_ok=False)
        for i, entry in _strings(chart.get("additionalvaluesfiles")):
            self._entry(entry, kdir=kdir, rel=rel, where=f"{at}additionalValuesFiles[{i}]", remote_ok=False)
        for key, name in (("charthome", "chartHome"), ("confighome", "configHome")):
            if isinstance(chart.get(key), str) and chart[key]:
                path = self._entry(chart[key], kdir=kdir, rel=rel, where=f"{at}{name}", remote_ok=False)
                if path is not None and path.is_dir() and key == "charthome":
                    if not check_tree(self.root, path, problems=self.problems, seen=self._trees):
                        self.ok = False

    # -- files

    def _read_text(self, path: Path, rel: str) -> str | None:
        """A file's text, charged to the budget; None (reported) when too big."""
        try:
            over = self.budget.take_bytes(path.stat().st_size)
            if over:
                self._refuse(f"{rel}: {over}", hint=yamlload.limits_hint())
                return None
            return path.read_bytes().decode("utf-8", "replace")
        except OSError as exc:  # what we cannot read we cannot check
            self._refuse(f"{rel}: cannot be read: {exc.strerror or exc}", hint=None)
            return None

    def _yaml_file(self, path: Path, *, raw: bool = False) -> list:
        """Pre-scan a YAML file kustomize will parse; its documents.

        Only the limits are reported: a syntax error is kustomize's to
        report, in its own words. Secret manifests give up their values.
        """
        real = resolve(path)
        if real is None or real in self._read:
            return []
        self._read.add(real)
        rel = relative(self.root, real)
        text = self._read_text(real, rel)
        if text is None:
            return []
        try:
            docs = _load_raw(text, budget=self.budget) if raw else yamlload.load_all(text, budget=self.budget)
        except yamlload.YAMLLimitError as exc:
            self._refuse(_yaml_problem(rel, exc), hint=yamlload.limits_hint())
            return []
        except yaml.YAMLError:
            return []
        for doc in docs:
            self._secret_manifest(doc)
        if any(decrypt.is_encrypted_document(d) for d in docs):
            self.encrypted[real] = (decrypt.format_of(real), "manifest")
        return docs

    def remember_plaintext(self, text: str, *, use: str) -> None:
        """Register the decrypted content of an encrypted file kustomize will read, as the
        walk registers a plain one: a manifest's Secret values, a generator input's
        text and lines (an encrypted input is secret, whichever generator reads it)."""
        if use == "manifest":
            try:
                docs = yamlload.load_all(text, budget=yamlload.Budget())
            except yaml.YAMLError:
                return   # kustomize reports it; nothing readable to echo
            for doc in docs:
                self._secret_manifest(doc)
        else:
            self._secret_text(text, env=use == "env")

    # -- secret values

    def _secret_literal(self, literal: str) -> None:
        """`key=value`, and the typo `key:value` kustomize echoes whole in its
        error: the entry, and what follows either separator, quoted or not."""
        self._keep(literal)
        for sep in ("=", ":"):
            _, found, value = literal.partition(sep)
            if found:
                self._keep(value)
                self._keep(_remove_quotes(value.strip()))

    def _secret_text(self, text: str, *, env: bool) -> None:
        self._keep(text)
        self._keep(text.strip())
        for line in text.splitlines():
            line = line.strip()
            if env and (not line or line.startswith("#")):
                continue
            self._keep(line)
            if env:
                self._keep(line.partition("=")[2])

    def _secret_manifest(self, doc: Any) -> None:
        redact.remember_secret(doc)

    def _keep(self, value: str) -> None:
        redact.remember((value,))


def _load_raw(text: str, *, budget: yamlload.Budget) -> list:
    return yamlload.load_all(text, budget=budget, loader=_RAW_LOADER)


def _yaml_problem(rel: str, exc: yaml.YAMLError) -> str:
    """`<file>: <limit crossed> (line L)` or `<file>: invalid YAML at ...: ...`."""
    if isinstance(exc, yamlload.YAMLLimitError):
        mark = exc.problem_mark
        return f"{rel}: {exc.problem}" + (f" (line {mark.line + 1})" if mark else "")
    where, what = yaml_error_parts(exc)
    return f"{rel}: invalid YAML at {where}: {what}" if where else f"{rel}: invalid YAML: {what}"
