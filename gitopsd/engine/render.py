"""Render: turn one directory of a checked-out commit into Kubernetes objects.

Three ways a team keeps manifests, one result: a list of `Manifest`s in the
order they were rendered, each a plain dict plus where it came from.

- plain: every *.yaml, *.yml and *.json file below the directory, walked
  depth-first in name order, multi-document YAML, `kind: List` flattened;
- kustomize: the output of `kustomize build <dir>`;
- helm: the output of `helm template <release> <chart> --namespace <ns> -f ...`.

Whatever the way, the same checks run on the whole list afterwards (identity
fields present, no server-owned fields, scope and namespace, duplicates), and
every problem found is reported at once in one `RenderError`, so a single
fix-up commit can address them all. Nothing here talks to the cluster: what
the cluster knows about scopes comes in through `is_namespaced`.

SOPS-encrypted files (gitopsd.engine.decrypt) are decrypted with the app's
keys where the render reads them: a plain file in memory, through `sops`'s
stdout; the files a kustomization reads in a private copy of its inputs that
is removed as soon as kustomize returns. A file that cannot be decrypted
(wrong key, a MAC that does not match, no keys at all) is a problem naming
the file, and an object that still carries SOPS ciphertext in the output —
however it got there — is never passed on.

`render` is two steps, so that the expensive one can be cached
(gitopsd.engine.render_cache): `build` reads the files and runs the tool —
it depends only on the files it read, which it reports as `inputs` — and
`finish` defaults namespaces by scope and checks the set, which depends on
what the cluster serves and so runs every time.
"""

from __future__ import annotations

import os
import posixpath
import re
import resource
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson
import yaml

from gitopsd import redact
from gitopsd.engine import confine, decrypt, helm_deps, yamlload
from gitopsd.engine.confine import KUSTOMIZATION_FILES, inside_root, relative
from gitopsd.errors import RenderError, yaml_error_parts
from gitopsd.objects import ObjectRef, ref_of, split_api_version

KINDS = ("auto", "plain", "kustomize", "helm")
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
CHART_FILE = "Chart.yaml"
#: Formats a directory may hold that gitopsd does not render (Argo CD renders Jsonnet; CUE and Dhall tools
#: write YAML): a plain directory of only these is an error, not an app of no objects.
UNRENDERED_SUFFIXES = {".jsonnet": "Jsonnet", ".libsonnet": "Jsonnet", ".cue": "CUE", ".dhall": "Dhall"}
#: Annotations that make an object an Argo CD or Helm hook (run at a sync phase, often with a generated name).
HOOK_ANNOTATIONS = ("argocd.argoproj.io/hook", "helm.sh/hook")

# Fields the apiserver owns. A manifest carrying them is a copy of `kubectl get
# -o yaml`: managedFields makes server-side apply reject the body outright, and
# a resourceVersion/uid pins the object to one past incarnation, so every
# later apply would conflict. Refused rather than stripped: silently fixing a
# copied object hides that its other server-set fields are in Git too.
SERVER_OWNED_METADATA = ("managedFields", "resourceVersion", "uid")

# A tool's stderr can be long (helm prints whole template traces): keep the tail.
MAX_STDERR_CHARS = 4000
# What is read of a tool's stderr at most (the tail is kept), before scrubbing.
MAX_STDERR_BYTES = 1024 * 1024
# Address space a renderer may map (RLIMIT_AS). The walk in gitopsd.engine.confine
# refuses alias bombs before kustomize runs; this is the layer below it, for
# whatever blows up inside a tool. Go maps ~1 GiB before it allocates a byte,
# so 4 GiB leaves a tool about 3 GiB of heap.
MAX_TOOL_MEMORY = 4 * 1024 * 1024 * 1024

# DNS-1123 subdomain, at most 53 characters: what helm accepts as a release name.
_RELEASE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_HELM_SOURCE = re.compile(r"^# Source: (.+?)\s*$", re.MULTILINE)
_DOCUMENT_SEPARATOR = re.compile(r"^---[ \t]*(?:#.*)?$", re.MULTILINE)


@dataclass(frozen=True)
class Manifest:
    """One object to apply, and where it came from for error messages.

    `source` is a repo-relative file path ("apps/web/deploy.yaml"), with
    "#<document index>" for multi-document files (0-based, counting empty
    documents too, so it matches the n-th `---` section a reader sees) and
    " items[<i>]" for members of a List; "kustomize build <path>" for kustomize
    output; the template path "<chart path>/templates/x.yaml" for helm output.
    """

    obj: dict
    source: str

    @property
    def ref(self) -> ObjectRef:
        return ref_of(self.obj)


@dataclass(frozen=True)
class Built:
    """What `build` read: manifests checked one by one, namespaces not yet defaulted.

    `inputs` are the repo-relative paths (directories and files, "." for the
    root) whose content decided the result: every file and directory the
    render read, by its real path, closed over symlinks (a link inside them
    adds its target), plus the links on the way to the app's path and values
    files. The same inputs with the same content build the same manifests.
    `decrypted`: something was decrypted with SOPS, so values of any kind
    may be secret (a cached copy registers them all again: render_cache).
    `problems` and `hints` are what was found so far; `finish` reports them
    together with its own.
    """

    manifests: list[Manifest]
    inputs: frozenset[str]
    problems: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()
    decrypted: bool = False


# --------------------------------------------------------------------------
# Scope of built-in kinds

_CLUSTER_SCOPED: dict[str, tuple[str, ...]] = {
    "": ("Namespace", "Node", "PersistentVolume", "ComponentStatus"),
    "rbac.authorization.k8s.io": ("ClusterRole", "ClusterRoleBinding"),
    "apiextensions.k8s.io": ("CustomResourceDefinition",),
    "apiregistration.k8s.io": ("APIService",),
    "storage.k8s.io": ("StorageClass", "CSIDriver", "CSINode", "VolumeAttachment", "VolumeAttributesClass"),
    "scheduling.k8s.io": ("PriorityClass",),
    "networking.k8s.io": ("IngressClass", "IPAddress", "ServiceCIDR"),
    "node.k8s.io": ("RuntimeClass",),
    "admissionregistration.k8s.io": (
        "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration",
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
        "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding",
    ),
    "certificates.k8s.io": ("CertificateSigningRequest", "ClusterTrustBundle"),
    "flowcontrol.apiserver.k8s.io": ("FlowSchema", "PriorityLevelConfiguration"),
    "resource.k8s.io": ("DeviceClass", "ResourceSlice"),
}
_NAMESPACED: dict[str, tuple[str, ...]] = {
    "": (
        "Pod", "Service", "ConfigMap", "Secret", "ServiceAccount", "PersistentVolumeClaim", "Endpoints",
        "LimitRange", "ResourceQuota", "ReplicationController", "PodTemplate", "Event",
    ),
    "apps": ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "ControllerRevision"),
    "batch": ("Job", "CronJob"),
    "autoscaling": ("HorizontalPodAutoscaler",),
    "policy": ("PodDisruptionBudget",),
    "rbac.authorization.k8s.io": ("Role", "RoleBinding"),
    "networking.k8s.io": ("Ingress", "NetworkPolicy"),
    "coordination.k8s.io": ("Lease",),
    "discovery.k8s.io": ("EndpointSlice",),
    "events.k8s.io": ("Event",),
    "storage.k8s.io": ("CSIStorageCapacity",),
    "resource.k8s.io": ("ResourceClaim", "ResourceClaimTemplate"),
}
_BUILTIN_SCOPES: dict[tuple[str, str], bool] = {
    **{(g, k): False for g, kinds in _CLUSTER_SCOPED.items() for k in kinds},
    **{(g, k): True for g, kinds in _NAMESPACED.items() for k in kinds},
}


def builtin_is_namespaced(group: str, kind: str) -> bool | None:
    """Scope of the well-known built-in kinds, without asking a cluster.

    Returns None for anything else (custom resources, kinds added in later
    Kubernetes versions): the caller leaves such objects as written and the
    plan stage, which has discovery, decides. The daemon passes a
    discovery-backed function instead; this table serves the offline CLI and
    tests.
    """
    return _BUILTIN_SCOPES.get((group, kind))


# --------------------------------------------------------------------------
# Entry point


def render(
    root: Path,
    path: str = ".",
    *,
    kind: str = "auto",
    namespace: str = "default",
    helm_values: Sequence[str] = (),
    helm_release: str | None = None,
    is_namespaced: Callable[[str, str], bool | None] = builtin_is_namespaced,
    timeout: float = 120.0,
    allow_remote_bases: bool = False,
    allow_remote_charts: bool = False,
    decryption: decrypt.Keys | None = None,
) -> list[Manifest]:
    """Render `path` of the checkout at `root` into validated manifests.

    `path` and every `helm_values` file are relative to `root` and must stay
    inside it, also through symlinks: a commit must not be able to make the
    daemon read files elsewhere on its disk. The same holds for every file
    kustomize or helm will load (see gitopsd.engine.confine): kustomize's remote
    bases are refused unless `allow_remote_bases`. What a render may read and
    expand to is bounded (see gitopsd.engine.yamlload). `kind` "auto" picks kustomize when
    the directory holds a kustomization file, helm when it holds Chart.yaml,
    plain otherwise. Namespaced objects without a namespace get `namespace`;
    `is_namespaced(group, kind)` decides scope (None = unknown: left as
    written), except for kinds whose CustomResourceDefinition is part of the
    rendered set, which decides for them.

    Raises RenderError carrying every problem found; returns the manifests in
    rendered order otherwise. An empty list is a valid result: whether an
    empty commit may prune everything is the plan stage's decision.

    `decryption`: the app's keys for SOPS-encrypted files (None: an
    encrypted file is a problem).
    """
    built = build(root, path, kind=kind, namespace=namespace, helm_values=helm_values, helm_release=helm_release,
                  timeout=timeout, allow_remote_bases=allow_remote_bases, allow_remote_charts=allow_remote_charts,
                  decryption=decryption)
    return finish(built, namespace=namespace, is_namespaced=is_namespaced)


def build(
    root: Path,
    path: str = ".",
    *,
    kind: str = "auto",
    namespace: str = "default",
    helm_values: Sequence[str] = (),
    helm_release: str | None = None,
    timeout: float = 120.0,
    allow_remote_bases: bool = False,
    allow_remote_charts: bool = False,
    decryption: decrypt.Keys | None = None,
) -> Built:
    """The first step of `render` (same arguments): read the files, run the tool, check each object.

    Raises RenderError for a path or kind it cannot start from; every other
    problem is carried in the result, for `finish` to report with its own.
    """
    if kind not in KINDS:
        raise RenderError([f"unknown render kind {kind!r}"], hint=f"use one of: {', '.join(KINDS)}")
    real_root = Path(root).resolve()
    target = inside_root(real_root, path, what="path")
    rel = relative(real_root, target)
    if kind == "auto":
        kind = _detect_kind(target)

    problems = _Problems()
    problems.read(target, *_links_on_the_way(real_root, path))
    if kind == "plain":
        manifests = _render_plain(real_root, target, keys=decryption, timeout=timeout, problems=problems)
    elif kind == "kustomize":
        manifests = _render_kustomize(real_root, target, rel=rel, timeout=timeout,
                                      allow_remote=allow_remote_bases, keys=decryption, problems=problems)
    else:
        manifests = _render_helm(real_root, target, rel=rel, namespace=namespace, values=helm_values,
                                 release=helm_release, timeout=timeout, allow_remote=allow_remote_charts,
                                 problems=problems)
    return Built(manifests=manifests, inputs=_closed_inputs(real_root, problems.inputs),
                 problems=tuple(problems.items), hints=tuple(problems.hints), decrypted=problems.decrypted)


def finish(built: Built, *, namespace: str = "default",
           is_namespaced: Callable[[str, str], bool | None] = builtin_is_namespaced) -> list[Manifest]:
    """The second step of `render`: namespaces defaulted by scope, the set checked.

    Changes `built.manifests` in place (a cached build is handed out as a
    copy). Raises RenderError with every problem of both steps.
    """
    problems = _Problems()
    problems.items.extend(built.problems)
    problems.hints.extend(built.hints)
    manifests = _validate(built.manifests, namespace=namespace, is_namespaced=is_namespaced, problems=problems)
    problems.raise_if_any()
    return manifests


def _links_on_the_way(real_root: Path, rel: str) -> list[Path]:
    """The symlinks `rel` runs through from the root (by their real location), the last one included.

    Their content (the link's target) decides where the render reads, so it
    is an input like the files read.
    """
    return _route(real_root, real_root, Path(rel).parts)[1]


#: Links followed on one route at most, as the kernel does (ELOOP).
_MAX_LINKS = 40


def _route(real_root: Path, start: Path, parts: Sequence[str]) -> tuple[Path | None, list[Path]]:
    """Follow `parts` from the real directory `start`: (the real path reached, every link on the way).

    Links in a link's target count too (`current -> a/b` with `a -> x`): a
    change to any of them moves what the render reads. None for a loop or a
    route out of the checkout (confinement reports those).
    """
    links: list[Path] = []
    todo = list(parts)
    here = start
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            here = here.parent
            continue
        step = here / part
        if not step.is_symlink():
            here = step
            continue
        links.append(step)
        target = os.readlink(step)
        if os.path.isabs(target) or len(links) > _MAX_LINKS:
            return None, links
        todo[:0] = Path(target).parts
    return (here if here.is_relative_to(real_root) else None), links


def _closed_inputs(real_root: Path, read: set[Path]) -> frozenset[str]:
    """`read` reduced to its outermost paths, closed over the symlinks below them.

    A directory's content covers everything below it by its real path; a
    symlink below it is covered only as a name, so what it leads to (inside
    the checkout: confinement refused any other) is added — its target and
    the links on the way there — and scanned in turn.
    """
    kept: set[Path] = set()
    scanned: set[Path] = set()
    todo = {p for p in read if p.is_relative_to(real_root)}
    while todo:
        kept = _outermost(kept | todo)
        todo = set()
        for top in sorted(kept - scanned):
            scanned.add(top)
            for link in _symlinks_below(top):
                target, links = _route(real_root, link.parent, [link.name])
                found = [p for p in (*links, target) if p is not None and p.is_relative_to(real_root)]
                todo.update(p for p in found if (p.is_symlink() or p.exists())
                            and not any(p == k or p.is_relative_to(k) for k in kept))
    return frozenset(relative(real_root, p) for p in kept)


def _outermost(paths: set[Path]) -> set[Path]:
    out: set[Path] = set()
    for p in sorted(paths, key=lambda p: len(p.parts)):
        if not any(p == k or p.is_relative_to(k) for k in out):
            out.add(p)
    return out


def _symlinks_below(top: Path) -> list[Path]:
    if top.is_symlink():
        return [top]
    if not top.is_dir():
        return []
    found = []
    for directory, dirs, files in os.walk(top):   # links to directories are listed, not followed
        found.extend(Path(directory, name) for name in (*dirs, *files) if os.path.islink(Path(directory, name)))
    return found


#: The tools a render runs, each found by `find_tool`.
TOOLS = ("kustomize", "helm", "sops")


def find_tool(name: str) -> Path:
    """Locate the `kustomize`, `helm` or `sops` binary to run.

    Searched in order: $GITOPSD_KUSTOMIZE / $GITOPSD_HELM / $GITOPSD_SOPS (an explicit choice:
    when set but wrong it is an error, not a reason to fall back to some other
    binary), the PATH, $GITOPSD_CACHE/bin, ~/.cache/gitopsd/bin (where
    `hack/cluster build` puts the pinned versions). The error names every
    place searched.
    """
    if name not in TOOLS:
        raise ValueError(f"find_tool knows {', '.join(TOOLS)}, not {name!r}")
    env_var = f"GITOPSD_{name.upper()}"
    explicit = os.environ.get(env_var)
    if explicit:
        candidate = Path(explicit).expanduser()
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
        raise RenderError([f"${env_var} names {candidate}, which is not an executable file"],
                          hint=f"point ${env_var} at a {name} binary, or unset it to search PATH and the cache")
    searched = [f"${env_var} (unset)", "PATH"]
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    candidates = []
    cache = os.environ.get("GITOPSD_CACHE")
    if cache:
        candidates.append(Path(cache) / "bin" / name)
    candidates.append(Path.home() / ".cache" / "gitopsd" / "bin" / name)
    for candidate in candidates:
        searched.append(str(candidate))
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RenderError([f"{name} not found; searched {', '.join(searched)}"],
                      hint=f"install {name}, set ${env_var}, or run `hack/cluster build --only {name}`")


# --------------------------------------------------------------------------
# Problems collector


class _Problems:
    """Every problem found in one render, with the hints that help fix them.

    Stages keep going after a problem so the user sees all of them at once;
    hints are deduplicated because ten files missing a name need one hint.
    """

    def __init__(self) -> None:
        self.items: list[str] = []
        self.hints: list[str] = []
        self.budget = yamlload.Budget()  # what the render may still read and expand to
        self.inputs: set[Path] = set()    # what the render read (see Built.inputs)
        self.decrypted = False             # sops decrypted something (see Built.decrypted)

    def read(self, *paths: Path) -> None:
        """Note paths the render read: real ones (resolved here) and the links on the way to them."""
        for path in paths:
            self.inputs.add(path if path.is_symlink() else (confine.resolve(path) or path))

    def add(self, problem: str, *, hint: str | None = None) -> None:
        self.items.append(problem)
        if hint and hint not in self.hints:
            self.hints.append(hint)

    def raise_if_any(self) -> None:
        """Raise the problems found, scrubbed of every secret value known (gitopsd.redact):
        the renderer registers each one as it meets it, so a tool's error that
        quotes a secret generator's literal is clean before anyone sees it."""
        if self.items:
            raise RenderError([redact.scrub(p) for p in self.items],
                              hint=redact.scrub("; ".join(self.hints)) or None)


# --------------------------------------------------------------------------
# Paths


def _detect_kind(target: Path) -> str:
    if target.is_dir():
        if any((target / f).is_file() for f in KUSTOMIZATION_FILES):
            return "kustomize"
        if (target / CHART_FILE).is_file():
            return "helm"
    return "plain"


# --------------------------------------------------------------------------
# Parsing


def _load_yaml(text: str, *, source: str, problems: _Problems, tool_output: bool = False) -> list | None:
    """All documents of a YAML stream (None for empty ones), or None when
    malformed or over the render's limits (see gitopsd.engine.yamlload). The line
    where a limit tripped is named for files, not for a tool's output: a
    line of kustomize's or helm's output is no line the user can open.

    A malformed stream contributes no documents at all: half a file would make
    the later checks report misleading follow-up problems.
    """
    try:
        return yamlload.DOCUMENTS.load_all(text, budget=problems.budget)
    except yamlload.YAMLLimitError as exc:
        _over_limit(source, exc, problems=problems, line=not tool_output)
    except yaml.YAMLError as exc:
        where, what = yaml_error_parts(exc)
        problems.add(f"{source}: invalid YAML at {where}: {what}" if where else f"{source}: invalid YAML: {what}")
    return None


def _over_limit(source: str, exc: yamlload.YAMLLimitError, *, problems: _Problems, line: bool = True) -> None:
    mark = exc.problem_mark if line else None
    problems.add(f"{source}: {exc.problem}" + (f" (line {mark.line + 1})" if mark else ""),
                 hint=yamlload.limits_hint())


def _is_list(doc: dict) -> bool:
    # kubectl flattens any *List kind with an `items` array (v1 List, and the
    # typed lists `kubectl get -o yaml` writes, e.g. ConfigMapList).
    kind = doc.get("kind")
    return isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list)


def _manifests_from_documents(docs: Iterable[tuple[object, str]], *, problems: _Problems) -> list[Manifest]:
    """(document, source) pairs -> manifests: skip empty documents, flatten Lists.

    Each document is checked on its own here (a mapping with identity fields,
    no server-owned ones), so problems are listed in file order; checks that
    need the whole set (scope, duplicates) are `_validate`'s. Documents with a
    problem are left out.
    """
    out: list[Manifest] = []
    for doc, source in docs:
        if doc is None:  # empty or comment-only document
            continue
        if not isinstance(doc, dict):
            problems.add(f"{source}: document is a {_type_name(doc)}, not a Kubernetes object",
                         hint="every document must be a mapping with apiVersion, kind and metadata.name")
        elif _is_list(doc):
            items = [(item, f"{source} items[{i}]") for i, item in enumerate(doc["items"])]
            out.extend(_manifests_from_documents(items, problems=problems))
        elif _still_encrypted(doc, source=source, problems=problems):
            continue
        else:
            redact.remember_secret(doc)  # first: a problem found below may quote a value
            m = Manifest(obj=doc, source=source)
            if _check_identity(m, problems=problems):
                _normalise(m.obj)
                out.append(m)
    return out


_NO_KEYS_HINT = ("give the app its age key: decryption: {provider: sops, keysFrom: {secretRef: {name: sops-age}}} "
                 "(a Secret with an entry ending in .agekey); gitopsd diff/sync: --sops-age-keys FILE")


def _still_encrypted(doc: dict, *, source: str, problems: _Problems) -> bool:
    """True (a problem added) for a document that carries SOPS metadata or ciphertext: it was
    not decrypted, and ciphertext must never reach the cluster."""
    if decrypt.is_encrypted_document(doc):
        problems.add(f"{source}: a SOPS-encrypted document was not decrypted", hint=_NO_KEYS_HINT)
        return True
    at = decrypt.ciphertext_at(doc)
    if at is not None:
        what = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}" if isinstance(
            doc.get("metadata"), dict) else "an object"
        problems.add(f"{source}: {what} holds SOPS ciphertext (ENC[...]) at {at}: an encrypted file it was built "
                     "from was not decrypted", hint=_NO_KEYS_HINT)
        return True
    return False


def _type_name(value: object) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(
        type(value), type(value).__name__)


def _numbered(docs: list, source: str) -> list[tuple[object, str]]:
    """Pair documents with their source; "#<index>" only when there are several."""
    if len(docs) == 1:
        return [(docs[0], source)]
    return [(doc, f"{source}#{i}") for i, doc in enumerate(docs)]


# --------------------------------------------------------------------------
# plain


def _render_plain(real_root: Path, target: Path, *, keys: decrypt.Keys | None, timeout: float,
                  problems: _Problems) -> list[Manifest]:
    unrendered: list[Path] = []
    files = [target] if target.is_file() else _manifest_files(real_root, target, problems=problems,
                                                              unrendered=unrendered)
    if not files and unrendered:
        # Rendered as plain, such a directory is no objects at all: say why rather than deploy nothing.
        first = unrendered[0]
        language = UNRENDERED_SUFFIXES[first.suffix.lower()]
        more = f" and {len(unrendered) - 1} more" if len(unrendered) > 1 else ""
        problems.add(f"{relative(real_root, target)}: no manifests, only {language} "
                     f"({relative(real_root, first)}{more}), which gitopsd does not render",
                     hint="render it to YAML in CI and commit the output, or use a kustomization or a Helm chart")
    manifests: list[Manifest] = []
    for file in files:
        source = relative(real_root, file) if file.is_relative_to(real_root) else str(file)
        data = _read_bounded(file, source=source, problems=problems)
        if data is None:
            continue
        if file.suffix.lower() == ".json":
            # JSON holds one document; orjson is several times faster than YAML.
            try:
                docs = [orjson.loads(data)]
                yamlload.measure_value(docs[0], budget=problems.budget)
            except orjson.JSONDecodeError as exc:
                problems.add(f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")
                continue
            except yamlload.YAMLLimitError as exc:
                _over_limit(source, exc, problems=problems)
                continue
        else:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError as exc:
                problems.add(f"{source}: not UTF-8 text (byte {exc.start})")
                continue
            docs = _load_yaml(text, source=source, problems=problems)
            if docs is None:
                continue
        if any(decrypt.is_encrypted_document(d) for d in docs):
            docs = _decrypted_documents(file, source=source, keys=keys, timeout=timeout, problems=problems)
            if docs is None:
                continue
        manifests.extend(_manifests_from_documents(_numbered(docs, source), problems=problems))
    return manifests


def _decrypted_documents(file: Path, *, source: str, keys: decrypt.Keys | None, timeout: float,
                         problems: _Problems) -> list | None:
    """The documents of a SOPS-encrypted manifest file, decrypted in memory; None (a problem
    added) when there are no keys or sops cannot decrypt it. What was encrypted under a
    document's data and stringData is registered as secret, whatever the kind."""
    fmt = "json" if file.suffix.lower() == ".json" else "yaml"
    if keys is None:
        problems.add(f"{source}: is encrypted with SOPS, and the app has no decryption keys", hint=_NO_KEYS_HINT)
        return None
    plain = _sops_decrypt(file, source=source, fmt=fmt, keys=keys, timeout=timeout, problems=problems)
    if plain is None:
        return None
    text = plain.decode("utf-8", "replace")
    if fmt == "json":
        try:
            docs = [orjson.loads(text)]
        except orjson.JSONDecodeError as exc:
            problems.add(f"{source}: decrypted, but not valid JSON (line {exc.lineno}): {exc.msg}")
            return None
    else:
        docs = _load_yaml(text, source=source, problems=problems)
    for doc in docs or ():
        if isinstance(doc, dict):
            redact.remember_secret({**doc, "kind": "Secret"})
    return docs


def _sops_decrypt(file: Path, *, source: str, fmt: str, keys: decrypt.Keys, timeout: float,
                  problems: _Problems) -> bytes | None:
    """`sops --decrypt` of one file (read where it is, never in place): its plaintext, or None
    with a problem naming `source` and why. The keys reach sops only through its environment."""
    def failed(code: int, stderr: str) -> tuple[str, str]:
        return decrypt.failure(source, exit_code=code, stderr=stderr)

    with tempfile.TemporaryDirectory(prefix="gitopsd-sops-home-") as home:
        plain = _run_tool("sops", decrypt.sops_args(file, fmt=fmt), cwd=Path(home), home=home, timeout=timeout,
                          what=f"sops --decrypt {source}", problems=problems, extra_env=decrypt.environment(keys),
                          decode=False, on_failure=failed)
    if plain is not None:
        problems.decrypted = True
    return plain


def _read_bounded(file: Path, *, source: str, problems: _Problems) -> bytes | None:
    """A file's bytes, or None (a problem added) when unreadable or over the
    size limits; the size is checked before anything is read."""
    try:
        with open(file, "rb") as handle:   # one open, sized by fstat: this runs for every file of an app
            over = problems.budget.take_bytes(os.fstat(handle.fileno()).st_size)
            if over:
                problems.add(f"{source}: {over}", hint=yamlload.limits_hint())
                return None
            return handle.read()
    except OSError as exc:
        problems.add(f"{source}: cannot be read: {exc.strerror or exc}")
        return None


def _manifest_files(real_root: Path, top: Path, *, problems: _Problems,
                    unrendered: list[Path] | None = None) -> list[Path]:
    """Manifest files under `top`, depth-first in name order (deterministic); the files of a
    format gitopsd does not render (UNRENDERED_SUFFIXES) go to `unrendered` when given.

    Hidden entries (.git, .github, .pre-commit-config.yaml) are not manifests
    and are skipped. Symlinks are followed only while they stay inside the
    checkout. A directory holding a kustomization or a Chart.yaml is reported
    once and not descended into: its files are patches and templates, not
    objects, and listing each of their problems would bury the real one.
    """
    files: list[Path] = []
    seen: set[Path] = set()

    def walk(directory: Path) -> None:
        real = confine.resolve(directory)
        if real is None or real in seen:  # a symlink loop, or two links to one directory
            return
        seen.add(real)
        for marker in KUSTOMIZATION_FILES:
            if (directory / marker).is_file():
                problems.add(f"{relative(real_root, directory / marker)}: looks like a kustomize overlay "
                             "in a plain directory", hint="use render: kustomize or auto for a kustomization")
                return
        if (directory / CHART_FILE).is_file():
            problems.add(f"{relative(real_root, directory / CHART_FILE)}: looks like a Helm chart in a plain "
                         "directory", hint="use render: helm or auto for a chart")
            return
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            problems.add(f"{relative(real_root, directory)}: cannot be listed: {exc.strerror or exc}")
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            manifest_like = entry.name.lower().endswith(MANIFEST_SUFFIXES)
            if entry.is_symlink():
                resolved = confine.resolve(path)
                if resolved is not None and not resolved.is_relative_to(real_root):
                    problems.add(confine.link_out(real_root, path), hint=confine.OUTSIDE_HINT)
                    continue
                if resolved is None or not resolved.exists():
                    if manifest_like:
                        problems.add(f"{relative(real_root, path)}: broken symlink")
                    continue
            if entry.is_dir():      # the directory entry's own type: no stat but for a link
                walk(path)
            elif manifest_like and entry.is_file():
                files.append(path)
            elif unrendered is not None and path.suffix.lower() in UNRENDERED_SUFFIXES:
                unrendered.append(path)

    walk(top)
    return files


# --------------------------------------------------------------------------
# kustomize and helm


def _run_tool(tool: str, args: list[str], *, cwd: Path, home: str, timeout: float, what: str,
              problems: _Problems, extra_env: dict[str, str] | None = None, decode: bool = True,
              on_failure: Callable[[int, str], tuple[str, str | None]] | None = None) -> str | bytes | None:
    """Run a renderer without a shell; its stdout, or None with a problem added.

    The tool runs in the checkout root with repo-relative arguments, so its
    own error messages name files the way the user knows them; in its own
    session (so a timeout stops its children too, a git clone included);
    with a minimal environment (see `_tool_env`); and its output is read
    only up to the render's byte limit. Its stderr is scrubbed of every
    secret value known before it becomes a problem: kustomize echoes a
    malformed secret literal whole.

    `extra_env` is added to that environment (sops' keys); `decode=False`
    returns stdout as bytes; `on_failure(exit code, scrubbed stderr)` words
    the problem (and hint) of a failed run instead of the generic one.
    """
    try:
        cmd = [str(find_tool(tool)), *args]
    except RenderError as exc:
        for p in exc.problems:
            problems.add(p, hint=exc.hint)
        return None
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**_tool_env(home), **(extra_env or {})}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        problems.add(f"{what}: could not run {cmd[0]}: {exc.strerror or exc}")
        return None
    _cap_memory(proc.pid)
    with proc:
        out, err, stopped = _collect(proc, deadline=time.monotonic() + timeout)
    if stopped == "timeout":
        problems.add(f"{what}: timed out after {timeout:g}s", hint="a slow remote base or chart dependency?")
        return None
    if stopped == "output":
        problems.add(f"{what}: wrote more than {yamlload.MAX_RENDER_BYTES // (1024 * 1024)} MiB of manifests; "
                     "stopped", hint=yamlload.limits_hint())
        return None
    if proc.returncode != 0 and _GO_OUT_OF_MEMORY.search(err):
        problems.add(f"{what}: ran out of the {MAX_TOOL_MEMORY / 2**30:g} GiB of memory a renderer may use",
                     hint="an alias bomb, or a generator or chart that expands without end?")
        return None
    if proc.returncode != 0:
        stderr = _tail(redact.scrub(err.decode("utf-8", "replace")).strip(), MAX_STDERR_CHARS)
        if on_failure is not None:
            problem, hint = on_failure(proc.returncode, stderr)
            problems.add(problem, hint=hint)
        else:
            problems.add(f"{what}: failed (exit {proc.returncode}): {stderr or '(no output on stderr)'}")
        return None
    return out.decode("utf-8", "replace") if decode else bytes(out)


_GO_OUT_OF_MEMORY = re.compile(rb"^fatal error: (out of memory|failed to reserve)", re.MULTILINE)


def _cap_memory(pid: int) -> None:
    """Limit the tool's address space, from outside: `preexec_fn` is not safe
    in the threaded daemon, and a limit set a moment after exec applies to
    every allocation the tool's work makes. Best effort where the platform
    has no prlimit."""
    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_AS)
        cap = MAX_TOOL_MEMORY if hard == resource.RLIM_INFINITY else min(MAX_TOOL_MEMORY, hard)
        resource.prlimit(pid, resource.RLIMIT_AS, (cap, cap))
    except (AttributeError, OSError, ValueError):
        pass


def _tool_env(home: str) -> dict[str, str]:
    """What a renderer gets of the environment: the PATH (kustomize runs git
    for remote bases), proxy and CA settings, and a private, empty home.

    Nothing else: no credentials, tokens, SSH agent or kubeconfig of the
    daemon that a tenant's chart or kustomization could make the tool use.
    helm keeps repositories, caches and plugins under its homes, git its
    config; with a fresh home per run one app's settings never reach another's
    render, and the daemon's home is never written.
    """
    keep = ("PATH", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
            "SSL_CERT_FILE", "SSL_CERT_DIR", "LANG", "LC_ALL")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update({
        "HOME": home, "TMPDIR": home,
        "XDG_CONFIG_HOME": f"{home}/config", "XDG_CACHE_HOME": f"{home}/cache", "XDG_DATA_HOME": f"{home}/data",
        "HELM_CACHE_HOME": f"{home}/cache", "HELM_CONFIG_HOME": f"{home}/config", "HELM_DATA_HOME": f"{home}/data",
        "KUSTOMIZE_PLUGIN_HOME": f"{home}/plugins",
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0",
        # Never a local clone (file://, or a path git takes as one), nor a
        # transport that runs a command.
        "GIT_ALLOW_PROTOCOL": "https:http:ssh:git",
    })
    return env


def _collect(proc: subprocess.Popen, *, deadline: float) -> tuple[bytes, bytes, str | None]:
    """(stdout, stderr tail, why stopped) of a running tool: "timeout" or
    "output" (more than the render may read) when it had to be killed."""
    out, err = bytearray(), bytearray()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return _kill(proc, out, err, "timeout")
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                if key.data is out and len(out) > yamlload.MAX_RENDER_BYTES:
                    return _kill(proc, out, err, "output")
                if key.data is err and len(err) > 2 * MAX_STDERR_BYTES:
                    # Cut at a line start: a secret split by the cut would
                    # escape the scrubber by its tail.
                    cut = err.find(b"\n", len(err) - MAX_STDERR_BYTES)
                    del err[:cut + 1 if cut >= 0 else len(err) - MAX_STDERR_BYTES]
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        return _kill(proc, out, err, "timeout")
    return bytes(out), bytes(err), None


def _kill(proc: subprocess.Popen, out: bytearray, err: bytearray, why: str) -> tuple[bytes, bytes, str]:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the tool and whatever it started
    except ProcessLookupError:
        pass
    proc.wait()
    return bytes(out), bytes(err), why


def _tail(text: str, limit: int) -> str:
    """The last `limit` characters of `text`, from a line start when it is cut."""
    if len(text) <= limit:
        return text
    cut = text.find("\n", len(text) - limit)
    return "…" + (text[cut + 1:] if cut >= 0 else text[-limit:])


def _render_kustomize(real_root: Path, target: Path, *, rel: str, timeout: float, allow_remote: bool,
                      keys: decrypt.Keys | None, problems: _Problems) -> list[Manifest]:
    source = f"kustomize build {rel}"
    if not target.is_dir() or not any((target / f).is_file() for f in KUSTOMIZATION_FILES):
        problems.add(f"{rel}: no {' / '.join(KUSTOMIZATION_FILES)} here, so nothing for kustomize to build",
                     hint="use render: plain or auto for a directory of plain manifests")
        return []
    walk = confine.KustomizeWalk(real_root, allow_remote=allow_remote, problems=problems).run(target)
    problems.read(*walk.paths)
    if not walk.ok:
        return []
    if walk.encrypted:
        out = _kustomize_decrypted(real_root, walk, rel=rel, keys=keys, timeout=timeout, problems=problems)
    else:
        with tempfile.TemporaryDirectory(prefix="gitopsd-kustomize-") as home:
            out = _run_tool("kustomize", ["build", rel], cwd=real_root, home=home, timeout=timeout,
                            what=source, problems=problems)
    if out is None:
        return []
    docs = _load_yaml(out, source=source, problems=problems, tool_output=True)
    # Every object of one build shares a source: kustomize merged the files,
    # so which file an object came from is no longer known.
    return _manifests_from_documents(((d, source) for d in docs or ()), problems=problems)


def _kustomize_decrypted(real_root: Path, walk: confine.KustomizeWalk, *, rel: str, keys: decrypt.Keys | None,
                         timeout: float, problems: _Problems) -> str | None:
    """`kustomize build` of a kustomization that reads SOPS-encrypted files: in a private copy of
    the build's inputs where each encrypted file is its plaintext, removed when kustomize returns.

    Every encrypted file is decrypted (and its values registered with
    gitopsd.redact) before kustomize runs, so a failure names each file that
    failed and kustomize never sees ciphertext.
    """
    if keys is None:
        for real in sorted(walk.encrypted):
            problems.add(f"{relative(real_root, real)}: is encrypted with SOPS, and the app has no decryption keys",
                         hint=_NO_KEYS_HINT)
        return None
    plaintexts: dict[Path, bytes] = {}
    for real, (fmt, use) in sorted(walk.encrypted.items()):
        plain = _sops_decrypt(real, source=relative(real_root, real), fmt=fmt, keys=keys, timeout=timeout,
                              problems=problems)
        if plain is not None:
            walk.remember_plaintext(plain.decode("utf-8", "replace"), use=use)
            plaintexts[real] = plain
    if len(plaintexts) < len(walk.encrypted):
        return None
    with decrypt.workspace() as space, tempfile.TemporaryDirectory(prefix="gitopsd-kustomize-") as home:
        try:
            decrypt.copy_inputs(real_root, _closed_inputs(real_root, problems.inputs), space)
            for real, plain in plaintexts.items():
                decrypt.write_private(space / relative(real_root, real), plain)
        except OSError as exc:   # a full /dev/shm (64 MiB in a pod by default), say
            problems.add(f"kustomize build {rel}: could not prepare the private copy to decrypt into "
                         f"({space.parent}): {exc.strerror or exc}",
                         hint="give the pod a larger /dev/shm (an emptyDir with medium: Memory) or a writable /tmp")
            return None
        before = len(problems.items)
        out = _run_tool("kustomize", ["build", rel], cwd=space, home=home, timeout=timeout,
                        what=f"kustomize build {rel}", problems=problems)
        # kustomize may name a file by its absolute path: the workspace's means nothing to the user.
        problems.items[before:] = [p.replace(f"{space}/", "") for p in problems.items[before:]]
    return out


def _render_helm(real_root: Path, target: Path, *, rel: str, namespace: str, values: Sequence[str],
                 release: str | None, timeout: float, allow_remote: bool, problems: _Problems) -> list[Manifest]:
    what = f"helm template {rel}"
    if not (target / CHART_FILE).is_file():
        problems.add(f"{rel}: no {CHART_FILE} here, so there is no chart to template",
                     hint="use render: plain or auto for a directory of plain manifests")
        return []
    value_args: list[str] = []
    for v in values:
        try:
            file = inside_root(real_root, v, what="helm values file")
            problems.read(file, *_links_on_the_way(real_root, v))
            value_args += ["-f", relative(real_root, file)]
        except RenderError as exc:  # collect them all, not just the first
            for p in exc.problems:
                problems.add(p, hint=exc.hint)
    if len(value_args) != 2 * len(values):
        return []
    # helm loads every file of the chart directory, following directory
    # links (templates, files for `.Files.Get`, subcharts under charts/): a
    # link out would render the daemon's own files into a tenant's objects.
    if not confine.check_tree(real_root, target, problems=problems):
        return []
    release = release or _default_release(target)
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory(prefix="gitopsd-helm-") as home:
        def helm(args: list[str], step: str) -> bool:
            return _run_tool("helm", args, cwd=real_root, home=home, timeout=max(deadline - time.monotonic(), 1),
                             what=step, problems=problems) is not None

        chart = helm_deps.prepare(real_root, target, stage=Path(home), allow_remote=allow_remote,
                                  problems=problems, helm=helm)
        if chart is None:
            return []
        args = ["template", release, rel if chart == target else str(chart), "--namespace", namespace,
                # CRDs in crds/ are left out by default, yet the chart's custom
                # resources need them; tests are pods meant for `helm test`, not
                # objects to keep running.
                "--include-crds", "--skip-tests", *value_args]
        out = _run_tool("helm", args, cwd=real_root, home=home, timeout=max(deadline - time.monotonic(), 1),
                        what=what, problems=problems)
    if out is None:
        return []
    return _manifests_from_documents(_helm_documents(out, rel=rel, fallback=what, problems=problems),
                                     problems=problems)


def _default_release(chart: Path) -> str:
    """The chart's own name when it is a valid release name, else helm's default.

    Not the directory name: for a chart at the repository root that would be
    the checkout directory, which changes with every commit.
    """
    try:
        meta = yamlload.load_one((chart / CHART_FILE).read_text())
        name = meta.get("name") if isinstance(meta, dict) else None
    except (OSError, yaml.YAMLError):
        name = None
    if isinstance(name, str) and len(name) <= 53 and _RELEASE_NAME.match(name):
        return name
    return "release-name"


def _helm_documents(out: str, *, rel: str, fallback: str, problems: _Problems) -> list[tuple[object, str]]:
    """Split `helm template` output into (document, source template) pairs.

    helm writes each object as "---\\n# Source: <chart>/templates/x.yaml\\n...".
    The leading chart name is replaced by the chart's repo-relative path so
    the source is a file the user can open. A template that yields several
    objects gets "#<n>" over the objects helm emitted (empty ones are dropped
    by helm, so n may differ from the template's own document count).
    """
    chunks: list[tuple[str, str]] = []
    for chunk in _DOCUMENT_SEPARATOR.split(out):
        if not chunk.strip():
            continue
        m = _HELM_SOURCE.search(chunk)
        if m:
            _, _, inside = m.group(1).partition("/")
            source = posixpath.normpath(posixpath.join(rel, inside))
        else:
            source = fallback
        chunks.append((chunk, source))
    counts: dict[str, int] = {}
    for _, source in chunks:
        counts[source] = counts.get(source, 0) + 1
    seen: dict[str, int] = {}
    pairs: list[tuple[object, str]] = []
    for chunk, source in chunks:
        if counts[source] > 1:
            n = seen.get(source, 0)
            seen[source] = n + 1
            source = f"{source}#{n}"
        for doc in _load_yaml(chunk, source=source, problems=problems, tool_output=True) or ():
            pairs.append((doc, source))
    return pairs


# --------------------------------------------------------------------------
# Validation and normalisation (all render kinds)


def _validate(manifests: list[Manifest], *, namespace: str, is_namespaced: Callable[[str, str], bool | None],
              problems: _Problems) -> list[Manifest]:
    """Checks of the full set, after each document passed its own: namespaces
    defaulted by scope (in place: the objects are fresh from parsing), then
    duplicates, which only exist once namespaces are defaulted."""
    scope_of = _scope_lookup(manifests, is_namespaced=is_namespaced)
    for m in manifests:
        _default_namespace(m, namespace=namespace, scope_of=scope_of, problems=problems)
    _check_duplicates(manifests, problems=problems)
    return manifests


def _check_identity(m: Manifest, *, problems: _Problems) -> bool:
    """apiVersion, kind and metadata.name present and strings; a Secret's body well-formed;
    no server-owned fields."""
    obj = m.obj
    missing: list[str] = []
    wrong: list[str] = []
    for field in ("apiVersion", "kind"):
        if field not in obj or obj[field] in (None, ""):
            missing.append(field)
        elif not isinstance(obj[field], str):
            wrong.append(f"{field} must be a string, not {_type_name(obj[field])}")
    meta = obj.get("metadata")
    if meta is None:
        missing.append("metadata.name")
    elif not isinstance(meta, dict):
        wrong.append(f"metadata must be a mapping, not {_type_name(meta)}")
    else:
        name = meta.get("name")
        if name in (None, ""):
            missing.append("metadata.name")
        elif not isinstance(name, str):
            wrong.append(f"metadata.name must be a string, not {_type_name(name)} ({name!r})")
        ns = meta.get("namespace")
        if ns is not None and not isinstance(ns, str):
            wrong.append(f"metadata.namespace must be a string, not {_type_name(ns)}")
    if missing or wrong:
        hint = "every document must be a Kubernetes object with apiVersion, kind and metadata.name"
        if "metadata.name" in missing and isinstance(meta, dict) and meta.get("generateName"):
            hint = "metadata.generateName is not supported: a generated name cannot be tracked; set metadata.name"
            annotations = meta.get("annotations") if isinstance(meta.get("annotations"), dict) else {}
            hook = next(((k, v) for k in HOOK_ANNOTATIONS if (v := annotations.get(k))), None)
            if hook is not None:
                hint = (f"a sync hook ({hook[0]}: {hook[1]}) with a generated name: gitopsd runs no hooks. Give it "
                        "a metadata.name to apply it as a plain object of the app, or keep it out of the app's path")
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + wrong
        problems.add(f"{m.source}: {'; '.join(parts)}", hint=hint)
        return False
    if not _check_secret_body(m, problems=problems):
        return False
    server_owned = [f"metadata.{f}" for f in SERVER_OWNED_METADATA if f in meta]
    if server_owned:
        problems.add(f"{m.source}: {obj['kind']}/{meta['name']} carries {', '.join(server_owned)}, set by the "
                     "apiserver (a copy of `kubectl get -o yaml`?)",
                     hint="remove managedFields, resourceVersion and uid from manifests: server-side apply "
                          "rejects managedFields, and a stale resourceVersion makes every apply conflict")
        return False
    return True


def _check_secret_body(m: Manifest, *, problems: _Problems) -> bool:
    """A v1 Secret's `data` and `stringData`: mappings of valid keys to strings, `data` base64.

    Code downstream, and the apiserver's errors (which echo what they cannot
    parse), assume that shape, so anything else — a list, a block of text, a
    nested mapping, an unquoted number, a key Kubernetes would refuse, plain
    text under `data` — is refused here, before any request is made. Messages
    name the section and the key, never a value; an invalid key is not even
    named, as it is often a value that lost its `=` (`password hunter2` in a
    secret generator's env file). Every problem of the object is reported.
    """
    obj = m.obj
    if not redact.is_secret_kind(obj):
        return True
    where = f"{m.source}: Secret/{obj['metadata']['name']}"
    ok = True
    for section in redact.SECTIONS:
        values = obj.get(section) or {}
        if not isinstance(values, dict):
            problems.add(f"{where}: {section} must be a mapping of keys to strings, not a {_type_name(values)}",
                         hint=f"write {section} as `key: value` lines, not as a list or one block of text")
            ok = False
            continue
        malformed = sum(1 for k in values if not redact.SECRET_KEY.fullmatch(str(k)))
        if malformed:
            problems.add(f"{where}: {section} has {malformed} key(s) that are not valid Secret keys (letters, "
                         "digits, '-', '_' and '.' only; not shown, as such a key may hold a value)",
                         hint="a `key value` line in a secret generator's env file? write `key=value`")
            ok = False
        named = {str(k): v for k, v in values.items() if redact.SECRET_KEY.fullmatch(str(k))}
        not_text = sorted(k for k, v in named.items() if not isinstance(v, str))
        if not_text:
            problems.add(f"{where}: {section} values must be strings; not: {', '.join(not_text)}",
                         hint="quote the values (an unquoted 0123 or true is not a string)")
            ok = False
        if section == "data":
            for key, value in named.items():
                if isinstance(value, str) and value and redact.b64decode_data(value) is None:
                    problems.add(f"{where}: data.{key} is not valid base64",
                                 hint="data values are base64-encoded; put plain text under stringData instead")
                    ok = False
    return ok


def _string_keys(value):
    """Mapping keys as strings, as Kubernetes' own YAML reader makes them
    (`data: {9000: "ns/svc:8080"}` is a ConfigMap key "9000", not a number)."""
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _string_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_string_keys(v) for v in value]
    return value


def _normalise(obj: dict) -> None:
    """Drop what is never applied and would only show as drift: `status`
    (the controllers' to write) and the `creationTimestamp: null` that
    serialised client objects carry; turn mapping keys into strings."""
    for key, value in list(obj.items()):
        obj[key] = _string_keys(value)
    obj.pop("status", None)
    meta = obj["metadata"]
    if "creationTimestamp" in meta and meta["creationTimestamp"] is None:
        del meta["creationTimestamp"]


def _scope_lookup(manifests: list[Manifest], *,
                  is_namespaced: Callable[[str, str], bool | None]) -> Callable[[str, str], bool | None]:
    """Scope by (group, kind): CRDs in this render first, then `is_namespaced`.

    The rendered CRD wins because it is what is about to exist: the cluster
    may not know the kind yet (first sync). Answers are memoised per render,
    because a discovery-backed `is_namespaced` may refresh discovery on a miss.
    """
    from_crds: dict[tuple[str, str], bool] = {}
    for m in manifests:
        obj = m.obj
        if (obj["kind"] != "CustomResourceDefinition"
                or split_api_version(obj["apiVersion"])[0] != "apiextensions.k8s.io"):
            continue
        spec = obj.get("spec") if isinstance(obj.get("spec"), dict) else {}
        names = spec.get("names") if isinstance(spec.get("names"), dict) else {}
        group, kind, scope = spec.get("group"), names.get("kind"), spec.get("scope")
        # A malformed CRD decides nothing here; the apiserver will say what is wrong with it.
        if isinstance(group, str) and isinstance(kind, str) and scope in ("Namespaced", "Cluster"):
            from_crds[(group, kind)] = scope == "Namespaced"
    memo: dict[tuple[str, str], bool | None] = dict(from_crds)

    def scope_of(group: str, kind: str) -> bool | None:
        key = (group, kind)
        if key not in memo:
            memo[key] = is_namespaced(group, kind)
        return memo[key]

    return scope_of


def _default_namespace(m: Manifest, *, namespace: str, scope_of: Callable[[str, str], bool | None],
                       problems: _Problems) -> None:
    meta = m.obj["metadata"]
    ref = m.ref
    namespaced = scope_of(ref.group, ref.kind)
    if namespaced is True:
        if not meta.get("namespace"):
            meta["namespace"] = namespace
    elif namespaced is False:
        if meta.get("namespace"):
            problems.add(f"{m.source}: {ref.kind}/{ref.name} is cluster-scoped but names namespace "
                         f"{meta['namespace']}",
                         hint="remove metadata.namespace from cluster-scoped objects")
        else:
            # `namespace: ""` means none to the apiserver; drop it so the
            # object compares equal to what the cluster returns.
            meta.pop("namespace", None)
    # None: unknown kind; left as written for the plan stage to judge.


def _check_duplicates(manifests: list[Manifest], *, problems: _Problems) -> None:
    first: dict[ObjectRef, str] = {}
    for m in manifests:
        ref = m.ref
        if ref in first:
            problems.add(f"{ref} is defined twice: in {first[ref]} and in {m.source}",
                         hint="each object may be defined once; remove or rename one copy")
        else:
            first[ref] = m.source
