"""What a runner keeps of its last plan between runs: the desired objects, packed.

Split from gitopsd.daemon.runner: the runner judges drift against these
objects and self-heal puts them back; they are the part of a runner that
grows with the app, so they are kept small (gitopsd.daemon.reflector.Packer).
"""

from __future__ import annotations

import copy

from gitopsd.daemon.reflector import Packer
from gitopsd.engine.plan import Action, ObjectChange
from gitopsd.engine.render import Manifest
from gitopsd.objects import ObjectRef


class DesiredState:
    """What a runner keeps of its last plan between runs: each desired object and its file
    (drift is judged against them and self-heal puts them back), not the live object and the
    diff it was planned from, stale once applied.

    Kept packed (gitopsd.daemon.reflector.Packer: exact JSON, deflated against one preset
    dictionary shared by every runner of the process): ~7 KiB an app of five ConfigMaps as
    dicts, ~1 KiB packed. Each read decodes a fresh copy, exactly what was planned, that the
    caller may keep or change. An object JSON cannot hold exactly (keys that are not strings,
    integers beyond 64 bits) is kept as it is. Replaced whole by each plan, never changed:
    a reader needs no lock.
    """

    _packer = Packer()   # one preset dictionary for the process, not one per app

    def __init__(self, kept: dict[ObjectRef, tuple[bytes | dict, str]] | None = None) -> None:
        self._kept = kept or {}

    @classmethod
    def of(cls, changes: list[ObjectChange], *, before: DesiredState | None = None) -> DesiredState:
        """The objects a plan applies or leaves as they are (not its prunes). What is the same
        as in `before` (the state it replaces) shares its bytes: the same object is kept once."""
        kept = {}
        old = before._kept if before is not None else {}
        for c in changes:
            if c.action == Action.PRUNE or not c.desired:
                continue
            entry = (cls._pack(c.desired), c.source)
            kept[c.ref] = old[c.ref] if old.get(c.ref) == entry else entry
        return cls(kept)

    def changed_since(self, before: DesiredState) -> list[ObjectRef]:
        """The objects whose desired state is not what `before` held (new ones included).
        Packing is deterministic (one preset dictionary), so equal bytes are equal objects."""
        return [ref for ref, entry in self._kept.items() if before._kept.get(ref) != entry]

    @classmethod
    def _pack(cls, obj: dict) -> bytes | dict:
        try:
            return cls._packer.pack(obj)
        except TypeError:
            return obj

    def __contains__(self, ref: ObjectRef) -> bool:
        return ref in self._kept

    def __len__(self) -> int:
        return len(self._kept)

    def refs(self) -> list[ObjectRef]:
        return list(self._kept)

    def get(self, ref: ObjectRef) -> dict | None:
        """The desired object, a fresh copy; None when the plan has none of that name."""
        kept = self._kept.get(ref)
        if kept is None:
            return None
        obj = kept[0]
        return self._packer.unpack(obj) if isinstance(obj, bytes) else copy.deepcopy(obj)

    def source(self, ref: ObjectRef) -> str | None:
        """The file the desired object came from (None when the plan has none of that name)."""
        kept = self._kept.get(ref)
        return kept[1] if kept is not None else None

    def manifests(self) -> list[Manifest]:
        """Every desired object with its file, as a heal re-plans them."""
        return [Manifest(obj=self.get(ref), source=source) for ref, (_, source) in self._kept.items()]
