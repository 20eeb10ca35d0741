"""Ownership: which objects an app owns, by the ApplySet standard (KEP-3659).

One parent ConfigMap per app (in gitopsd's own namespace) names the applyset;
every member carries `applyset.kubernetes.io/part-of=<id>`. The parent's
annotations record which group-kinds and namespaces to search for members,
so kubectl (`kubectl apply --prune --applyset`) and other tools understand
what gitopsd owns.

The inventory is the label on the members, not a list in the parent: it
cannot outgrow etcd's object-size limit however many objects an app has
(DESIGN.md pain #8), and an object that lacks our label is never ours to
delete, whatever any record says.

Why a ConfigMap parent rather than a Secret: it holds no secret, and
reading it needs no permission on Secrets.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from gitopsd import __version__
from gitopsd.kube import Kube, KubeApiError

ID_LABEL = "applyset.kubernetes.io/id"
PART_OF_LABEL = "applyset.kubernetes.io/part-of"
TOOLING_ANNOTATION = "applyset.kubernetes.io/tooling"
GROUP_KINDS_ANNOTATION = "applyset.kubernetes.io/contains-group-kinds"
NAMESPACES_ANNOTATION = "applyset.kubernetes.io/additional-namespaces"
# Whether members live in the parent's own namespace (gitopsd's). The ApplySet
# standard counts that namespace in implicitly; gitopsd records it, so that an
# app whose objects all live elsewhere is never searched for there: under
# namespaced RBAC gitopsd may not even list Deployments in its own namespace
# (and so cannot have put any there).
PARENT_NAMESPACE_ANNOTATION = "gitopsd.io/members-in-parent-namespace"
PARENT_KIND, PARENT_GROUP = "ConfigMap", ""
T = TypeVar("T")


def applyset_id(*, name: str, namespace: str, kind: str = PARENT_KIND, group: str = PARENT_GROUP) -> str:
    """`applyset-<base64url(sha256(name.namespace.Kind.group)), unpadded>-v1`."""
    digest = hashlib.sha256(f"{name}.{namespace}.{kind}.{group}".encode()).digest()
    return "applyset-" + base64.urlsafe_b64encode(digest).decode().rstrip("=") + "-v1"


def parent_name(app: str) -> str:
    return f"gitopsd-{app}"


@dataclass
class Inventory:
    """The parent's view: what was applied last time, by group-kind and namespace."""

    app: str
    namespace: str                       # the parent's namespace (gitopsd's own)
    group_kinds: set[str] = field(default_factory=set)   # "Kind.group", core kinds bare
    namespaces: set[str] = field(default_factory=set)    # every namespace holding members
    exists: bool = False

    @property
    def name(self) -> str:
        return parent_name(self.app)

    @property
    def id(self) -> str:
        return applyset_id(name=self.name, namespace=self.namespace)

    @property
    def selector(self) -> str:
        return f"{PART_OF_LABEL}={self.id}"

    @property
    def labels(self) -> dict[str, str]:
        """What makes a ConfigMap this app's parent, whichever writer creates it first (apply, status, audit)."""
        return {ID_LABEL: self.id, "app.kubernetes.io/managed-by": "gitopsd"}

    def parent_object(self, *, group_kinds: set[str], namespaces: set[str]) -> dict:
        additional = sorted(ns for ns in namespaces if ns and ns != self.namespace)
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": self.labels,
                "annotations": {
                    TOOLING_ANNOTATION: f"gitopsd/{__version__}",
                    GROUP_KINDS_ANNOTATION: ",".join(sorted(group_kinds)),
                    NAMESPACES_ANNOTATION: ",".join(additional),
                    **({PARENT_NAMESPACE_ANNOTATION: "true"} if self.namespace in namespaces else {}),
                },
            },
        }


def load(kube: Kube, *, app: str, namespace: str) -> Inventory:
    """Read the app's parent; an absent parent is an empty inventory."""
    return from_parent(kube.get(kube.resource("v1", "ConfigMap"), parent_name(app), namespace),
                       app=app, namespace=namespace)


def from_parent(parent: dict | None, *, app: str, namespace: str) -> Inventory:
    """The inventory a parent ConfigMap records (None: the app has none yet, an empty inventory).

    Raises KubeApiError (409) when a ConfigMap of that name exists but is
    not this app's parent: gitopsd never takes it over.
    """
    inv = Inventory(app=app, namespace=namespace)
    if parent is None:
        return inv
    labels = parent["metadata"].get("labels") or {}
    if labels.get(ID_LABEL) != inv.id:
        raise KubeApiError(status=409, reason="Conflict", method="GET", path=f"configmaps/{namespace}/{inv.name}",
                           message=f"ConfigMap {namespace}/{inv.name} exists but is not gitopsd's ApplySet parent "
                                   f"(label {ID_LABEL} is {labels.get(ID_LABEL)!r}, want {inv.id})")
    ann = parent["metadata"].get("annotations") or {}
    inv.group_kinds = {gk for gk in ann.get(GROUP_KINDS_ANNOTATION, "").split(",") if gk}
    inv.namespaces = {ns for ns in ann.get(NAMESPACES_ANNOTATION, "").split(",") if ns}
    if ann.get(PARENT_NAMESPACE_ANNOTATION) == "true":
        inv.namespaces.add(namespace)
    inv.exists = True
    return inv


def write(kube: Kube, inv: Inventory, *, group_kinds: set[str], namespaces: set[str]) -> None:
    """Record group-kinds and namespaces on the parent (server-side apply)."""
    body = inv.parent_object(group_kinds=group_kinds, namespaces=namespaces)
    in_namespace(kube, inv.namespace, lambda: kube.apply(body))
    inv.group_kinds, inv.namespaces, inv.exists = set(group_kinds), set(namespaces), True


def in_namespace(kube: Kube, namespace: str, write: Callable[[], T]) -> T:
    """`write()` (a write into gitopsd's own namespace), creating the namespace first if it is missing.

    The namespace is created only when the write says it is missing (404
    `namespaces "<name>" not found`): a CLI run against a fresh cluster, or
    the namespace deleted by hand. So the usual write costs no read of the
    namespace beforehand — a GET per write was a tenth of an app's first
    sync. A namespace being deleted (Terminating) refuses the write with a
    403 that passes through: nothing can be written there until it is gone.
    """
    try:
        return write()
    except KubeApiError as exc:
        if not namespace_missing(exc, namespace):
            raise
    kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    return write()


def namespace_missing(exc: KubeApiError, namespace: str) -> bool:
    """Whether the apiserver refused a write into `namespace` because the namespace does not exist."""
    return exc.status == 404 and exc.api_message == f'namespaces "{namespace}" not found'


def ensure_namespace(kube: Kube, name: str) -> None:
    """Create gitopsd's own namespace if it is missing (the daemon, once at start)."""
    ns = kube.resource("v1", "Namespace")
    if kube.get(ns, name) is None:
        kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def split_group_kind(gk: str) -> tuple[str, str]:
    """'Deployment.apps' -> ('apps', 'Deployment'); 'ConfigMap' -> ('', 'ConfigMap')."""
    kind, _, group = gk.partition(".")
    return group, kind
