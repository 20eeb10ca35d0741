"""Helm chart dependencies: vendored ones used as they are, file:// ones in the repository built
offline, ones from a repository on the network fetched only when the app allows it.

Real helm throughout (the pinned binary of the test bed), and a real chart
repository: charts packaged by `helm package`, indexed by `helm repo index`,
served over loopback HTTP by a server that counts what it is asked for.
No cluster is needed: the renderer never talks to one.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitopsd import config
from gitopsd.engine.render import find_tool, render
from gitopsd.errors import RenderError


def chart(root: Path, rel: str, name: str, *, dependencies: str = "", template: str | None = None) -> Path:
    """A chart at root/rel whose one template is a ConfigMap named after the chart (or `template`)."""
    d = root / rel
    (d / "templates").mkdir(parents=True)
    (d / "Chart.yaml").write_text(f"apiVersion: v2\nname: {name}\nversion: 1.0.0\n{dependencies}")
    (d / "templates" / "cm.yaml").write_text(template or (
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Chart.Name }}-cm\ndata:\n  from: {{ .Chart.Name }}\n"))
    return d


def dep(name: str, repository: str, version: str = "1.0.0") -> str:
    return f"  - name: {name}\n    version: {version}\n    repository: '{repository}'\n"


def names(manifests) -> list[str]:
    return sorted(m.obj["metadata"]["name"] for m in manifests)


def refused(*args, **kwargs) -> RenderError:
    with pytest.raises(RenderError) as info:
        render(*args, **kwargs)
    return info.value


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


class ChartRepo:
    """A helm chart repository on loopback HTTP: index.yaml plus packaged charts; counts requests."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.dir.mkdir(parents=True)
        self.requests: list[str] = []
        repo = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(repo.dir), **kwargs)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                repo.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, src: Path) -> None:
        helm = str(find_tool("helm"))
        subprocess.run([helm, "package", str(src), "--destination", str(self.dir)], check=True,
                       capture_output=True, env=helm_env(self.dir.parent))
        subprocess.run([helm, "repo", "index", str(self.dir), "--url", self.url], check=True,
                       capture_output=True, env=helm_env(self.dir.parent))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def helm_env(home: Path) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", ""), "HOME": str(home), "HELM_CACHE_HOME": str(home / "c"),
            "HELM_CONFIG_HOME": str(home / "cfg"), "HELM_DATA_HOME": str(home / "d")}


@pytest.fixture
def chart_repo(tmp_path) -> Iterator[ChartRepo]:
    repo = ChartRepo(tmp_path / "chart-repo" / "charts")
    yield repo
    repo.close()


# --------------------------------------------------------------------------


def test_vendored_subchart_is_used_without_building(tmp_path):
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("redis", "https://charts.example.invalid"))
    chart(repo, "app/charts/redis", "redis")

    assert names(render(repo, "app", namespace="web")) == ["app-cm", "redis-cm"]


def test_vendored_subchart_archive_is_used_without_building(tmp_path, chart_repo):
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("redis", chart_repo.url))
    chart_repo.publish(chart(tmp_path / "src", "redis", "redis"))
    (repo / "app" / "charts").mkdir()
    (repo / "app" / "charts" / "redis-1.0.0.tgz").write_bytes((chart_repo.dir / "redis-1.0.0.tgz").read_bytes())

    assert names(render(repo, "app", namespace="web")) == ["app-cm", "redis-cm"]
    assert chart_repo.requests == []


def test_local_file_dependency_is_built_offline_and_the_checkout_is_not_written(tmp_path):
    repo = tmp_path / "repo"
    chart(repo, "charts/app", "app", dependencies="dependencies:\n" + dep("common", "file://../common"))
    chart(repo, "charts/common", "common")
    before = tree(repo)

    manifests = render(repo, "charts/app", namespace="web")

    assert names(manifests) == ["app-cm", "common-cm"]
    assert tree(repo) == before          # built in the render's private dir, not in the checkout


def test_local_dependency_beside_a_vendored_remote_one_fetches_nothing(tmp_path, chart_repo):
    chart_repo.publish(chart(tmp_path / "src", "redis", "redis"))
    repo = tmp_path / "repo"
    chart(repo, "charts/app", "app",
          dependencies="dependencies:\n" + dep("redis", chart_repo.url) + dep("common", "file://../common"))
    chart(repo, "charts/app/charts/redis", "redis", template=(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: vendored-redis\n"))
    chart(repo, "charts/common", "common")

    manifests = render(repo, "charts/app", namespace="web")

    assert names(manifests) == ["app-cm", "common-cm", "vendored-redis"]   # the committed subchart, as committed
    assert chart_repo.requests == []


def test_local_dependencies_of_a_local_dependency_are_built_first(tmp_path):
    repo = tmp_path / "repo"
    chart(repo, "charts/app", "app", dependencies="dependencies:\n" + dep("mid", "file://../mid"))
    chart(repo, "charts/mid", "mid", dependencies="dependencies:\n" + dep("base", "file://../../lib/base"))
    chart(repo, "lib/base", "base")

    assert names(render(repo, "charts/app", namespace="web")) == ["app-cm", "base-cm", "mid-cm"]


def test_local_dependencies_in_a_cycle_are_refused(tmp_path):
    repo = tmp_path / "repo"
    chart(repo, "charts/a", "a", dependencies="dependencies:\n" + dep("b", "file://../b"))
    chart(repo, "charts/b", "b", dependencies="dependencies:\n" + dep("a", "file://../a"))

    err = refused(repo, "charts/a", namespace="web")

    assert err.problems == ["charts/a: local chart dependencies form a cycle: charts/a -> charts/b -> charts/a"]


def test_local_dependency_outside_the_repository_is_refused(tmp_path):
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("evil", "file://../../outside"))
    chart(tmp_path, "outside", "evil")

    err = refused(repo, "app", namespace="web")

    assert err.problems == ["app: dependency 'evil' (file://../../outside) resolves outside the repository"]


def test_local_dependency_through_a_link_out_of_the_repository_is_refused(tmp_path):
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("evil", "file://../lib"))
    chart(tmp_path, "outside", "evil")
    (repo / "lib").symlink_to(tmp_path / "outside")

    err = refused(repo, "app", namespace="web")

    assert err.problems == ["app: dependency 'evil' (file://../lib) resolves outside the repository"]


def test_remote_dependency_is_refused_by_default_and_nothing_is_fetched(tmp_path, chart_repo):
    chart_repo.publish(chart(tmp_path / "src", "redis", "redis"))
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("redis", chart_repo.url))

    err = refused(repo, "app", namespace="web")

    assert err.problems == [f"app: dependency 'redis' ({chart_repo.url}) is not vendored under app/charts/ and "
                            "would be fetched from the network at render time, from outside the reviewed "
                            "commit; refused"]
    assert "allowRemoteDependencies: true" in err.hint
    assert chart_repo.requests == []


def test_remote_dependency_is_fetched_when_the_app_allows_it(tmp_path, chart_repo):
    chart_repo.publish(chart(tmp_path / "src", "redis", "redis"))
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("redis", chart_repo.url))
    before = tree(repo)

    manifests = render(repo, "app", namespace="web", allow_remote_charts=True)

    assert names(manifests) == ["app-cm", "redis-cm"]
    assert "/redis-1.0.0.tgz" in chart_repo.requests
    assert tree(repo) == before


def test_remote_dependency_missing_from_the_repository_fails_naming_it(tmp_path, chart_repo):
    chart_repo.publish(chart(tmp_path / "src", "redis", "redis"))
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("redis", chart_repo.url, version="9.9.9"))

    err = refused(repo, "app", namespace="web", allow_remote_charts=True)

    [problem] = err.problems
    assert problem.startswith("helm dependency build app: failed (exit 1):")
    assert "redis" in problem


def test_dependency_by_repository_alias_is_refused(tmp_path):
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("redis", "@bitnami"))

    err = refused(repo, "app", namespace="web", allow_remote_charts=True)

    assert err.problems == ["app: dependency 'redis' (@bitnami) names a helm repository by alias, and gitopsd "
                            "renders with an empty helm home where no alias exists"]


def test_missing_dependency_without_repository_is_refused(tmp_path):
    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n  - name: lost\n    version: 1.0.0\n")

    err = refused(repo, "app", namespace="web")

    assert err.problems == ["app: dependency 'lost' has no repository and is not under app/charts/"]


def test_helm_allow_remote_dependencies_is_an_app_setting():
    cfg = config.parse("apps:\n  - name: shop\n    repo: https://git.example.com/fleet.git\n"
                       "    helm: {allowRemoteDependencies: true}\n")
    [app] = cfg.apps
    assert app.allow_remote_charts is True
    default = config.parse("apps:\n  - name: shop\n    repo: https://git.example.com/fleet.git\n")
    assert default.apps[0].allow_remote_charts is False


def test_a_vendored_archive_that_is_a_gzip_bomb_is_not_read_to_its_end(tmp_path):
    import gzip
    import io
    import tarfile

    from gitopsd.engine import helm_deps

    repo = tmp_path / "repo"
    chart(repo, "app", "app", dependencies="dependencies:\n" + dep("redis", "https://charts.example.invalid"))
    (repo / "app" / "charts").mkdir()
    bomb = repo / "app" / "charts" / "redis-1.0.0.tgz"
    with gzip.open(bomb, "wb") as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        zeros = tarfile.TarInfo("redis/zeros")
        zeros.size = 64 * 1024 * 1024          # 64 MiB of zeros ahead of Chart.yaml: ~64 KiB on disk
        tar.addfile(zeros, io.BytesIO(bytes(zeros.size)))
        meta = b"apiVersion: v2\nname: redis\nversion: 1.0.0\n"
        info = tarfile.TarInfo("redis/Chart.yaml")
        info.size = len(meta)
        tar.addfile(info, io.BytesIO(meta))
    assert bomb.stat().st_size < 1024 * 1024

    assert helm_deps.vendored(repo / "app") == set()   # not read past the cap: not taken as vendored
    err = refused(repo, "app", namespace="web")
    assert err.problems[0].startswith("app: dependency 'redis' (https://charts.example.invalid) is not vendored")


def test_a_remote_dependency_beside_a_vendored_local_one_builds_both(tmp_path, chart_repo):
    chart_repo.publish(chart(tmp_path / "src", "redis", "redis"))
    repo = tmp_path / "repo"
    chart(repo, "charts/app", "app",
          dependencies="dependencies:\n" + dep("redis", chart_repo.url) + dep("common", "file://../common"))
    chart(repo, "charts/app/charts/common", "common")     # vendored, and also in the repository
    chart(repo, "charts/common", "common")

    manifests = render(repo, "charts/app", namespace="web", allow_remote_charts=True)

    assert names(manifests) == ["app-cm", "common-cm", "redis-cm"]
    assert "/redis-1.0.0.tgz" in chart_repo.requests
