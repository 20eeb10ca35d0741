"""Identity of Kubernetes objects as plain dicts.

The hot path works on plain dicts (no client models): these helpers are the
one place that knows how to read group, kind, namespace and name from them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ObjectRef:
    """group/kind/namespace/name: what makes an object unique in a cluster.

    `namespace` is "" for cluster-scoped objects (and before defaulting).
    """

    group: str
    kind: str
    namespace: str
    name: str

    @property
    def group_kind(self) -> str:
        """`Kind.group` as ApplySet annotations spell it; core kinds bare."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    def __str__(self) -> str:
        ns = f"{self.namespace}/" if self.namespace else ""
        return f"{self.group_kind}/{ns}{self.name}"


def split_api_version(api_version: str) -> tuple[str, str]:
    """'apps/v1' -> ('apps', 'v1'); 'v1' -> ('', 'v1')."""
    if "/" in api_version:
        group, version = api_version.split("/", 1)
        return group, version
    return "", api_version


def ref_of(obj: dict) -> ObjectRef:
    group, _ = split_api_version(obj.get("apiVersion", ""))
    meta = obj.get("metadata") or {}
    return ObjectRef(group=group, kind=obj.get("kind", ""), namespace=meta.get("namespace") or "",
                     name=meta.get("name", ""))
