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

- ssh commit signature: gitopsd's verdict on a signed commit
  (`ssh-keygen -Y find-principals` + `-Y verify` on the commit object, in a
  fresh private dir) vs `git verify-commit` with an allowed-signers file;
  and gitopsd's cached verdict (what every reconcile of an unchanged head
  costs) vs the same peer.
- openpgp commit signature: gitopsd (a throw-away GNUPGHOME, import, verify)
  vs `git verify-commit` against a keyring already holding the key.
- SOPS: gitopsd's render of a directory of age-encrypted Secrets (each
  decrypted in memory through sops) vs `sops --decrypt` of each file, the
  usual `sops -d … | kubectl apply -f -` pipeline's decrypting half; and the
  same with kustomize (a private copy of the inputs, plaintext swapped in,
  `kustomize build`) vs `sops -d` of each file + `kustomize build`.

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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gitopsd.engine import decrypt, render, signature  # noqa: E402
from testbed import build as tb_build  # noqa: E402


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


def git(*args: str, cwd: Path, env: dict | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}).stdout.strip()


def signed_repo(work: Path, name: str, sign_config: list[str], env: dict | None = None) -> tuple[Path, str]:
    repo = work / name
    repo.mkdir()
    git("init", "-q", "-b", "main", cwd=repo)
    (repo / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    git("add", ".", cwd=repo)
    git("-c", "user.name=bench", "-c", "user.email=bench@example.com", *sign_config, "commit", "-q", "-S",
        "-m", "signed", cwd=repo, env=env)
    return repo, git("rev-parse", "HEAD", cwd=repo)


def ssh_signature(work: Path, repeat: int) -> list[tuple[str, float, float]]:
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@example.com", "-f", str(key)],
                   check=True)
    pub = (work / "id_ed25519.pub").read_text()
    repo, sha = signed_repo(work, "ssh-repo", ["-c", "gpg.format=ssh", "-c", f"user.signingkey={key}"])
    keys = signature.TrustedKeys("ssh", (("alice.pub", pub),), "bench")
    signers = work / "allowed_signers"
    signers.write_text(keys.allowed_signers)
    raw = subprocess.run(["git", "cat-file", "commit", sha], cwd=repo, check=True, capture_output=True).stdout

    def ours() -> None:
        assert signature._judge(raw, sha=sha, keys=keys).good

    def cached() -> None:
        assert signature.verify(raw, sha=sha, keys=keys).good

    def peer() -> None:
        git("-c", "gpg.format=ssh", "-c", f"gpg.ssh.allowedSignersFile={signers}", "verify-commit", sha, cwd=repo)

    signature.verify(raw, sha=sha, keys=keys)
    a, b = side_by_side(repeat, ours, peer)
    c, d = side_by_side(repeat, cached, peer)
    return [("ssh signature (a new commit)", a, b), ("ssh signature (the same head again: cached)", c, d)]


def openpgp_signature(work: Path, repeat: int) -> tuple[str, float, float]:
    home = work / "gnupg"
    home.mkdir(mode=0o700)
    env = {"GNUPGHOME": str(home)}
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "bob@example.com", "ed25519", "sign",
                    "never"], check=True, capture_output=True, env={**os.environ, **env})
    armored = subprocess.run(["gpg", "--armor", "--export", "bob@example.com"], check=True, capture_output=True,
                             text=True, env={**os.environ, **env}).stdout
    repo, sha = signed_repo(work, "gpg-repo", ["-c", "user.signingkey=bob@example.com"], env=env)
    keys = signature.TrustedKeys("openpgp", (("bob.asc", armored),), "bench")
    raw = subprocess.run(["git", "cat-file", "commit", sha], cwd=repo, check=True, capture_output=True).stdout

    def ours() -> None:
        assert signature._judge(raw, sha=sha, keys=keys).good

    def peer() -> None:
        git("verify-commit", sha, cwd=repo, env=env)

    a, b = side_by_side(repeat, ours, peer)
    return "openpgp signature (a new commit)", a, b


def sops_secrets(work: Path, repeat: int, n: int = 10) -> list[tuple[str, float, float]]:
    age_keygen, sops = str(tb_build.binary("age-keygen")), str(render.find_tool("sops"))
    identity = subprocess.run([age_keygen], check=True, capture_output=True, text=True).stdout
    secret_key = next(line for line in identity.splitlines() if line.startswith("AGE-SECRET-KEY-"))
    recipient = subprocess.run([age_keygen, "-y"], input=secret_key, check=True, capture_output=True,
                               text=True).stdout.strip()
    plain_dir, kust_dir = work / "sops" / "plain", work / "sops" / "kustomize"
    plain_dir.mkdir(parents=True)
    env = {**os.environ, "SOPS_AGE_KEY": secret_key, "SOPS_DISABLE_VERSION_CHECK": "1"}
    for i in range(n):
        clear = (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: s{i}\n"
                 f"stringData:\n  password: pw-{i}-{os.urandom(8).hex()}\n")
        (work / "clear.yaml").write_text(clear)
        enc = subprocess.run([sops, "--encrypt", "--age", recipient, "--encrypted-regex", "^(data|stringData)$",
                              str(work / "clear.yaml")], check=True, capture_output=True, text=True, env=env).stdout
        (plain_dir / f"s{i}.yaml").write_text(enc)
    (work / "clear.yaml").unlink()
    shutil.copytree(plain_dir, kust_dir)
    (kust_dir / "kustomization.yaml").write_text(
        "resources:\n" + "".join(f"  - s{i}.yaml\n" for i in range(n)))
    keys = decrypt.Keys(age=(secret_key,))
    kustomize = str(render.find_tool("kustomize"))

    def ours(where: Path, kind: str) -> Callable[[], None]:
        def run() -> None:
            built = render.build(where, ".", kind=kind, namespace="bench", decryption=keys)
            assert not built.problems and len(built.manifests) == n, built.problems
        return run

    def decrypt_all(where: Path) -> list[str]:
        return [subprocess.run([sops, "--decrypt", str(where / f"s{i}.yaml")], check=True, capture_output=True,
                               text=True, env=env).stdout for i in range(n)]

    def peer_plain() -> None:
        assert len(decrypt_all(plain_dir)) == n

    def peer_kustomize() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            for i, text in enumerate(decrypt_all(kust_dir)):
                (Path(tmp) / f"s{i}.yaml").write_text(text)
            shutil.copy(kust_dir / "kustomization.yaml", tmp)
            subprocess.run([kustomize, "build", tmp], check=True, capture_output=True)

    a, b = side_by_side(repeat, ours(plain_dir, "plain"), peer_plain)
    c, d = side_by_side(repeat, ours(kust_dir, "kustomize"), peer_kustomize)
    return [(f"sops: {n} encrypted Secrets, plain directory", a, b),
            (f"sops: {n} encrypted Secrets, kustomize", c, d)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gitopsd-trust-bench-"))
    try:
        rows = [helm_local_dependency(work, args.repeat), *ssh_signature(work, args.repeat),
                openpgp_signature(work, args.repeat), *sops_secrets(work, args.repeat)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedians of {args.repeat} runs; ratio = gitopsd / peer (lower is better)")
    print(f"{'step':52}{'gitopsd':>12}{'peer':>12}{'ratio':>8}")
    for name, ours, peer in rows:
        print(f"{name:52}{ours * 1000:>10.2f}ms{peer * 1000:>10.2f}ms{ours / peer:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
