"""JupyterLab as a user meets it: `bash run.sh lab` on loopback, a stage notebook opened in headless Chromium,
Run > Run All Cells from the menu; then every cell has run without an error, the figures are images the
browser decoded, and tqdm's progress bars are widgets. Needs chromium and chromedriver (CI installs the
distribution's packages, .ci/run); skipped without them.

MOE2_LAB_SCREENSHOT=docs/jupyterlab.png also writes the screenshot the README shows.
"""

import importlib.util
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import needs_data

from moe2lib.pipeline import config, runner

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = "01_base_models.ipynb"   # scores real questions with both packaged models; two figures, two bars
SOURCE = ROOT / "notebooks" / NOTEBOOK
WINDOW = (1280, 1150)   # the screenshot: the scoring cell's bar and the figure below it


def _browser():
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return chromium, shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """`bash run.sh lab` serving tmp_path/notebooks on 127.0.0.1 with a token; (base URL, token, folder, log).

    run.sh first brings this interpreter's environment up to date (scripts/setup.sh; a no-op under run.sh test).
    JupyterLab's settings, workspaces and runtime files go to tmp_path (news notifications off, so no toast
    covers the notebook). As root (CI) it needs --allow-root, as it would for a user in a container.
    """
    if not (Path(sys.prefix) / ".moe2-stamp").exists():
        pytest.skip("run.sh lab would install the stack into this interpreter's environment; "
                    "run the test from the one scripts/setup.sh made (bash run.sh test)")
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, MOE2_VENV=sys.prefix, JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"), JUPYTER_RUNTIME_DIR=str(tmp_path / "rt"))
    args = ["bash", str(ROOT / "run.sh"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--notebook-dir={notebooks}"]
    if os.geteuid() == 0:
        args.append("--allow-root")
    log = tmp_path / "lab.log"
    base = f"http://127.0.0.1:{port}"
    with open(log, "w") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"run.sh lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"JupyterLab not up after 180 s:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}/api/status", params={"token": token}).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert httpx.get(f"{base}/api/status").status_code == 403   # the token is asked for
        yield base, token, notebooks, log
    finally:
        if proc.poll() is None:
            try:
                for k in httpx.get(f"{base}/api/kernels", params={"token": token}).json():
                    httpx.delete(f"{base}/api/kernels/{k['id']}", params={"token": token}, timeout=60)
            except httpx.HTTPError:
                pass
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _chrome(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    # --no-sandbox: Chromium's sandbox cannot start as root or in most containers; it visits only our server
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WINDOW[0]},{WINDOW[1]}", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service(driver, log_output=str(tmp_path / "chromedriver.log")))


def _small_png(png: bytes) -> bytes:
    """The screenshot as a 256-colour PNG (a fraction of the size; UI colours are few)."""
    from PIL import Image

    out = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").quantize(256).save(out, "PNG", optimize=True)
    return out.getvalue()


def _count(prompt: str) -> int | None:
    """The execution count an input prompt shows ("[3]:" -> 3), None before a run or while queued."""
    inner = prompt.strip().removesuffix(":").strip("[]")
    return int(inner) if inner.isdigit() else None


OUTPUTS_JS = """
const out = sel => [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output' + sel)];
return {
  prompts: [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(p => p.textContent),
  images: out(' img').map(i => [i.complete, i.naturalWidth, i.naturalHeight]),
  bars: out(' .widget-hprogress .progress-bar').map(b => b.style.width),
  barText: out(' .widget-html-content').map(h => h.textContent),
  text: out('').map(o => o.textContent),
};
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("selenium") is None, reason="selenium is not installed "
                    "(requirements.txt pins it)")
@pytest.mark.skipif(not all(_browser()), reason="no headless browser here: needs chromium and chromedriver "
                    "(Debian: apt-get install chromium chromium-driver)")
@needs_data
def test_notebook_runs_all_cells_in_jupyterlab(lab, tmp_path):
    import papermill
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, token, notebooks, log = lab
    # the notebook with the smoke profile's values in papermill's injected cell, as reproduce runs it
    cfg, cfg_path = config.load_config("smoke")
    params = runner.stage_params(cfg, cfg_path, runner.STAGES["base_models"], "smoke", tmp_path / "run")
    papermill.execute_notebook(str(SOURCE), str(notebooks / NOTEBOOK), parameters=params,
                               prepare_only=True, log_output=False, progress_bar=False)
    code_cells = sum(c["cell_type"] == "code" for c in json.loads((notebooks / NOTEBOOK).read_text())["cells"])

    drv = _chrome(tmp_path)
    try:
        drv.get(f"{base}/lab/tree/{NOTEBOOK}?token={token}")
        status = lambda d: d.find_element(By.ID, "jp-main-statusbar").text   # noqa: E731
        WebDriverWait(drv, 120, 0.5).until(lambda d: "| Idle" in status(d))    # kernel started
        drv.find_element(By.CSS_SELECTOR, '.jp-SideBar.jp-mod-left .lm-TabBar-tab[data-id="filebrowser"]').click()
        next(m for m in drv.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel") if m.text == "Run").click()
        WebDriverWait(drv, 10).until(lambda d: d.find_element(
            By.CSS_SELECTOR, '.lm-Menu-item[data-command="runmenu:run-all"]')).click()
        t0 = time.monotonic()

        def settled(d):   # Run All marks every queued cell [*]; an error empties the rest again
            prompts = d.execute_script(OUTPUTS_JS)["prompts"]
            return "| Idle" in status(d) and prompts and _count(prompts[0]) and not any("*" in p for p in prompts)
        try:
            WebDriverWait(drv, 900, 1).until(settled)
        except Exception:
            drv.save_screenshot(str(tmp_path / "stuck.png"))
            raise AssertionError(f"cells still running after 900 s: {drv.execute_script(OUTPUTS_JS)['prompts']}; "
                                 f"screenshot {tmp_path / 'stuck.png'}; server log:\n{log.read_text()[-3000:]}")
        ran_s = time.monotonic() - t0
        dom = drv.execute_script(OUTPUTS_JS)

        drv.find_element(By.CSS_SELECTOR, '.jp-NotebookPanel-toolbar [data-command="docmanager:save"]').click()
        for _ in range(60):   # saving is asynchronous: wait for the file to hold what the page shows
            saved = httpx.get(f"{base}/api/contents/{NOTEBOOK}", params={"token": token}).json()["content"]
            if [c["execution_count"] for c in saved["cells"] if c["cell_type"] == "code"] == \
                    [_count(p) for p in dom["prompts"]]:
                break
            time.sleep(0.5)

        for widget in drv.find_elements(By.CSS_SELECTOR, ".jp-Notebook .widget-hprogress")[:1]:
            drv.execute_script("arguments[0].closest('.jp-CodeCell').scrollIntoView({block: 'start'});", widget)
            time.sleep(1)
        png = _small_png(drv.get_screenshot_as_png())
    finally:
        drv.quit()
    (tmp_path / "jupyterlab.png").write_bytes(png)
    if target := os.environ.get("MOE2_LAB_SCREENSHOT"):
        Path(target).write_bytes(png)
    print(f"Run All Cells took {ran_s:.0f} s; screenshot {len(png) / 1e3:.0f} kB at {tmp_path / 'jupyterlab.png'}")

    outputs = [o for c in saved["cells"] if c["cell_type"] == "code" for o in c["outputs"]]
    errors = [f"{o['ename']}: {o['evalue']}" for o in outputs if o["output_type"] == "error"]
    assert not errors and not any("Traceback" in t for t in dom["text"]), errors
    assert len(dom["prompts"]) == code_cells and all(map(_count, dom["prompts"])), dom["prompts"]
    assert not any("IProgress not found" in t for t in dom["text"])   # tqdm's warning without ipywidgets
    # the figures: both of the notebook's, decoded by the browser
    pngs = sum("image/png" in o.get("data", {}) for o in outputs)
    assert pngs == 2 and len(dom["images"]) == pngs
    assert all(ok and w > 100 and h > 100 for ok, w, h in dom["images"]), dom["images"]
    # tqdm.auto bars as ipywidgets, one per scoring pass (choices, MMLU letters), each at 100%
    assert dom["bars"] == ["100%", "100%"], dom["bars"]
    assert sum("100%" in t for t in dom["barText"]) == 2, dom["barText"]
    # and the stage did its work: its meta.json is written last
    assert (tmp_path / "run" / "artifacts" / "base_models" / "meta.json").exists()
    assert {p.name for p in (tmp_path / "run" / "figures").glob("*.png")} == {
        "base_models_task_accuracy.png", "base_models_letter_bias.png"}
