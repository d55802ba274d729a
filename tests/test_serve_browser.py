"""The web editor in a real headless Chromium against a real `threedis serve` subprocess.

Upload a depth map and drop it again; draw two boxes with mouse drags and type their prompts; move,
resize, nudge and delete a box and undo each with Ctrl+Z; see the service's 422 land beside box 2's
prompt field; render (stage 1 + FLUX) and watch the progress bar move, the step count and the live
previews, then the image, regions overlay and timings; reload, start from an empty editor and restore
the layout and settings from the history gallery. Tiny checkpoints, CPU only. Every wait is bounded.

Screenshots go to the test's temp folder; with THREEDIS_UPDATE_PICTURES=1 they are also written to
docs/pictures/serve-editor.png and serve-result.png (the README's and docs/serve.md's pictures).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)
CHROMEDRIVER = next((p for p in (shutil.which("chromedriver"), "/usr/bin/chromedriver") if p and Path(p).is_file()), None)

# Only a machine without Chromium skips; .ci/run installs it (and its driver) through apt-get.
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install chromium chromium-driver)")

from selenium import webdriver  # noqa: E402  (a test dependency: the `test` extra)
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PICTURES = Path(__file__).resolve().parents[1] / "docs" / "pictures"
START_S = 120     # service start: imports, engine set-up
RENDER_S = 150    # stage 1 + FLUX on the tiny checkpoints, on a busy CPU
UI_S = 15         # anything the page does by itself


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """A `threedis serve` subprocess on a free loopback port: yields its URL; its log is shown on failure."""
    root = tmp_path_factory.mktemp("serve-browser")
    port = _free_port()
    log_path = root / "serve.log"
    env = dict(os.environ, THREEDIS_CACHE=os.environ.get("THREEDIS_CACHE") or str(root / "cache"),
               PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "threedis.engine.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--out", str(root / "out")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"threedis serve exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{url}/", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"threedis serve did not answer within {START_S} s:\n{log_path.read_text(errors='replace')}")
            time.sleep(0.25)
        yield url, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    if CHROMEDRIVER is None:
        pytest.fail(f"Chromium is at {CHROMIUM} but chromedriver is missing: apt-get install chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--force-device-scale-factor=1", "--no-first-run",
                "--disable-extensions", "--disable-background-networking"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver, what, timeout, message):
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: what(d), message=message)


def _model(driver) -> dict:
    return driver.execute_script("return window.threedisEditor.layoutJSON();")


def _drag(driver, canvas, start, end):
    """A mouse drag on the canvas between two points given as fractions of its size."""
    w, h = canvas.size["width"], canvas.size["height"]
    sx, sy = (start[0] - 0.5) * w, (start[1] - 0.5) * h   # Selenium offsets are from the centre
    chain = ActionChains(driver, duration=50)
    chain.move_to_element_with_offset(canvas, int(sx), int(sy)).click_and_hold()
    for k in (1, 2, 3):  # a few intermediate moves, as a hand would make
        chain.move_by_offset(int((end[0] - start[0]) * w / 3), int((end[1] - start[1]) * h / 3))
    chain.release().perform()


def _shot(driver, tmp_path, name):
    path = tmp_path / name
    driver.save_screenshot(str(path))
    if os.environ.get("THREEDIS_UPDATE_PICTURES") == "1":
        from PIL import Image

        PICTURES.mkdir(parents=True, exist_ok=True)  # a 256-colour copy: the noise of the tiny model compresses badly
        Image.open(path).convert("RGB").quantize(256).save(PICTURES / name, optimize=True)
    return path


def _field_error(driver, key) -> str:
    return driver.execute_script(
        "const e = document.querySelector(`[data-field-error=\"${arguments[0]}\"]`); return e ? e.textContent : null;", key)


def test_draw_render_reload_restore(service, browser, tmp_path):
    url, log_path = service
    driver = browser
    try:
        driver.get(url)
        driver.execute_script("localStorage.clear();")
        driver.refresh()
        _wait(driver, lambda d: "profile" in d.find_element(By.ID, "system").text, UI_S,
              "the page never showed the service's profile (GET /system)")
        assert driver.find_element(By.ID, "tiny-note").is_displayed(), "the tiny-checkpoint note is not shown"
        _wait(driver, lambda d: d.find_element(By.ID, "connection").text == "live", UI_S,
              "the event WebSocket did not connect")

        # -- an uploaded depth map shows under the boxes; "No depth" goes back to stage 1 ----------
        from PIL import Image

        ramp = tmp_path / "ramp.png"
        Image.linear_gradient("L").resize((512, 512)).save(ramp)
        driver.find_element(By.ID, "upload-depth").send_keys(str(ramp))
        _wait(driver, lambda d: d.execute_script("return window.threedisEditor.depthShown();"), UI_S,
              "the uploaded depth map is not shown (POST /uploads, GET /uploads/{id})")
        assert "uploaded" in driver.find_element(By.ID, "depth-source").text
        driver.find_element(By.ID, "clear-depth").click()
        assert not driver.execute_script("return window.threedisEditor.depthShown();")

        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("two birds on a branch, autumn forest")
        steps = driver.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys("3")
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        stage1_steps = driver.find_element(By.ID, "s1-steps")
        stage1_steps.send_keys("2")
        driver.find_element(By.ID, "s1-refine").send_keys("1")  # the refined shader for stage 1's first step
        driver.find_element(By.CSS_SELECTOR, "#advanced summary").click()

        # -- two boxes by mouse drags ---------------------------------------------------------
        canvas = driver.find_element(By.ID, "canvas")
        _drag(driver, canvas, (0.08, 0.2), (0.45, 0.7))
        _wait(driver, lambda d: len(_model(d)["instances"]) == 1, UI_S, "the first drag drew no box")
        # The new box's prompt field has the focus: typing goes there.
        driver.switch_to.active_element.send_keys("a red cardinal")
        _drag(driver, canvas, (0.55, 0.15), (0.92, 0.65))
        _wait(driver, lambda d: len(_model(d)["instances"]) == 2, UI_S, "the second drag drew no box")
        layout = _model(driver)
        first, second = (inst["box"] for inst in layout["instances"])
        assert first[0] == pytest.approx(0.08, abs=0.03) and first[3] == pytest.approx(0.7, abs=0.03), first
        assert second[0] == pytest.approx(0.55, abs=0.03) and second[1] == pytest.approx(0.15, abs=0.03), second
        assert layout["instances"][0]["prompt"] == "a red cardinal"

        # -- move, resize, nudge, delete, each undone with Ctrl+Z ---------------------------------
        box = lambda: _model(driver)["instances"][0]["box"]  # noqa: E731
        _drag(driver, canvas, (0.2, 0.4), (0.26, 0.46))  # inside box 1: moves it
        moved = box()
        assert moved[0] - first[0] == pytest.approx(0.06, abs=0.015), (first, moved)
        assert moved[1] - first[1] == pytest.approx(0.06, abs=0.015), (first, moved)
        assert moved[2] - moved[0] == pytest.approx(first[2] - first[0], abs=1e-3), "a move changed the size"
        _drag(driver, canvas, (moved[2], moved[3]), (moved[2] + 0.05, moved[3] + 0.05))  # its bottom-right handle
        resized = box()
        assert resized[:2] == pytest.approx(moved[:2], abs=1e-4), "the corner drag moved the top-left corner"
        assert resized[2] - moved[2] == pytest.approx(0.05, abs=0.015), (moved, resized)
        keys = lambda *k: ActionChains(driver).send_keys(*k).perform()  # noqa: E731  (to the focused canvas)
        undo = lambda: ActionChains(driver).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()  # noqa: E731
        keys(Keys.ARROW_LEFT)
        assert box()[0] == pytest.approx(resized[0] - 16 / 512, abs=1e-3), "ArrowLeft did not nudge by one token"
        for want in (resized, moved, first):
            undo()
            assert box() == pytest.approx(want, abs=1e-4), "Ctrl+Z did not step back"
        keys(Keys.DELETE)
        assert [i["prompt"] for i in _model(driver)["instances"]] == [""], "Delete did not remove the selected box"
        undo()
        assert [i["prompt"] for i in _model(driver)["instances"]] == ["a red cardinal", ""]

        # -- box 2 has no prompt yet: the service's 422 lands beside box 2's field ----------------
        driver.find_element(By.ID, "render").click()
        _wait(driver, lambda d: _field_error(d, "instances[1]"), UI_S,
              "the 422 for instances[1].prompt was not shown beside box 2")
        assert not _field_error(driver, "instances[0]"), "box 1 got box 2's problem"
        box2 = driver.find_element(By.CSS_SELECTOR, '#boxes li[data-index="1"] input.box-prompt')
        assert "invalid" in box2.get_attribute("class")
        box2.send_keys("a blue jay")
        assert not _field_error(driver, "instances[1]"), "typing did not clear the message"
        assert [i["prompt"] for i in _model(driver)["instances"]] == ["a red cardinal", "a blue jay"]
        assert not driver.find_element(By.ID, "notice").is_displayed(), "the problem summary outlived the problem"
        submitted = _model(driver)

        # -- render: record every value the progress bar takes --------------------------------
        driver.execute_script("""
            window.__bar = [];
            const bar = document.getElementById('progress-bar');
            new MutationObserver(() => window.__bar.push([bar.value, document.getElementById('progress-step').textContent]))
              .observe(bar, {attributes: true});
            new MutationObserver(() => window.__bar.push([bar.value, document.getElementById('progress-step').textContent]))
              .observe(document.getElementById('progress-step'), {childList: true, characterData: true, subtree: true});
            window.__previews = [];
            const preview = document.getElementById('preview');
            new MutationObserver(() => window.__previews.push(preview.getAttribute('src').slice(0, 22)))
              .observe(preview, {attributes: true, attributeFilter: ['src']});
        """)
        driver.find_element(By.ID, "render").click()
        _wait(driver, lambda d: d.find_element(By.ID, "progress").is_displayed(), UI_S, "no progress panel")
        _wait(driver, lambda d: d.execute_script(
            "const i = document.getElementById('result-image'); return i.complete && i.naturalWidth > 0;"),
            RENDER_S, f"the image did not appear; last progress: {driver.find_element(By.ID, 'progress').text!r}")
        seen = driver.execute_script("return window.__bar;")
        assert any(0 < value < 1 for value, _ in seen), f"the progress bar never moved between 0 and 1: {seen}"
        assert any(text.startswith("step ") for _, text in seen), f"no step count shown: {seen}"
        previews = driver.execute_script("return window.__previews;")
        assert "data:image/png;base64," in previews, f"no live preview from the step events: {previews}"
        assert driver.find_element(By.ID, "progress-stage").text.startswith("done")
        job_id = driver.find_element(By.ID, "result").get_attribute("data-job")
        assert job_id
        _wait(driver, lambda d: d.execute_script(
            "const i = document.getElementById('result-regions'); return i.complete && i.naturalWidth > 0;"),
            UI_S, "regions.png did not load")
        driver.find_element(By.ID, "regions-toggle").click()
        assert driver.find_element(By.ID, "result-regions").is_displayed()
        timings = _wait(driver, lambda d: d.find_element(By.ID, "result-timings").text, UI_S, "no timings table")
        assert "stage1" in timings and "step 3" in timings, timings  # stage 1 ran; the FLUX steps, aggregated
        driver.execute_script("document.getElementById('result').scrollIntoView();")
        _shot(driver, tmp_path, "serve-result.png")

        # -- reload, start from an empty editor, restore from the history ---------------------
        driver.refresh()
        card = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, f'#history .card[data-job="{job_id}"]'),
                     UI_S, f"job {job_id} is not in the history after a reload")[0]
        _wait(driver, lambda d: d.execute_script(
            "const i = arguments[0].querySelector('img'); return i && i.complete && i.naturalWidth > 0;", card),
            UI_S, "the history card has no thumbnail")
        driver.find_element(By.ID, "clear-layout").click()
        driver.find_element(By.ID, "steps").clear()
        driver.execute_script("document.getElementById('s1-refine').value = '';")  # (inside the closed Advanced)
        assert _model(driver)["instances"] == []
        card.click()
        _wait(driver, lambda d: len(_model(d)["instances"]) == 2, UI_S, "clicking the history card restored nothing")
        restored = _model(driver)
        assert restored["prompt"] == submitted["prompt"]
        assert [i["prompt"] for i in restored["instances"]] == ["a red cardinal", "a blue jay"]
        for got, want in zip(restored["instances"], submitted["instances"]):
            assert got["box"] == pytest.approx(want["box"], abs=1e-6)
        fields = driver.find_elements(By.CSS_SELECTOR, "#boxes input.box-prompt")
        assert [f.get_attribute("value") for f in fields] == ["a red cardinal", "a blue jay"]
        assert driver.find_element(By.ID, "steps").get_attribute("value") == "3"
        assert driver.find_element(By.ID, "s1-steps").get_attribute("value") == "2"
        assert driver.find_element(By.ID, "s1-refine").get_attribute("value") == "1"
        _wait(driver, lambda d: d.find_element(By.ID, "result").get_attribute("data-job") == job_id, UI_S,
              "the restored job's result is not shown")
        assert "stage 1" in driver.find_element(By.ID, "depth-source").text
        _wait(driver, lambda d: d.execute_script("return window.threedisEditor.depthShown();"), UI_S,
              "the restored job's depth map is not under the boxes")
        driver.find_element(By.ID, "canvas").click()  # an empty spot: no box selected, for the picture
        driver.execute_script("window.scrollTo(0, 0);")
        _shot(driver, tmp_path, "serve-editor.png")
    except Exception:
        _shot(driver, tmp_path, "failure.png")
        logs = driver.get_log("browser") if hasattr(driver, "get_log") else []
        print("browser console:\n" + "\n".join(json.dumps(entry) for entry in logs))
        print("service log:\n" + log_path.read_text(errors="replace")[-6000:])
        raise
