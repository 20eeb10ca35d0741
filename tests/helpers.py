"""Helpers shared by the cluster tests: real Git repositories and the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Ada Author", "GIT_AUTHOR_EMAIL": "ada@example.com",
    "GIT_COMMITTER_NAME": "Cy Committer", "GIT_COMMITTER_EMAIL": "cy@example.com",
    "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1",
}


class GitRepo:
    """A working clone pushing to a local bare repository (the "remote")."""

    def __init__(self, root: Path) -> None:
        self.bare = root / "remote.git"
        self.work = root / "work"
        root.mkdir(parents=True, exist_ok=True)
        self._git("init", "-q", "--bare", "-b", "main", str(self.bare), cwd=root)
        self._git("init", "-q", "-b", "main", str(self.work), cwd=root)
        self._git("remote", "add", "origin", str(self.bare))

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def _git(self, *args: str, cwd: Path | None = None) -> str:
        env = {**os.environ, **GIT_ENV}
        return subprocess.run(["git", *args], cwd=cwd or self.work, env=env, check=True,
                              capture_output=True, text=True).stdout.strip()

    def write(self, path: str, content) -> None:
        """Write a file; dicts and lists of dicts become (multi-document) YAML."""
        target = self.work / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            content = yaml.safe_dump(content, sort_keys=False)
        elif isinstance(content, list):
            content = yaml.safe_dump_all(content, sort_keys=False)
        target.write_text(content)

    def remove(self, path: str) -> None:
        self._git("rm", "-q", "-r", path)

    def commit(self, message: str = "change") -> str:
        self._git("add", "-A")
        self._git("commit", "-q", "--allow-empty", "-m", message)
        self._git("push", "-q", "origin", "main")
        return self._git("rev-parse", "HEAD")


def gitopsd(*args: str, kubeconfig: Path, cache: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the real `gitopsd` command line; returns the completed process."""
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "GITOPSD_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "gitopsd", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def gitopsd_json(*args: str, kubeconfig: Path, cache: Path, expect: int | None = None) -> tuple[int, dict]:
    proc = gitopsd(*args, "--output", "json", kubeconfig=kubeconfig, cache=cache)
    if expect is not None:
        assert proc.returncode == expect, f"exit {proc.returncode}, wanted {expect}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    try:
        return proc.returncode, json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"not JSON (exit {proc.returncode}):\n{proc.stdout}\nstderr:\n{proc.stderr}") from None


def configmap(name: str, data: dict, **meta) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, **meta}, "data": data}


def deployment(name: str, *, replicas: int = 1, image: str = "nginx:1.27", **spec_extra) -> dict:
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [{"name": name, "image": image,
                                                       "ports": [{"containerPort": 80}]}]}},
                 **spec_extra},
    }


def wait_for(what: str, check, timeout: float = 60.0, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
