#!/usr/bin/env python3
"""hack/trust_bench.py: what the trust features cost, beside the tools a user would run by hand.

    .venv/bin/python hack/trust_bench.py [--repeat 7]

No cluster: each row is one render-time step, timed as gitopsd runs it and
as the peer command line does the same job, alternately, in one run (the
machine is shared and noisy: quote the ratios, not the seconds).

- helm file:// dependency: gitopsd's render of a chart whose library chart
  sits beside it in the repository (copied to a private dir, `helm package`,
  `helm template`) vs what Argo CD runs: `helm dependency build` on the chart
  then `helm template` (on a copy, as gitopsd must not write the checkout).

Each figure is the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gitopsd.engine import render  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def side_by_side(repeat: int, ours: Callable[[], object], peer: Callable[[], object]) -> tuple[float, float]:
    """Medians of `repeat` runs of each, alternating which goes first."""
    a, b = [], []
    for i in range(repeat):
        if i % 2:
            b.append(timed(peer))
            a.append(timed(ours))
        else:
            a.append(timed(ours))
            b.append(timed(peer))
    return statistics.median(a), statistics.median(b)


def tool_env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "HELM_CACHE_HOME": str(home / "c"),
            "HELM_CONFIG_HOME": str(home / "cfg"), "HELM_DATA_HOME": str(home / "d")}


# --------------------------------------------------------------------------


def chart(root: Path, rel: str, name: str, deps: str = "", objects: int = 20) -> None:
    d = root / rel
    (d / "templates").mkdir(parents=True)
    (d / "Chart.yaml").write_text(f"apiVersion: v2\nname: {name}\nversion: 1.0.0\n{deps}")
    for i in range(objects):
        (d / "templates" / f"cm{i}.yaml").write_text(
            f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{{{ .Chart.Name }}}}-{i}\n"
            f"data:\n  n: \"{i}\"\n")


def helm_local_dependency(work: Path, repeat: int) -> tuple[str, float, float]:
    repo = work / "helm-repo"
    chart(repo, "charts/app", "app",
          "dependencies:\n  - name: common\n    version: 1.0.0\n    repository: file://../common\n")
    chart(repo, "charts/common", "common")
    helm = str(render.find_tool("helm"))

    def ours() -> None:
        assert len(render.build(repo, "charts/app", kind="helm", namespace="bench").manifests) == 40

    def peer() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "repo"
            shutil.copytree(repo, copy)
            env = tool_env(Path(tmp))
            subprocess.run([helm, "dependency", "build", "charts/app", "--skip-refresh"], cwd=copy, env=env,
                           check=True, capture_output=True)
            out = subprocess.run([helm, "template", "app", "charts/app", "--namespace", "bench"], cwd=copy,
                                 env=env, check=True, capture_output=True, text=True).stdout
            assert out.count("kind: ConfigMap") == 40

    a, b = side_by_side(repeat, ours, peer)
    return "helm chart + file:// dependency (40 objects)", a, b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gitopsd-trust-bench-"))
    try:
        rows = [helm_local_dependency(work, args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedians of {args.repeat} runs; ratio = gitopsd / peer (lower is better)")
    print(f"{'step':52}{'gitopsd':>10}{'peer':>10}{'ratio':>8}")
    for name, ours, peer in rows:
        print(f"{name:52}{ours * 1000:>8.0f}ms{peer * 1000:>8.0f}ms{ours / peer:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
