"""The web view in a real browser: Debian's headless Chromium, driven by selenium through chromedriver.

One daemon runs the sample apps (hack/quickstart.py's config over a remote
seeded from sample-repo/) and an app of the test's own with a Secret. The
browser sees the apps table, a push arrive without a reload, a hand edit
named with the manager that made it, and a transition's diff — never the
Secret's value, in the text or anywhere in the DOM.

Screenshots go to $GITOPSD_SCREENSHOTS (default build/screenshots/); the
README's pictures are these, taken with GITOPSD_SCREENSHOTS=docs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import configmap, wait_audit, wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("sample_namespaces")]   # fixed namespaces: take turns

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_NAMESPACES = ("web-dev", "web-staging", "web-production")
SECRET_VALUE = "browser-must-never-see-this-4Rt"
ROTATED_VALUE = "nor-this-rotated-one-8Qw"
SHOTS = Path(os.environ.get("GITOPSD_SCREENSHOTS") or ROOT / "build" / "screenshots")


@pytest.fixture
def browser():
    """Headless Chromium. Fails (never skips) without it: .ci/run installs chromium and chromium-driver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    driver_bin = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    assert Path(chromium).exists() and Path(driver_bin).exists(), \
        "Debian's chromium and chromium-driver are needed (apt-get install chromium chromium-driver; .ci/run does)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,760", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def sample_apps(kube):
    """The sample overlays write to fixed namespaces: start without an earlier run's objects, end without ours."""
    def clear() -> None:
        nss = kube.resource("v1", "Namespace")
        for ns in SAMPLE_NAMESPACES:
            kube.delete(nss, ns)
        wait_for("sample namespaces gone", lambda: all(kube.get(nss, n) is None for n in SAMPLE_NAMESPACES), 180)
    clear()
    yield
    clear()


def seed_remote(repo, namespace: str) -> None:
    shutil.copytree(ROOT / "sample-repo", repo.work, dirs_exist_ok=True)
    repo.write("vault/app.yaml", vault(namespace, mode="blue"))
    repo.commit("sample-repo, and a vault app with a Secret")


def vault(namespace: str, *, mode: str, password: str = SECRET_VALUE) -> list[dict]:
    return [configmap("vault-settings", {"mode": mode}),
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vault-creds"}, "type": "Opaque",
             "stringData": {"password": password}}]


def write_config(path: Path, repo, namespace: str) -> Path:
    from quickstart import write_config as quickstart_config   # hack/ is on sys.path (conftest)

    quickstart_config(path, repo.bare)   # the three sample apps, as `make run` writes them
    config = yaml.safe_load(path.read_text())
    config["apps"].append({"name": "vault", "repo": repo.url, "ref": "main", "path": "vault", "namespace": namespace,
                           "interval": "1h", "selfHeal": True})
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def shot(driver, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"web-view-{name}.png"
    assert driver.save_screenshot(str(path)), path
    return path


def text_of(driver, css: str) -> str:
    """The element's visible text, read in one step: the page re-renders on every live update, so an
    element found first and read after may be gone."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : ''", css)


def click(driver, css: str) -> None:
    """Click the element as a person would (a real click event), found and clicked in one step."""
    assert driver.execute_script(
        "const e = document.querySelector(arguments[0]); if (!e) return false; e.click(); return true", css), css


def dom(driver) -> str:
    return driver.execute_script("return document.documentElement.outerHTML + document.body.innerText")


def test_the_browser_shows_the_apps_a_live_push_a_drift_with_its_manager_and_never_a_secret(
        browser, sample_apps, repo, kube, namespace, tmp_path, start_daemon):
    from selenium.webdriver.common.by import By

    seed_remote(repo, namespace)
    daemon = start_daemon(write_config(tmp_path / "config.yaml", repo, namespace), "--no-leader-elect")
    wait_audit(daemon, "vault applied", app="vault", result="Applied")

    # The apps table: every sample app and ours, each row with its result.
    browser.get(daemon.url + "/")
    for app in ("web-dev", "web-staging", "web-production", "vault"):
        wait_for(f"row {app}", lambda app=app: text_of(browser, f'tr[data-app="{app}"]'), 30)
    wait_for("every sample app past Pending", lambda: all(
        "Pending" not in text_of(browser, f'tr[data-app="{a}"]') for a in ("web-dev", "web-staging", "web-production")),
        120)
    assert "sample-repo, and a vault app with a Secret" in text_of(browser, 'tr[data-app="vault"]')
    wait_for("the stream is live", lambda: "live" in text_of(browser, "#live"), 15)
    shot(browser, "apps")

    # A push shows up without a reload (a marker set on this page survives).
    browser.execute_script("window.__sameDocument = 42")
    repo.write("vault/app.yaml", vault(namespace, mode="green", password=ROTATED_VALUE))
    repo.commit("vault: green, and a rotated password, pushed while the page is open")
    wait_for("the push on the page", lambda: "rotated password, pushed while" in text_of(browser, 'tr[data-app="vault"]'), 30)
    assert browser.execute_script("return window.__sameDocument") == 42, "the page reloaded"

    # Filter and sort work in the page.
    search = browser.find_element(By.CSS_SELECTOR, "#filter")
    search.send_keys("web-prod")
    rows = "return [...document.querySelectorAll('#apps tbody tr')].map((tr) => tr.dataset.app)"
    wait_for("filtered", lambda: browser.execute_script(rows) == ["web-production"], 10)
    search.clear()
    search.send_keys(" ")   # clear() fires no input event
    wait_for("unfiltered", lambda: len(browser.execute_script(rows)) == 4, 10)

    # A hand edit: the app page names the manager that made it.
    cms = kube.resource("v1", "ConfigMap")
    kube.request("PATCH", f"{cms.path(namespace)}/vault-settings", query={"fieldManager": "hand-editor"},
                 content_type="application/merge-patch+json", body={"data": {"mode": "edited by hand"}})
    click(browser, 'tr[data-app="vault"] a')
    wait_for("the drift with its manager", lambda: "hand-editor" in text_of(browser, "#drifts"), 30)
    assert browser.current_url.endswith("/apps/vault")
    assert "vault-creds" in text_of(browser, "#objects") and "Current" in text_of(browser, "#objects")
    wait_for("the chain verified", lambda: "OK:" in text_of(browser, "#verify"), 10)
    browser.set_window_size(1440, 1500)   # the whole page in the picture
    shot(browser, "app")

    # A transition's page: the diff, the Secret's change masked; then a deep link opens it afresh.
    click(browser, "#history tbody tr:first-child a")
    wait_for("the push's diff", lambda: "vault-creds" in text_of(browser, "#diff"), 15)
    diff = text_of(browser, "#diff")
    assert "-  mode: blue" in diff and "+  mode: green" in diff and "<redacted: changed>" in diff, diff
    deep = browser.current_url
    assert "/apps/vault/history/" in deep
    browser.execute_script("document.getElementById('diff').scrollIntoView()")
    shot(browser, "transition")
    browser.get(deep)
    wait_for("the deep link", lambda: "vault-creds" in text_of(browser, "#diff"), 15)

    for path in ("/", "/apps/vault", deep.removeprefix(daemon.url)):
        browser.get(daemon.url + path)
        wait_for(f"{path} rendered", lambda: "Loading" not in text_of(browser, "main"), 15)
        page = dom(browser)
        assert SECRET_VALUE not in page and ROTATED_VALUE not in page, path
