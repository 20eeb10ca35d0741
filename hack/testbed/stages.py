"""The KWOK Stage configs a cluster's kwok runs: KWOK's fast defaults plus ours.

KWOK plays a kubelet by Stages: a Stage selects objects (jq expressions on
their JSON) and patches their status, optionally after a delay. `build`
copies KWOK's default sets into the cache (fast node start, lease heartbeats,
fast pod lifecycle). On top of those, `kwok-stages/` beside this file holds
our own, kept in the repository so that every cluster gets them from a clean
clone (with no rebuild: `up` reads them from the checkout):

- a container image tag `:crashloop` crash-loops (CrashLoopBackOff, restarts
  climbing; a Job's pod with restartPolicy Never fails),
- `:pullfail` cannot pull its image (ErrImagePull, then ImagePullBackOff),
- `:slow-ready` becomes Ready 5 s after it starts,

so tests exercise the real Deployment and Job controllers on a failed or slow
rollout. Each file is named after the tag it handles; every other image keeps
KWOK's fast behaviour.

Why two of KWOK's defaults are adapted (written per cluster into its state
directory, the cache keeping KWOK's files as shipped):

- `pod-ready` makes any Pending pod Running and Ready at once. When two Stages
  match a pod, KWOK picks one at random (by weight), so it would race ours,
  and take over outright where ours stop matching (a pod left in
  ImagePullBackOff is still Pending). We add one selector expression that
  leaves out every pod with one of our tags, read from the file names here —
  rather than weights, which only settle the moments when both match.
- `pod-complete` makes a Job's Running pod Succeeded at once. We add "and
  Ready", which changes nothing for KWOK's own pods (they are Ready from the
  moment they run) but keeps a crash-looping pod of an OnFailure Job from
  completing, and lets a `:slow-ready` Job's pod complete once it is ready.

The edit is a text insertion after the `matchExpressions:` line of the pinned
KWOK release's files; if a KWOK upgrade changes that line, `up` fails naming
the file instead of starting a cluster whose stages race.
"""

from __future__ import annotations

from pathlib import Path

from . import build

OURS = Path(__file__).resolve().parent / "kwok-stages"

# The anchor after which the extra selector expressions go (KWOK's files indent
# `selector:` by two spaces and its list by four).
_ANCHOR = "\n    matchExpressions:\n"


def _expression(key: str, operator: str, value: str) -> str:
    """One matchExpressions entry in the style of KWOK's files (its legacy key/operator/values form)."""
    return f"    - key: '{key}'\n      operator: '{operator}'\n      values:\n      - '{value}'\n"


def tags() -> list[str]:
    """The image tags our Stages handle: the names of the files in kwok-stages/."""
    return sorted(p.stem for p in OURS.glob("*.yaml"))


def _not_ours() -> str:
    pattern = ":(" + "|".join(tags()) + ")$"
    return _expression(f'[.spec.containers[].image | test("{pattern}")] | any', "NotIn", "true")


def _adaptations() -> dict[str, str]:
    """Cache file name -> the selector expression added to it."""
    return {
        "pod-fast-pod-ready.yaml": _not_ours(),
        "pod-fast-pod-complete.yaml": _expression('.status.conditions[]? | select(.type == "Ready") | .status',
                                                  "In", "True"),
    }


def adapt(text: str, *, expression: str, name: str) -> str:
    """`text` (a KWOK Stage file) with `expression` added to its selector."""
    if text.count(_ANCHOR) != 1:
        raise RuntimeError(f"KWOK stage {name} no longer has one `matchExpressions:` line where "
                           f"hack/testbed/stages.py adds its selector (KWOK {build.KWOK}); "
                           f"update the anchor there for this KWOK release")
    return text.replace(_ANCHOR, _ANCHOR + expression, 1)


def configs(state_dir: Path) -> list[Path]:
    """Every Stage file this cluster's kwok gets (one --config each), in a stable order.

    KWOK's defaults come from the cache (the two adapted ones rewritten into
    `state_dir/kwok-stages/`), ours from the checkout. Raises FileNotFoundError
    naming the fix when the cache holds no KWOK stages yet.
    """
    defaults = sorted(build.kwok_stages_dir().glob("*.yaml"))
    if not defaults:
        raise FileNotFoundError(f"no KWOK stage configs in {build.kwok_stages_dir()}: run `hack/cluster build`")
    adaptations = _adaptations()
    missing = sorted(set(adaptations) - {p.name for p in defaults})
    if missing:
        raise FileNotFoundError(f"KWOK stage configs {missing} are missing from {build.kwok_stages_dir()}: "
                                f"run `hack/cluster build`")
    adapted_dir = state_dir / "kwok-stages"
    adapted_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for path in defaults:
        if path.name in adaptations:
            target = adapted_dir / path.name
            target.write_text(adapt(path.read_text(), expression=adaptations[path.name], name=path.name))
            path = target
        out.append(path)
    return out + sorted(OURS.glob("*.yaml"))
