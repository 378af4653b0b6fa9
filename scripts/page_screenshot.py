"""The screenshot of the web page in the README and docs/service.md (docs/images/page.png): `python scripts/page_screenshot.py`.

Serves the shipped model (`ovd serve` on a free port), opens the page in headless Chromium,
picks sample scene 1, keeps the model's own class names, drags one example box around the
object at --example-box, asks for detections and saves the page. Needs chromium + chromedriver
(scripts/install.sh installs them) and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

from ovd.service.launch import ServerProcess

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", default=str(ROOT / "artifacts" / "default"))
    p.add_argument("--example-box", nargs=4, type=float, default=None, metavar=("X1", "Y1", "X2", "Y2"),
                   help="image pixels of sample scene 1 (default: none)")
    p.add_argument("--label", default="like this")
    p.add_argument("--score", default="0.3")
    p.add_argument("--out", default=str(ROOT / "docs" / "images" / "page.png"))
    args = p.parse_args()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1300,1000",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    with ServerProcess(args.model_dir) as server:
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            driver.get(server.url + "/")
            wait = WebDriverWait(driver, 60)
            wait.until(EC.text_to_be_present_in_element((By.ID, "model-info"), "model "))
            driver.find_element(By.CSS_SELECTOR, ".sample[data-src$='scene-1.jpg']").click()
            canvas = driver.find_element(By.ID, "canvas")
            wait.until(lambda d: canvas.get_attribute("width") != "0")
            if args.example_box:
                driver.find_element(By.ID, "example-label").clear()
                driver.find_element(By.ID, "example-label").send_keys(args.label)
                left, top, width, height = driver.execute_script(
                    "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.width, r.height];",
                    canvas)
                size = int(canvas.get_attribute("width"))
                x1, y1, x2, y2 = args.example_box
                actions = ActionBuilder(driver)
                actions.pointer_action.move_to_location(round(left + x1 * width / size), round(top + y1 * height / size))
                actions.pointer_action.pointer_down()
                actions.pointer_action.move_to_location(round(left + x2 * width / size), round(top + y2 * height / size))
                actions.pointer_action.pointer_up()
                actions.perform()
            driver.find_element(By.ID, "submit").click()
            wait.until(lambda d: "detections in" in d.find_element(By.ID, "status").text)
            driver.execute_script("""const e = document.getElementById('score'); e.value = arguments[0];
                e.dispatchEvent(new Event('input'));""", args.score)
            driver.execute_script("window.scrollTo(0, 0);")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
            print(args.out, driver.find_element(By.ID, "status").text)
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
