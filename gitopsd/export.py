"""`gitopsd export APP --at TIME`: the manifests that ran at an instant, rendered again from Git.

"What exactly ran in production on 3 March at 14:00?" is answered from two
things gitopsd already keeps, not from a copy of every object: the audit
trail knows which commit was live then and which hand edits were open
(gitopsd.audit.history.state_at: the last transition at or before TIME
whose result is in records.CLUSTER_CHANGING), and Git still holds that
commit. The commit is fetched by its full SHA (no network when the cache
holds it; a branch that moved on since does not matter) and rendered with
the app's settings (gitopsd.engine.sync.render_commit, the render a sync
runs), then written one object per file:

    DIR/EXPORT.md                       the app, the instant, the commit, the record
                                        that made it live, the drift open then
    DIR/<namespace>/<kind>-<name>.yaml  namespaced objects
    DIR/_cluster/<kind>-<name>.yaml     cluster-scoped ones ("_" is in no namespace name)

`kubectl apply -R -f DIR` reads the YAML only (EXPORT.md is no manifest).
The objects are as Git has them: gitopsd's ApplySet label and hash
annotation are added at apply time and are not part of them.

Decisions and edge cases:

- **Secrets are references, never values.** A Secret keeps its name, type,
  labels and keys; every value is "" and the annotation `gitopsd.io/export`
  says which keys must come from where. Its last-applied annotation (which
  holds the values) is dropped. Every text written — files, EXPORT.md, the
  command's output — also passes through gitopsd.redact.scrub, which knows
  every Secret value the render met, wherever else it appears: a password
  copied into a ConfigMap is written as <redacted> there, and the object is
  named in EXPORT.md, since it then differs from Git.
- **Settings are today's.** The trail records the commit, not the path or
  render settings, so they come from the apps file as it is now. When the
  render lacks an object the live transition wrote, or the trail names
  another repository than the file, EXPORT.md and stderr say so instead of
  guessing.
- **The chain is checked.** `gitopsd audit verify`'s check of the whole
  chain, and the hash of every record the answer rests on: a broken chain
  still exports (the commit is what it is) but says so, and the command
  exits 1.
- **Whole or nothing.** Files go to a temporary sibling of DIR, renamed at
  the end; an existing DIR that is not empty is refused, so two instants
  never mix in one directory.
- **Nothing live at TIME** (before the first transition that wrote the
  cluster, or no trail at all) is an error that says where the trail starts.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml

from gitopsd import __version__, redact
from gitopsd import config as cfg
from gitopsd.audit.history import LiveState, state_at
from gitopsd.audit.records import iso_time, record_hash
from gitopsd.audit.verify import verify
from gitopsd.engine import source
from gitopsd.engine.render import Manifest
from gitopsd.engine.sync import AppSpec, default_cache_dir, render_commit
from gitopsd.errors import GitopsdError, SourceError
from gitopsd.kube import Kube
from gitopsd.objects import ObjectRef

SUMMARY_FILE = "EXPORT.md"
CLUSTER_DIR = "_cluster"
EXPORT_ANNOTATION = "gitopsd.io/export"
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


@dataclass(frozen=True)
class SecretReference:
    """A Secret written without its values: which object, which keys."""

    ref: ObjectRef
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Export:
    """What one export wrote, and what a reader must know about it."""

    state: LiveState
    revision: source.Revision
    directory: Path
    files: dict[str, ObjectRef]
    secrets: list[SecretReference]
    chain_ok: bool
    chain: str
    warnings: list[str]


def export(kube: Kube, *, config_file: Path, app: str, namespace: str, at: datetime,
           directory: Path | None = None, cache_dir: Path | None = None, home: Kube | None = None) -> Export:
    """Write what app `app` ran at `at` to `directory` (default ./<app>-<short sha>).

    `namespace` is gitopsd's, where the trail and the credentials Secrets
    live. `kube` reaches the app's target (its trail, and the discovery the render uses);
    `home` gitopsd's own cluster, where the credentials are (default: `kube`). Raises GitopsdError when nothing was live at `at`, the app is not in
    the apps file, the commit cannot be fetched or rendered, or the directory
    cannot be written; nothing is left behind then.
    """
    spec = _app_config(config_file, app)   # the file first: a typo costs no request
    state = state_at(kube, namespace=namespace, app=app, when=at)
    if state.live is None:
        raise GitopsdError(f"app {app}: nothing was live at {iso_time(at)}: {state.nothing_live()}",
                           hint=f"`gitopsd history {app} --namespace {namespace}` lists the trail; give --at a time "
                                f"at or after the first transition (ISO 8601 with a zone, e.g. "
                                f"2026-03-03T14:00:00Z)")
    chain_ok, chain = check_chain(kube, state=state)
    manifests, revision = _render_live(kube, spec=spec, state=state, namespace=namespace, cache_dir=cache_dir,
                                       home=home)
    texts, secrets, scrubbed = _files(manifests)
    done = Export(state=state, revision=revision, directory=directory or Path(f"{app}-{revision.sha[:8]}"),
                  files={name: m.ref for name, m in zip(texts, manifests)}, secrets=secrets, chain_ok=chain_ok,
                  chain=chain, warnings=_warnings(state.live, revision=revision, manifests=manifests,
                                                  scrubbed=scrubbed))
    texts[SUMMARY_FILE] = summary_markdown(done)
    write_tree(done.directory, texts)
    return done


def check_chain(kube: Kube, *, state: LiveState) -> tuple[bool, str]:
    """(ok, what was checked): the whole chain as `gitopsd audit verify` checks it, and the hash of
    every record this answer rests on (an edit of one of them is named even where verify stops earlier)."""
    ok, message = verify(kube, namespace=state.namespace, app=state.app)
    edited = [str(r.get("seq")) for r in state.used if record_hash(r) != r.get("hash")]
    if edited:
        ok = False
        message += f"; records this export rests on no longer match their hashes: seq {', '.join(edited)}"
    return ok, message


def _app_config(config_file: Path, app: str) -> cfg.AppConfig:
    config = cfg.load(config_file)
    found = config.app(app)
    if found is None:
        names = ", ".join(a.name for a in config.apps) or "none"
        raise GitopsdError(f"{config_file}: names no app {app} (apps: {names})",
                           hint="give the apps file `gitopsd run` reads, which says the app's repository, path "
                                "and render settings")
    return found


def _render_live(kube: Kube, *, spec: cfg.AppConfig, state: LiveState, namespace: str,
                 cache_dir: Path | None, home: Kube | None = None) -> tuple[list[Manifest], source.Revision]:
    """The live transition's commit, fetched by its full SHA and rendered with the app's settings.

    The credentials are resolved as the daemon resolves them (a Secret in
    gitopsd's namespace, or files) and their temporary files removed after.
    """
    from gitopsd.daemon.credentials import CredentialStore   # the daemon's reading of credentials, one place

    sha = state.live["revision"]
    store = CredentialStore(home or kube, namespace=namespace)
    try:
        # The live commit's signature was checked when it was deployed (its audit record says by whom);
        # re-creating it is a read, which keys rotated since must not block.
        app = dataclasses.replace(spec, verify=None).to_spec(inventory_namespace=namespace,
                                                             credentials=store.resolve(spec),
                                                              decryption_keys=store.decryption_keys(spec))
        return _fetch_and_render(kube, app=app, sha=sha, cache_dir=cache_dir)
    except GitopsdError as exc:
        hint = exc.hint
        if isinstance(exc, SourceError):
            hint = (f"{hint}; " if hint else "") + (f"an export needs the commit itself: if history was rewritten "
                                                    f"since, push it back from a clone that has it, e.g. as a tag "
                                                    f"(git push origin {sha}:refs/tags/live-{sha[:8]})")
        raise GitopsdError(f"app {state.app}: cannot re-create revision {sha} (live at {iso_time(state.when)}, "
                           f"audit seq {state.live.get('seq')}): {exc.message}", hint=hint) from None
    finally:
        store.close()


def _fetch_and_render(kube: Kube, *, app: AppSpec, sha: str,
                      cache_dir: Path | None) -> tuple[list[Manifest], source.Revision]:
    try:
        checkout = source.fetch(app.repo, sha, cache_dir=cache_dir or default_cache_dir(),
                                credentials=app.credentials, timeout=app.fetch_timeout)
        return render_commit(kube, app, checkout), checkout.revision
    except Exception as exc:
        redact.scrub_exception(exc)
        raise


# ---------------------------------------------------------------- objects and files


def _files(manifests: list[Manifest]) -> tuple[dict[str, str], list[SecretReference], list[ObjectRef]]:
    """(path -> YAML in manifest order, the Secrets written as references, other objects a Secret value was
    scrubbed from: a password copied into a ConfigMap is still a password)."""
    texts: dict[str, str] = {}
    secrets: list[SecretReference] = []
    scrubbed: list[ObjectRef] = []
    for name, m in zip(file_names([m.ref for m in manifests]), manifests):
        obj, secret = exportable(m.obj)
        texts[name] = _yaml(obj)
        if secret is not None:
            secrets.append(secret)
        elif obj != m.obj:
            scrubbed.append(m.ref)
    return texts, secrets, scrubbed


def exportable(obj: dict) -> tuple[dict, SecretReference | None]:
    """The object as it is written: a Secret as a reference (keys, no values), anything else as rendered."""
    if obj.get("kind") != "Secret":
        return redact.scrub_data(obj), None
    keys = tuple(sorted({str(k) for section in redact.SECTIONS if isinstance(obj.get(section), dict)
                         for k in obj[section]}))
    ref = ObjectRef(group="", kind="Secret", namespace=_namespace_of(obj), name=_name_of(obj))
    meta = dict(obj.get("metadata") or {})
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != _LAST_APPLIED}
    annotations[EXPORT_ANNOTATION] = (f"values not exported: set keys {', '.join(keys) or '(none)'} of Secret "
                                      f"{ref.namespace}/{ref.name} from where you keep its values")
    out = {k: v for k, v in obj.items() if k not in redact.SECTIONS}
    out["metadata"] = {**meta, "annotations": annotations}
    if keys:
        out["data"] = dict.fromkeys(keys, "")
    return redact.scrub_data(out), SecretReference(ref=ref, keys=keys)


def _namespace_of(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("namespace") or ""


def _name_of(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("name") or ""


def file_names(refs: list[ObjectRef]) -> list[str]:
    """One path per object: `<namespace>/<kind>-<name>.yaml`, `_cluster/...` when cluster-scoped.

    The kind is lower-cased; two kinds of one name in different groups
    (Ingress in networking.k8s.io and in extensions) are told apart by the
    group, `<kind>.<group>-<name>.yaml`, and a name a file system cannot
    hold ("/" where a path-segment name allows it) has that character replaced.
    """
    plain = [_file_name(r, qualified=False) for r in refs]
    clash = {p for p, n in Counter(plain).items() if n > 1}
    names = [_file_name(r, qualified=True) if p in clash else p for r, p in zip(refs, plain)]
    seen: Counter[str] = Counter()
    unique = []
    for name in names:   # still equal after the group: only a replaced character can do that
        seen[name] += 1
        unique.append(name if seen[name] == 1 else f"{name[:-len('.yaml')]}-{seen[name]}.yaml")
    return unique


def _file_name(ref: ObjectRef, *, qualified: bool) -> str:
    kind = ref.kind.lower() + (f".{ref.group}" if qualified and ref.group else "")
    stem = f"{kind}-{ref.name}".replace("/", "_").replace("\x00", "_")
    return f"{ref.namespace or CLUSTER_DIR}/{stem.lstrip('.')}.yaml"


def _yaml(obj: dict) -> str:
    return redact.scrub(yaml.safe_dump(obj, sort_keys=False, default_flow_style=False, width=120))


def write_tree(target: Path, texts: dict[str, str]) -> None:
    """Write `texts` (relative path -> content) as the directory `target`, whole or not at all."""
    if target.is_symlink() or (target.exists() and (not target.is_dir() or any(target.iterdir()))):
        raise GitopsdError(f"{target}: exists and is not an empty directory",
                           hint="name another directory with -o, or remove it: an export never writes into "
                                "existing files")
    parent = target.absolute().parent
    tmp: Path | None = None
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=parent))
        for rel, text in texts.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o755)   # mkdtemp's 0700 is for the half-written state only
        if target.exists():
            target.rmdir()
        tmp.rename(target)
    except OSError as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise GitopsdError(f"{target}: cannot write the export: {exc.strerror}",
                           hint="-o must name a directory gitopsd may create, on a file system with free space") \
            from None


# ---------------------------------------------------------------- what a reader is told


def _warnings(live: dict, *, revision: source.Revision, manifests: list[Manifest],
              scrubbed: list[ObjectRef]) -> list[str]:
    """What a reader must know: signs that today's app settings do not render what ran then, and objects
    written other than Git has them (a Secret value scrubbed out of them)."""
    rendered = {m.ref for m in manifests}
    out = [f"a Secret value also stood in {r}: written as {redact.REDACTED} there" for r in scrubbed]
    if live.get("source") and live["source"] != revision.url:
        out.append(f"the trail recorded this revision from {live['source']}, the apps file names {revision.url} "
                   f"now: exported from the latter")
    wrote = [o for o in (live.get("plan") or {}).get("objects", []) if o.get("done") and o.get("action") != "pruned"]
    missing = [_record_ref(o) for o in wrote if _record_ref(o) not in rendered]
    if missing:
        shown = ", ".join(str(r) for r in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        out.append(f"the transition that made this revision live (seq {live.get('seq')}) wrote objects this render "
                   f"lacks: {shown}; the app's path, render or namespace in the apps file may have changed since")
    return out


def _record_ref(obj: dict) -> ObjectRef:
    return ObjectRef(group=obj.get("group", ""), kind=obj.get("kind", ""), namespace=obj.get("namespace", ""),
                     name=obj.get("name", ""))


def summary_line(done: Export) -> str:
    """The command's answer on stdout: where, which commit, how many objects, what a reader must know."""
    live, rev = done.state.live, done.revision
    lines = [f"exported app {done.state.app} as it ran at {iso_time(done.state.when)} to {done.directory}/",
             f"  revision {rev.sha} ({live.get('ref') or 'ref unknown'}), made live by audit seq {live.get('seq')} ({live.get('result')}) at "
             f"{live.get('time')}",
             f"  {_n(len(done.files), 'object')} ({_n(len(done.secrets), 'Secret')} without values: keys only), "
             f"{len(done.state.open_drift)} open drift; details in {done.directory / SUMMARY_FILE}",
             f"  audit chain: {done.chain if done.chain_ok else 'BROKEN: ' + done.chain}"]
    return redact.scrub("\n".join(lines))


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def summary_markdown(done: Export) -> str:
    """EXPORT.md: what a reader of the directory needs, years later, without gitopsd."""
    state, live, rev = done.state, done.state.live, done.revision
    parts = [
        f"# {state.app} as it ran at {iso_time(state.when)}\n",
        f"Re-created by gitopsd {__version__}: the commit that was live then, rendered again from Git with the "
        f"app's settings. Apply with `kubectl apply --server-side -R -f .` (Secrets need their values first).\n",
        "## Commit\n",
        *_commit_lines(rev, ref=live.get("ref")),
        "## Made live by\n",
        f"- audit seq {live.get('seq')}: {live.get('result')} (trigger {live.get('trigger')}) at {live.get('time')} "
        f"by {live.get('instance')}",
        f"- record hash `{live.get('hash')}`, previous revision {live.get('previous') or 'none'}",
        f"- audit chain: {'intact' if done.chain_ok else '**BROKEN**'}: {done.chain}\n",
        "## Drift open at that instant\n",
        *(_drift_lines(state.open_drift) or ["none: the cluster matched the commit, as far as gitopsd saw\n"]),
        *_partial_lines(state.partial),
        "## Secrets (references: values not exported)\n",
        *([f"- {s.ref}: keys {', '.join(s.keys) or '(none)'}" for s in done.secrets] or ["none"]), "",
        f"## Objects ({len(done.files)})\n",
        *[f"- `{name}`: {ref}" for name, ref in sorted(done.files.items())], "",
    ]
    if done.warnings:
        parts += ["## Warnings\n", *[f"- {w}" for w in done.warnings], ""]
    return redact.scrub("\n".join(parts) + "\n")


def _commit_lines(rev: source.Revision, *, ref: str | None) -> list[str]:
    """The commit as Git has it (author, message), which an edited record cannot change."""
    message = "\n".join(f"    {line}" for line in rev.message.splitlines()) or "    (empty)"
    return [f"- sha `{rev.sha}` (ref {ref or 'unknown'} then) from {rev.url}", f"- author: {rev.author}",
            f"- committer: {rev.committer} at {iso_time(rev.time)}", "- message:\n", message, ""]


def _drift_lines(drift: list[dict]) -> list[str]:
    lines = []
    for rec in drift:
        obj = _record_ref(rec.get("object") or {})
        what = "deleted by hand" if rec.get("deleted") else ", ".join(rec.get("fields") or []) or "-"
        by = ", ".join(rec.get("managers") or []) or "unknown manager"
        lines.append(f"- {obj}: {what} (by {by}); {rec.get('action')} at {rec.get('time')}, audit seq {rec.get('seq')}")
    return lines + [""] if lines else []


def _partial_lines(partial: list[dict]) -> list[str]:
    if not partial:
        return []
    return ["## Partly written after it (failed attempts)\n",
            *[f"- seq {r.get('seq')} {r.get('result')} revision {r.get('revision')}: {r.get('written')} objects "
              f"written; {r.get('reason') or ''}" for r in partial], ""]
