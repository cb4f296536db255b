"""The reviewer's screen, looked at in a real browser: a tiny photo build (scikit-image photos,
the embedded photo path) pushed to a local Label Studio server, then its data manager and a task
screenshotted by headless Chromium through Selenium.

A manual check, not a test (it needs Chromium and Selenium, which the project does not depend on):

    apt-get install -y chromium chromium-driver && .venv/bin/pip install selenium
    .venv/bin/python bench/labelstudio_screens.py            # -> tmp/screens/*.png

Then look at the PNGs: the target's regions (the background one drawn as an outline only), the
brush toolbar beside the image and not over it, the numbered regions readable, and the data
manager's columns (no raw-JSON ones). The server's data dir is kept under tmp/ (the next run starts
in seconds instead of migrating a fresh database); `--fresh` starts from an empty one.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from annotation.client import Connection, connect  # noqa: E402
from annotation.server import LabelStudioServer, ServerConfig, ensure_ls_venv  # noqa: E402
from annotation.sync import ReviewSettings, project_tasks, push  # noqa: E402

TMP = ROOT / "tmp"
SCREENS = TMP / "screens"
DATA = TMP / "ls-screens-data"
CREDENTIALS = DATA / "bench-credentials.json"  # the admin of this throw-away server, under tmp/


def photo_build(out: Path) -> None:
    """A few skimage photos through the embedded photo path, every sample with an injected fault
    and nothing rejected outright, so that most go to review."""
    from flows.plan import prepare_build
    from photo_fixtures import photo_folder
    from pipeline.config import BuildConfig
    from pipeline.dataset.output import finalize
    from pipeline.dataset.report import write_report
    from pipeline.unit import UnitPipeline

    shutil.rmtree(out, ignore_errors=True)
    folder = photo_folder(out.parent / f"{out.name}-photos", ["astronaut", "chelsea", "coffee", "rocket"])
    config = BuildConfig(source="folder", source_options={"path": str(folder)}, resolution=384,
                         edits_per_image=2, min_edits=2, max_edits=4, shard_size=4, seed=1, defect_rate=1.0,
                         routing={"overall_reject": 0.0, "background_reject": 0.0})
    total = prepare_build(out, config)
    pipeline = UnitPipeline(config, out)
    for unit in range(config.num_units(total)):
        pipeline.run(unit)
    finalize(out)
    write_report(out)


def server(fresh: bool, port: int) -> LabelStudioServer:
    if fresh:
        shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True, exist_ok=True)
    if not CREDENTIALS.is_file():
        CREDENTIALS.write_text(json.dumps({"password": secrets.token_hex(8), "token": secrets.token_hex(20)}))
    creds = json.loads(CREDENTIALS.read_text())
    config = ServerConfig(port=port, data_dir=DATA, username="admin@mcie.test", password=creds["password"],
                          token=creds["token"], document_root=TMP)
    ensure_ls_venv()
    ls = LabelStudioServer(config)
    ls.start(timeout_s=240)
    return ls


def browser(width: int, height: int):
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def login(driver, url: str, email: str, password: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/user/login/")
    driver.find_element(By.NAME, "email").send_keys(email)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
    time.sleep(2)


def shot(driver, name: str, wait_s: float) -> Path:
    time.sleep(wait_s)
    path = SCREENS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"wrote {path}")
    return path


RECTS_JS = """
const rect = e => { const r = e.getBoundingClientRect(); return [e.className && e.className.baseVal === undefined ? String(e.className) : e.tagName, Math.round(r.left), Math.round(r.top), Math.round(r.right), Math.round(r.bottom)]; };
const images = [...document.querySelectorAll('img')].filter(i => i.getBoundingClientRect().width > 100).map(rect);
const controls = [...document.querySelectorAll('[class*=toolbar], [class*=range], input[type=range]')].map(rect);
return {images, controls};
"""


def overlaps(driver) -> list[str]:
    """Controls (toolbars, the brush-size slider) whose box overlaps a shown image."""
    found = driver.execute_script(RECTS_JS)
    lines = []
    for name, *box in found["controls"]:
        for image_name, *image in found["images"]:
            # 2 px of slack: a toolbar that touches an image's edge is not over it
            if box[0] < image[2] - 2 and image[0] < box[2] - 2 and box[1] < image[3] - 2 and image[1] < box[3] - 2:
                lines.append(f"OVERLAP: {name} {box} over image {image}")
    return lines or [f"no control overlaps an image ({len(found['controls'])} controls, "
                     f"{len(found['images'])} images)"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help="a fresh server data dir (≈ 40 s migrations)")
    parser.add_argument("--port", type=int, default=18093)
    parser.add_argument("--wait-s", type=float, default=6.0, help="time for a page to settle")
    parser.add_argument("--width", type=int, default=1600)
    parser.add_argument("--height", type=int, default=1300)
    parser.add_argument("--keep", action="store_true", help="leave the server running")
    args = parser.parse_args()

    SCREENS.mkdir(parents=True, exist_ok=True)
    out = TMP / "screens-build"
    photo_build(out)
    ls = server(args.fresh, args.port)
    try:
        conn = Connection(url=ls.url, api_key=ls.config.token)
        title = f"screens {time.strftime('%H%M%S')}"
        result = push(out, conn, ReviewSettings(project=title, document_root=TMP))
        print(result.summary())
        tasks = project_tasks(connect(conn), result.project_id, False)
        # the busiest screen (most sub-instructions), and one with a background sub-edit if any
        busiest = max(tasks, key=lambda t: int(t.data.get("num_sub_instructions") or 0))
        background = [t for t in tasks if "background" in t.data.get("instruction", "").lower()]
        shown = {"task": busiest, **({"task_background": background[0]} if background else {})}
        driver = browser(args.width, args.height)
        try:
            login(driver, ls.url, ls.config.username, ls.config.password)
            driver.set_window_size(2600, args.height)  # wide: every column of the table in view
            driver.get(f"{ls.url}/projects/{result.project_id}/data")
            shot(driver, "data_manager", args.wait_s)
            driver.set_window_size(args.width, args.height)
            for name, task in shown.items():
                driver.get(f"{ls.url}/projects/{result.project_id}/data?task={task.id}")
                shot(driver, name, args.wait_s + 4)
                for line in overlaps(driver):
                    print(line)
            for el in driver.find_elements("css selector", "[class*=lsf-main-content], [class*=main-content]"):
                driver.execute_script("arguments[0].scrollTop = arguments[0].scrollHeight", el)
            shot(driver, "task_bottom", 1.5)
            logs = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
            print(f"{len(logs)} severe console messages (telemetry hosts are unreachable here: harmless)")
        finally:
            driver.quit()
    finally:
        if not args.keep:
            ls.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
