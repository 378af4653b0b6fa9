"""The web page and the API docs in a real browser: headless Chromium (Debian's chromium +
chromedriver) driven by Selenium against the real server: upload a PNG or pick a sample scene,
type names or drag example boxes, submit, see boxes and rows; /docs and /redoc render with every
host but the server unreachable."""

from __future__ import annotations

import shutil

import pytest
from service_testing import image_bytes

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("chromium + chromedriver are not installed (scripts/install.sh installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Every host name but the server's (127.0.0.1) fails to resolve: a page that needs a CDN breaks.
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _open_with(browser, url: str, png, names: str) -> WebDriverWait:
    """Load the page, wait for the model info, choose the image and type the names."""
    browser.get(url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "ovd-test"))
    browser.find_element(By.ID, "image").send_keys(str(png))
    box = browser.find_element(By.ID, "classes")
    box.clear()
    box.send_keys(names)
    return wait


def test_upload_type_names_and_see_boxes(browser, server, tmp_path):
    png = tmp_path / "scene.png"
    png.write_bytes(image_bytes(96, 72, seed=11))
    wait = _open_with(browser, server.url, png, "red ring\nblue disk\nforklift")
    _set(browser, "score", "0.2")
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results tbody tr.detection"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#results tbody tr.detection")
    labels = {row.find_elements(By.TAG_NAME, "td")[1].text for row in rows}
    assert labels <= {"red ring", "blue disk", "forklift"} and labels
    assert "detections in" in browser.find_element(By.ID, "status").text
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas.get_attribute("data-boxes") == str(len(rows))
    assert (int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))) == (96, 72)
    # Box colours (base blue, novel red, other green) were drawn over the noise image.
    coloured = browser.execute_script("""
        const c = document.getElementById('canvas');
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const wanted = [[0x1f, 0x77, 0xb4], [0xd6, 0x27, 0x28], [0x2c, 0xa0, 0x2c]];
        let n = 0;
        for (let i = 0; i < px.length; i += 4)
          if (wanted.some(([r, g, b]) => px[i] === r && px[i + 1] === g && px[i + 2] === b)) n++;
        return n;""")
    assert coloured > 50


def _set(browser, element_id: str, value: str) -> None:
    """Set a form control's value the way a user's drag or pick does (an `input` event)."""
    browser.execute_script("""const e = document.getElementById(arguments[0]); e.value = arguments[1];
        e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));""", element_id, value)


def _rows(browser) -> list[tuple[str, float]]:
    return [(r.find_elements(By.TAG_NAME, "td")[1].text, float(r.find_elements(By.TAG_NAME, "td")[2].text))
            for r in browser.find_elements(By.CSS_SELECTOR, "#results tbody tr.detection")]


def test_options_slider_class_filter_and_download(browser, server, tmp_path):
    """The options reach the request; the slider and the class filter act on the answer in the
    page (no new request); the answer can be downloaded."""
    png = tmp_path / "big.png"
    png.write_bytes(image_bytes(190, 150, seed=12))  # 2.3x the test model's 64 px: tiles=auto slices it
    wait = _open_with(browser, server.url, png, "red ring\nblue disk")
    _set(browser, "score-mode", "per_name")
    _set(browser, "nms", "0.4")
    browser.find_element(By.ID, "agnostic").click()
    _set(browser, "score", "0.05")
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: _rows(d))
    status = browser.find_element(By.ID, "status").text
    assert "tiles)" in status, status  # sliced: the status names the tiles
    everything = _rows(browser)
    assert all(score >= 0.05 for _, score in everything)
    for floor in ("0.5", "0.999"):
        _set(browser, "score", floor)
        shown = _rows(browser)
        assert len(shown) <= len(everything) and all(s >= float(floor) - 5e-4 for _, s in shown)
        assert browser.find_element(By.ID, "canvas").get_attribute("data-boxes") == str(len(shown))
    _set(browser, "score", "0.05")
    assert _rows(browser) == everything  # the same answer, filtered again without a request
    label = everything[0][0]
    _set(browser, "class-filter", label)
    assert {name for name, _ in _rows(browser)} == {label}
    assert browser.find_element(By.ID, "download").is_enabled()
    # The request carried the options (per-name scores, class-agnostic NMS): one label per box.
    boxes = browser.execute_script("return last.body.detections.map((d) => d.box.join(','));")
    assert len(boxes) == len(set(boxes))


def test_errors_are_shown_on_the_page(browser, server, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"this is text")
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "ovd-test"))
    browser.find_element(By.ID, "image").send_keys(str(bad))
    browser.find_element(By.ID, "submit").click()
    wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "unsupported_image"))
    assert "error" in browser.find_element(By.ID, "status").get_attribute("class")


def test_sample_scene_and_example_boxes_dragged_on_the_canvas(browser, server):
    """Pick a sample scene, drag two example boxes with one label (and a click, which is no
    box), clear the names: the request searches for the example alone."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "ovd-test"))
    browser.find_element(By.CSS_SELECTOR, ".sample[data-src$='scene-2.jpg']").click()
    canvas = browser.find_element(By.ID, "canvas")
    wait.until(lambda d: canvas.get_attribute("width") == "256")
    browser.find_element(By.ID, "example-label").clear()
    browser.find_element(By.ID, "example-label").send_keys("that thing")
    browser.execute_script("arguments[0].scrollIntoView();", canvas)
    left, top, width, height = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height];", canvas)
    for x0, y0 in ((20, 30), (120, 140)):  # image pixels -> viewport CSS pixels
        actions = ActionBuilder(browser)
        actions.pointer_action.move_to_location(round(left + x0 * width / 256), round(top + y0 * height / 256))
        actions.pointer_action.pointer_down()
        actions.pointer_action.move_to_location(round(left + (x0 + 40) * width / 256),
                                                round(top + (y0 + 30) * height / 256))
        actions.pointer_action.pointer_up()
        actions.perform()
    ActionChains(browser).move_to_element(canvas).click().perform()  # a click adds nothing
    items = browser.find_elements(By.CSS_SELECTOR, "#examples li")
    assert len(items) == 2 and all(i.text.startswith("that thing: [") for i in items)
    box = [float(v) for v in items[0].text.split("[")[1].rstrip("]×").split(",")]
    assert abs(box[0] - 20) <= 3 and abs(box[1] - 30) <= 3 and abs(box[2] - 60) <= 3 and abs(box[3] - 60) <= 3
    browser.find_element(By.ID, "classes").clear()
    _set(browser, "score", "0.05")
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda d: _rows(d) or "error" in d.find_element(By.ID, "status").get_attribute("class"))
    assert {label for label, _ in _rows(browser)} == {"that thing"}
    assert browser.execute_script("return last.body.classes;") == ["that thing"]
    # Removing an example takes it off the list and the canvas.
    items[1].find_element(By.TAG_NAME, "button").click()
    assert len(browser.find_elements(By.CSS_SELECTOR, "#examples li")) == 1


@pytest.mark.parametrize("path,ready", [("/docs", ".swagger-ui .info .title"), ("/redoc", "redoc-wrap h1, h1")])
def test_api_docs_render_without_internet(browser, server, path, ready):
    """Every reference of the OpenAPI document resolves inside it (ReDoc refuses the whole
    document for one that does not), and both pages render with no host but the server."""
    import httpx

    assert "#/$defs" not in httpx.get(server.url + "/openapi.json").text
    browser.get(server.url + path)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: any("ovd detection service" in e.text for e in d.find_elements(By.CSS_SELECTOR, ready)))
    assert "/v1/detect" in browser.find_element(By.TAG_NAME, "body").text
