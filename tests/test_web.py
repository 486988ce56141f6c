"""The web page at `/` and the API docs: every file they load comes from the service itself (in
process, by parsing the HTML), an installed service has those files (the wheel and sdist), and in
a real headless browser (Debian's chromium, Selenium) with every other host unreachable, the page
classifies examples/cat.png as "cat" and Swagger UI and ReDoc render."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient

from quicknet.serve import web
from quicknet.serve.classifier import rest as classifier_rest
from quicknet.serve.config import Settings
from quicknet.serve.main import REST_FRONTS
from quicknet.serve.runtime import Runtime
from quicknet.serve.transport.app import create_app
from quicknet.testing import REPO, start_server

KEY = "web-test-key-0123456789abcdef"
BASE = "http://testserver"
EXPECTED_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
PAGES = ("/", "/docs", "/redoc")


class Refs(HTMLParser):
    """What a page loads (scripts, style sheets, icons, images) and where it links to."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in ("script", "img") and a.get("src"):
            self.loads.append(a["src"])
        elif tag == "link" and a.get("href"):
            self.loads.append(a["href"])
        elif tag == "a" and a.get("href"):
            self.links.append(a["href"])


def refs(html: str) -> Refs:
    parser = Refs()
    parser.feed(html)
    return parser


def _client(**settings) -> TestClient:
    """The app with the real server's list of fronts (quicknet.serve.main), so the page is registered there."""
    return TestClient(create_app(Runtime(Settings(**settings)), REST_FRONTS))


@pytest.mark.parametrize("page", PAGES)
def test_a_page_and_everything_it_loads_are_served_here(page):
    with _client() as client:
        answer = client.get(page)
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == "text/html; charset=utf-8"
        html = answer.text
        assert not re.search(r"https?://", html), "no absolute URL: nothing from a CDN or another host"
        loads = refs(html).loads
        assert any(ref.endswith(".js") for ref in loads), loads
        for ref in loads:
            url = urlsplit(urljoin(BASE + page, ref))
            assert f"{url.scheme}://{url.netloc}" == BASE, ref
            asset = client.get(url.path)
            assert asset.status_code == 200, ref
            expected = EXPECTED_TYPES[Path(url.path).suffix]
            assert asset.headers["content-type"].split(";")[0] == expected, ref
            assert asset.headers["x-content-type-options"] == "nosniff"
            assert asset.content


def test_the_page_links_to_the_docs_and_metrics():
    with _client() as client:
        links = {urlsplit(urljoin(BASE + "/", href)).path for href in refs(client.get("/").text).links}
        assert {"/docs", "/redoc", "/metrics"} <= links
        for path in links:
            assert client.get(path).status_code == 200, path


def test_the_browser_is_told_to_load_nothing_from_other_hosts():
    """Each page's Content-Security-Policy names no host: the browser itself refuses anything a
    bundle would fetch from elsewhere (ReDoc's bundle shows a logo from its maker's CDN)."""
    with _client() as client:
        for page in PAGES:
            policy = client.get(page).headers["content-security-policy"]
            directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
            sources = {source for value in directives.values() for source in value.split()}
            assert sources <= {"'self'", "'none'", "'unsafe-inline'", "data:", "blob:"}, (page, policy)
            assert "default-src" in directives, page
        page = dict(d.strip().split(" ", 1) for d in client.get("/").headers["content-security-policy"].split(";"))
    assert page["default-src"] == "'none'" and page["script-src"] == "'self'", "the page runs no inline script"
    assert page["img-src"] == "'self' blob:", "the previews are blob: URLs of the picked files"


def test_with_api_keys_the_page_and_docs_stay_open_and_classify_does_not(tmp_path):
    """A browser loads a page without sending a key, so the page (static, no data) is open; it asks
    for the key when /classify answers 401."""
    keys = tmp_path / "keys"
    keys.write_text(KEY + "\n")
    with _client(api_keys_file=keys) as client:
        for page in PAGES:
            assert client.get(page).status_code == 200, page
            for ref in refs(client.get(page).text).loads:
                assert client.get(urlsplit(urljoin(BASE + page, ref)).path).status_code == 200, ref
        assert client.get("/openapi.json").status_code == 200
        refused = client.post("/classify", content=(REPO / "examples" / "cat.png").read_bytes())
        assert refused.status_code == 401
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "image/png"}
        keyed = client.post("/classify", headers=headers, content=b"...")
        assert keyed.status_code == 503 and "not ready" in keyed.json()["error"], "past the key check (no model here)"


def test_assets_are_revalidated_not_sent_again():
    with _client() as client:
        first = client.get("/static/app.js")
        assert first.headers["cache-control"] == "no-cache", "an upgraded service is never shown a stale script"
        again = client.get("/static/app.js", headers={"If-None-Match": first.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
        assert client.get("/static/app.js", headers={"If-None-Match": '"other"'}).status_code == 200


def test_only_the_pages_files_are_served_from_static():
    """Licences and the vendor README stay in the package; index.html is served at / only."""
    with _client() as client:
        for path in ("/static/vendor/README.md", "/static/vendor/redoc/LICENSE", "/static/index.html"):
            assert client.get(path).status_code == 404, path


def test_the_web_routes_stay_out_of_the_api_schema():
    with TestClient(create_app(Runtime(Settings()), [classifier_rest, web])) as client:
        paths = set(client.get("/openapi.json").json()["paths"])
    assert "/classify" in paths
    assert not paths & {"/", "/docs", "/redoc"} and not any(p.startswith("/static/") for p in paths)


VENDOR = Path(web.__file__).parent / "static" / "vendor"


def test_the_vendored_files_are_the_recorded_ones():
    """Each vendored file against the SHA-256 its README records (with the version and source)."""
    recorded = dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|$", (VENDOR / "README.md").read_text(), re.M))
    on_disk = {p.relative_to(VENDOR).as_posix(): p for p in VENDOR.rglob("*") if p.is_file() and p.name != "README.md"}
    assert set(recorded) == set(on_disk)
    for name, path in on_disk.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == recorded[name], name
    readme = (VENDOR / "README.md").read_text()
    assert "swagger-ui-dist 5.35.0" in readme and "redoc 2.5.4" in readme


def test_the_wheel_and_sdist_ship_the_page_and_the_docs_assets(tmp_path):
    """An installed service serves them too: pyproject's package-data puts them in both."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for package in ("quicknet",):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    wanted = {
        f"quicknet/serve/web/static/{p.relative_to(web.STATIC).as_posix()}"
        for p in web.STATIC.rglob("*")
        if p.is_file()
    }
    assert "quicknet/serve/web/static/vendor/swagger-ui/swagger-ui-bundle.js" in wanted
    build = "from setuptools import build_meta as b; b.build_wheel('dist'); b.build_sdist('dist')"
    done = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    (wheel,) = (src / "dist").glob("*.whl")
    (sdist,) = (src / "dist").glob("*.tar.gz")
    assert wanted <= set(zipfile.ZipFile(wheel).namelist())
    with tarfile.open(sdist) as tar:
        root = tar.getnames()[0].split("/")[0]
        assert {f"{root}/{name}" for name in wanted} <= set(tar.getnames())


# --- a real browser -----------------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def _need_a_browser() -> None:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "no headless browser: needs Debian's chromium and chromium-driver "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    pytest.importorskip("selenium", reason="selenium (the dev extra) drives the browser")


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """The real server with API keys on: the page must get past a 401 the way a user does."""
    _need_a_browser()
    root = tmp_path_factory.mktemp("web")
    keys = root / "keys"
    keys.write_text(KEY + "\n")
    srv = start_server(root, api_keys_file=keys)
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture
def browser():
    """A fresh headless chromium per test (its own storage), with every host but 127.0.0.1 made
    unresolvable: whatever a page would fetch from a CDN fails, as on a machine without internet."""
    _need_a_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1280,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _other_hosts(driver, origin: str) -> set[str]:
    """The URLs on another origin the browser sent a request to since the last call (Chrome's
    network log); one a Content-Security-Policy refused never left the browser and is not counted."""
    sent, refused = {}, set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            refused.add(params["requestId"])
    return {
        url
        for request, url in sent.items()
        if request not in refused and urlsplit(url).scheme not in ("data", "blob") and not url.startswith(origin + "/")
    }


def test_the_page_classifies_a_picked_image_in_a_browser(browser, keyed_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(keyed_server.url + "/")
    picker = browser.find_element(By.CSS_SELECTOR, "input[type=file]#files")
    assert browser.find_element(By.CSS_SELECTOR, "label[for=files]").text
    picker.send_keys(str(REPO / "examples" / "cat.png"))

    # /classify answers 401: the page asks for a key, focus on its field, and retries with it
    field = WebDriverWait(browser, 60).until(ec.visibility_of_element_located((By.ID, "api-key")))
    assert browser.switch_to.active_element == field, "keyboard users land in the key field"
    assert browser.find_element(By.CSS_SELECTOR, "label[for=api-key]").text == "API key"
    field.send_keys(KEY, Keys.ENTER)

    top = WebDriverWait(browser, 60).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, ".result .labels li:first-child .label"))
    )
    assert top.text == "cat"
    card = browser.find_element(By.CSS_SELECTOR, ".result")
    assert len(card.find_elements(By.CSS_SELECTOR, ".labels li")) == 5
    assert len(card.find_elements(By.CSS_SELECTOR, ".labels meter")) == 5
    assert card.find_element(By.TAG_NAME, "img").get_attribute("alt") == "Image cat.png"
    timing = card.find_element(By.CSS_SELECTOR, ".timing").text
    assert re.search(r"Round trip [\d.]+ ms · server: decode [\d.]+ ms, queue [\d.]+ ms, infer [\d.]+ ms", timing)
    stored = browser.execute_script("return [sessionStorage.getItem('quicknet.apiKey'), localStorage.length]")
    assert stored == [KEY, 0], "the key is kept in this tab's sessionStorage only"
    assert browser.get_cookies() == []
    assert _other_hosts(browser, keyed_server.url) == set()


def test_the_api_docs_render_in_a_browser_without_internet(browser, keyed_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(keyed_server.url + "/docs")
    title = WebDriverWait(browser, 60).until(
        ec.visibility_of_element_located((By.CSS_SELECTOR, ".swagger-ui .info .title"))
    )
    assert "QuickNet Serving" in title.text
    WebDriverWait(browser, 30).until(ec.presence_of_element_located((By.CSS_SELECTOR, ".opblock-summary-path")))
    paths = {e.get_attribute("data-path") for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert "/classify" in paths, paths
    assert _other_hosts(browser, keyed_server.url) == set()

    browser.get(keyed_server.url + "/redoc")
    heading = WebDriverWait(browser, 60).until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".redoc-wrap h1")))
    assert "QuickNet Serving" in heading.text
    assert _other_hosts(browser, keyed_server.url) == set()


def test_docs_try_it_out_classifies_in_a_browser(browser, keyed_server):
    """/docs "Try it out" on /classify as a person does it: authorize with the key, pick cat.png for
    `image`, leave everything else as Swagger UI fills it, Execute: 200 and "cat" (Swagger UI used
    to send its `images` sample, the text "string", beside the file: a 415)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(keyed_server.url + "/docs")
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, ".auth-wrapper .authorize"))).click()
    wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".modal-ux input"))).send_keys(KEY)
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper .authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".modal-ux .btn-done").click()

    op = "#operations-classify-classify_classify_post"
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f"{op} .opblock-summary"))).click()
    wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, f"{op} .try-out__btn"))).click()
    pickers = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f"{op} input[type=file]"))
    pickers[0].send_keys(str(REPO / "examples" / "cat.png"))  # the `image` field
    browser.find_element(By.CSS_SELECTOR, f"{op} .execute").click()
    status = wait.until(
        ec.visibility_of_element_located(
            (By.CSS_SELECTOR, f"{op} .live-responses-table tr.response .response-col_status")
        )
    )
    body = browser.find_element(
        By.CSS_SELECTOR, f"{op} .live-responses-table tr.response .response-col_description"
    ).text
    assert status.text.strip() == "200", body
    assert json.loads(body[body.index("{") : body.rindex("}") + 1])["predictions"][0]["label"] == "cat"
    assert _other_hosts(browser, keyed_server.url) == set()


def test_the_docs_and_the_schema_are_counted_under_their_paths():
    """Not as `endpoint="unmatched"`, which is where unknown paths (scanners) go."""
    from prometheus_client import REGISTRY

    def endpoints() -> dict[str, float]:
        counts: dict[str, float] = {}
        for family in REGISTRY.collect():
            if family.name == "quicknet_request_duration_seconds":
                for s in family.samples:
                    if s.name.endswith("_count"):
                        counts[s.labels["endpoint"]] = counts.get(s.labels["endpoint"], 0) + s.value
        return counts

    before = endpoints()
    with _client() as client:
        for path in ("/openapi.json", "/docs", "/redoc", "/", "/no-such-page"):
            client.get(path)
    after = endpoints()
    for path in ("/openapi.json", "/docs", "/redoc", "/"):
        assert after.get(path, 0) - before.get(path, 0) == 1, path
    assert after.get("unmatched", 0) - before.get("unmatched", 0) == 1, "only the unknown path"
