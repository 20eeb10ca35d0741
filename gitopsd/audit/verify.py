"""`gitopsd audit verify`: re-compute an app's hash chain and name the first broken link.

Every message names what broke and where: an edited record ("seq 5 edited"),
a missing one ("seq 4 missing (through seq 6)", with the segment that held
it), one moved ("out of order"). The chain's rules are in
gitopsd.audit.records (hashing), gitopsd.audit.segments (markers, retention)
and gitopsd.audit.head (the head kept on the app's parent).
"""

from __future__ import annotations

from gitopsd.audit.head import kept_head, parse_marker
from gitopsd.audit.records import GENESIS_HASH, record_hash
from gitopsd.audit.segments import (
    HEAD_ANNOTATION,
    RECORD_KEY,
    RETAINED_FROM_ANNOTATION,
    Head,
    Segment,
    list_segments,
    parse_record,
    read_segment,
    segment_name,
)
from gitopsd.engine import inventory
from gitopsd.kube import Kube


def verify(kube: Kube, *, namespace: str, app: str) -> tuple[bool, str]:
    """Check the app's chain; (ok, message naming the first broken link).

    Detects an edited record (its hash no longer matches its content, or it
    was re-hashed and the next record's prev_hash no longer matches it), a
    missing one (a gap in seq, a missing start without a retention marker,
    fewer records than a segment's head marker says, or fewer than the head
    kept on the app's parent says: the newest segments, or all of them,
    deleted), one moved to another key or another app's series (out of
    order). A chain whose oldest records left by retention is OK and says
    where it starts. A "missing" message starts with the first missing seq
    and says how far the gap runs and which segment held it.
    """
    try:
        # Before the segments, so a daemon appending meanwhile can only put the store ahead of it.
        kept = kept_head(kube, namespace=namespace, app=app)
    except ValueError as exc:
        return False, str(exc)
    segments = list_segments(kube, namespace=namespace, app=app)
    if not segments:
        if kept is None:
            return True, f"no audit records for app {app} in namespace {namespace}"
        return False, (f"{_missing(1, kept.seq)}: no audit segment of app {app} is left, but the chain head kept on "
                       f"{_parent_ref(namespace, app)} is seq {kept.seq} in {segment_name(app, kept.segment)} "
                       f"(were the segments deleted?)")
    entries: list[tuple[int, str, Segment]] = []   # (seq from key, raw, segment)
    for seg in segments:
        cm = read_segment(kube, namespace=namespace, name=seg.name)
        if cm is None:
            return False, f"segment {seg.name} disappeared while verifying; run verify again"
        data = cm.get("data") or {}
        for key, raw in data.items():
            if not RECORD_KEY.fullmatch(key):
                return False, f"segment {seg.name} holds a foreign key {key!r}: records are stored by seq"
            entries.append((int(key), raw, seg))
    entries.sort(key=lambda e: e[0])
    if not entries:
        return False, f"every record is missing: the segments of app {app} are empty"
    problem = _start_problem(entries[0][0], segments[0], app=app)
    if problem is None:
        problem, hashes = _chain_problem(entries, app=app)
    if problem is None:
        problem = _head_problem(hashes, segments, kept, app=app, parent=_parent_ref(namespace, app))
    if problem is not None:
        return False, problem
    first, last = min(hashes), max(hashes)
    msg = f"OK: {len(entries)} records, seq {first}..{last}, chain intact (head {hashes[last][:12]})"
    if first > 1:
        msg += f"; chain starts at seq {first} (older records removed by retention)"
    if kept is None:
        msg += (f"; no chain head is kept on {_parent_ref(namespace, app)} yet (the next record writes it), so a "
                f"deleted newest segment would go unnoticed")
    return True, msg


def _missing(first: int, last: int) -> str:
    """ "seq 4 missing", or "seq 4 missing (through seq 9)" for a run of them."""
    return f"seq {first} missing" + (f" (through seq {last})" if last > first else "")


def _parent_ref(namespace: str, app: str) -> str:
    return f"ConfigMap {namespace}/{inventory.parent_name(app)}"


def _gone(app: str, first: int, last: int) -> str:
    """The segments numbered first..last, by name: what a gap in the numbering says was deleted."""
    if first == last:
        return f"segment {segment_name(app, first)}"
    return f"segments {segment_name(app, first)}..{last:06d}"


def _start_problem(first: int, oldest: Segment, *, app: str) -> str | None:
    """Why the chain may not start at `first`: only seq 1 or the seq retention marked is a start."""
    if first < 1:
        return f"seq {first} out of order: the chain starts at seq 1"
    if first == 1 or oldest.annotations.get(RETAINED_FROM_ANNOTATION) == str(first):
        return None
    message = (f"seq {first - 1} missing: the chain starts at seq {first} and no retention marker says older records "
               f"were removed")
    if oldest.number > 1:
        older = " or an older one" if oldest.number > 2 else ""
        message += f" ({_gone(app, oldest.number - 1, oldest.number - 1)}{older} deleted by hand?)"
    return message


def _chain_problem(entries: list[tuple[int, str, Segment]], *, app: str) -> tuple[str | None, dict[int, str]]:
    """Walk the records oldest first: the first broken link, and every seq's hash."""
    hashes: dict[int, str] = {}
    prev: dict | None = None
    prev_seg: Segment | None = None
    for seq, raw, seg in entries:
        rec = parse_record(raw)
        where = f"(segment {seg.name})"
        if rec is None:
            return f"seq {seq} edited: the record is not valid JSON {where}", hashes
        if prev is not None and seq == prev["seq"]:
            return f"seq {seq} out of order: stored twice {where}", hashes
        if rec.get("seq") != seq:
            return f"seq {seq} out of order: the record stored under it says seq {rec.get('seq')} {where}", hashes
        if rec.get("app") != app:
            return f"seq {seq} out of order: it belongs to app {rec.get('app')!r}, not {app!r} {where}", hashes
        if prev is not None and prev_seg is not None and seq != prev["seq"] + 1:
            gap = f"{_missing(prev['seq'] + 1, seq - 1)}: the chain jumps from seq {prev['seq']}"
            if seg.number > prev_seg.number + 1:   # numbers are never skipped: the ones between were deleted
                return (f"{gap} in {prev_seg.name} to seq {seq} in {seg.name} "
                        f"({_gone(app, prev_seg.number + 1, seg.number - 1)} deleted?)"), hashes
            return f"{gap} to {seq} {where}", hashes
        if record_hash(rec) != rec.get("hash"):
            return f"seq {seq} edited: its content no longer matches its hash {where}", hashes
        expected = prev["hash"] if prev is not None else (GENESIS_HASH if seq == 1 else rec.get("prev_hash"))
        if rec.get("prev_hash") != expected:
            return (f"seq {seq - 1} edited or replaced: seq {seq} carries prev_hash "
                    f"{str(rec.get('prev_hash'))[:12]}… but seq {seq - 1} hashes to {expected[:12]}…"), hashes
        hashes[seq] = rec["hash"]
        prev, prev_seg = rec, seg
    return None, hashes


def _head_problem(hashes: dict[int, str], segments: list[Segment], kept: Head | None, *, app: str,
                  parent: str) -> str | None:
    """Compare the end of the stored chain with the newest segment's marker and the head kept on the parent.

    The parent's head may lag a record or two behind the store (see the
    module docstring) but is never ahead of it: ahead means records left the
    store with their segment.
    """
    first, last = min(hashes), max(hashes)
    newest = segments[-1]
    marker = parse_marker(newest.annotations.get(HEAD_ANNOTATION))
    if marker is not None and marker.seq > last:
        return (f"{_missing(last + 1, marker.seq)}: the newest segment's head marker says the chain ends at seq "
                f"{marker.seq}, the store ends at seq {last}")
    if marker is not None and marker.seq == last and marker.hash != hashes[last]:
        return f"seq {last} edited or replaced: it does not match the segment's head marker"
    if kept is None:
        return None
    if kept.seq > last:
        held = segment_name(app, kept.segment)
        why = (f"the newest {_gone(app, newest.number + 1, kept.segment)} deleted?" if kept.segment > newest.number
               else f"records deleted from {held}?")
        return (f"{_missing(last + 1, kept.seq)}: the segments end at seq {last}, but the chain head kept on "
                f"{parent} is seq {kept.seq} in {held} ({why})")
    if kept.seq >= first and kept.hash != hashes[kept.seq]:
        return f"seq {kept.seq} edited or replaced: it does not match the chain head kept on {parent}"
    return None
