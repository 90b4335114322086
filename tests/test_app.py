"""The web app in a real browser: `python app.py` on 127.0.0.1 with the tiny model, driven by
headless Chromium through Selenium. A tiny geometry run ends with the 3D viewer and the downloads;
an empty mesh, an oversized upload and a path override are refused with clear messages.
Screenshots go to pytest's tmp folder."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("browser tests need Chromium and its driver: apt-get install chromium chromium-driver",
                allow_module_level=True)
pytest.importorskip("selenium", reason="browser tests need selenium: pip install -r requirements-app.txt")
pytest.importorskip("gradio", reason="the web app needs gradio: pip install -r requirements-app.txt")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

import distributed  # noqa: E402

pytestmark = pytest.mark.slow
UPLOAD_LIMIT_MB = 1
# The geometry test's run: shortest SDF pretraining that keeps a surface on the 32 grid (as in
# tests/test_tensorboard.py), two iterations, no turntable.
TINY_KEYS = "sdf_init_iter=60\nmesh_scale=2.1\nsdf_init_shape_scale=[1,1,1]\nvideo_frames=0\nhash_table_log2=16"




def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def app(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(URL, runs folder) of an app started as a user would, on a free local port."""
    folder = tmp_path_factory.mktemp("app")
    runs, port = folder / "runs", distributed.free_port()
    log = (folder / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--device", "cpu",
                             "--sd-model", str(tiny_sd_path), "--runs-dir", str(runs),
                             "--max-upload-mb", str(UPLOAD_LIMIT_MB)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        assert proc.poll() is None, f"app.py exited: {(folder / 'app.log').read_text()}"
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False
    try:
        wait_for(up, 120, "the app to serve its page")
        yield url, runs
    finally:
        proc.terminate()          # the app stops its runs and removes its uploads
        proc.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500",
                "--enable-unsafe-swiftshader", "--use-angle=swiftshader"):   # WebGL for the 3D viewer
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(app: tuple[str, Path], browser: webdriver.Chrome, request: pytest.FixtureRequest,
         tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """A fresh page; its screenshot is saved (also when the test fails) to the test's tmp folder."""
    browser.get(app[0])
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#start"), 60, "the form")
    try:
        yield browser
    finally:
        browser.save_screenshot(str(tmp_path / f"{request.node.name}.png"))


def type_into(page: webdriver.Chrome, elem_id: str, text: str) -> None:
    field = page.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    field.clear()
    field.send_keys(text)


def status(page: webdriver.Chrome) -> str:
    return page.find_element(By.CSS_SELECTOR, "#status textarea").get_attribute("value") or ""


def upload(page: webdriver.Chrome, path: Path) -> None:
    page.find_element(By.CSS_SELECTOR, "#mesh input[type=file]").send_keys(str(path))


def test_tiny_geometry_run_ends_in_the_viewer_with_downloads(page: webdriver.Chrome, app: tuple[str, Path]) -> None:
    type_into(page, "prompt", "a cup")
    type_into(page, "seed", "7")
    type_into(page, "iterations", "2")
    type_into(page, "extra", TINY_KEYS)
    page.find_element(By.CSS_SELECTOR, "#start").click()
    wait_for(lambda: status(page).startswith(("finished", "failed", "error")), 420, "the run to end")
    assert status(page).startswith("finished"), status(page)
    assert "iteration 2/2" in status(page)

    wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#viewer canvas"), 60, "the 3D viewer")
    links = wait_for(lambda: page.find_elements(By.CSS_SELECTOR, "#downloads a[href]"), 30, "download links")
    names = {a.get_attribute("href").rsplit("/", 1)[-1] for a in links}
    assert {"mesh.obj", "mesh.mtl", "mesh.glb"} <= names
    assert page.find_element(By.CSS_SELECTOR, "#validation img").get_attribute("src")
    # The run went where the app put it, with the form's values.
    (run_dir,) = list(app[1].glob("*/geometry"))
    assert (run_dir / "dmtet_mesh" / "mesh.glb").is_file() and (run_dir / "log.jsonl").read_text().count("\n") == 2


def test_an_empty_mesh_upload_gets_the_mesh_checks_message(page: webdriver.Chrome, tmp_path: Path) -> None:
    empty = tmp_path / "empty.obj"
    empty.write_bytes(b"")
    upload(page, empty)
    wait_for(lambda: "empty" in page.find_element(By.CSS_SELECTOR, "#mesh").text, 30, "the upload")
    type_into(page, "prompt", "a cup")
    page.find_element(By.CSS_SELECTOR, "#start").click()
    wait_for(lambda: status(page), 30, "a status")
    assert status(page) == "error: refused upload: mesh file 'empty.obj' contains no triangle faces " \
                           "(trimesh loaded a Scene)"


def test_an_oversized_upload_and_a_path_override_are_refused(page: webdriver.Chrome, tmp_path: Path) -> None:
    big = tmp_path / "big.obj"
    big.write_bytes(b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n" + b"#" * (UPLOAD_LIMIT_MB * 2**20 + 1))
    upload(page, big)
    toast = wait_for(lambda: [e.text for e in page.find_elements(By.CSS_SELECTOR, ".toast-body")
                              if "maximum allowed size" in e.text], 30, "the upload refusal")
    assert "big.obj" in toast[0]

    elsewhere = tmp_path / "elsewhere"
    type_into(page, "prompt", "a cup")
    type_into(page, "extra", f"out_dir={elsewhere}")
    page.find_element(By.CSS_SELECTOR, "#start").click()
    wait_for(lambda: status(page), 30, "a status")
    assert status(page).startswith("error: refused: 'out_dir' names a file or folder on the server")
    assert not elsewhere.exists()
