"""A real browser runs notebook 08 in JupyterLab: the predictor widget must show a prediction and its overlay.

The test trains a tiny run, writes a copy of ``notebooks/08_try_the_model.ipynb`` with that run as ``RUN_DIR``
(papermill's ``prepare_only``: the parameters are injected, nothing is executed), starts JupyterLab on
127.0.0.1 (a free port, a random token, its own settings and runtime folders) over a temporary root folder,
and opens the notebook in headless Chromium through Playwright. It runs every cell from the Run menu, waits
for the widget's drawing, checks the prediction line and the overlay image from the page, and saves
screenshots into the test's ``tmp_path`` (their paths are printed; ``pytest -s`` shows them).

The browser is Debian's ``chromium`` (``make browser`` installs it where apt is available); Playwright's own
browser downloads are never used. Without Playwright or Chromium the test skips with the reason, except under CI
(``CI`` set, see ``conftest.on_ci``), where it fails.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from conftest import REPO, on_ci

NOTEBOOK = REPO / "notebooks" / "08_try_the_model.ipynb"
#: Debian's Chromium; USSF_CHROMIUM names another binary.
CHROMIUM = os.environ.get("USSF_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
#: How long the page may take for each step, in milliseconds (the whole test stays under about 90 s).
LOAD_MS, RUN_MS = 45_000, 75_000


def missing_browser(chromium: str = CHROMIUM) -> str | None:
    """Why the browser test cannot run here (no Playwright, no Chromium), or ``None`` when it can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (it is in the dev extra: pip install -e '.[dev]')"
    if not Path(chromium).is_file():
        return (f"{chromium}: no Chromium here (`make browser`, which `make test` runs, installs Debian's chromium "
                "when it runs as root with apt-get)")
    return None


def require_browser(chromium: str = CHROMIUM) -> None:
    """Skip with the reason where the browser stack is missing; under CI, fail instead."""
    reason = missing_browser(chromium)
    if reason is None:
        return
    if on_ci():
        pytest.fail(f"{reason}, and CI={os.environ['CI']}: CI must run the browser test")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_run(folder: Path) -> Path:
    """A finished 2-fold us_sfnet_tiny run on a 32 px phantom (about 10 s on 2 CPU cores)."""
    from ussf_lib.data.phantom import generate_phantom
    from ussf_lib.paper import PAPER_CLASSES
    from ussf_lib.training.experiment import CVConfig, run_cv

    manifest = generate_phantom(folder / "phantom", n_per_class=16, image_size=32, seed=0)
    cfg = CVConfig(out=str(folder / "run"), manifest=str(manifest), group_col="patient", classes=list(PAPER_CLASSES),
                   model="us_sfnet_tiny", folds=2, epochs=1, image_size=32, batch_size=32, seed=0, progress=False)
    return run_cv(cfg, log=lambda line: None)


def lab_environment(tmp: Path) -> dict[str, str]:
    """JupyterLab with its own settings, workspaces and runtime files; kernels import this checkout's ussf_lib.

    Notebook windowing is off so every cell is in the page, wherever it is scrolled, and the notebook's kernel
    starts without asking.
    """
    settings = tmp / "lab-settings"
    tracker = settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none", "autoStartDefaultKernel": True}))
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "lab-ws"),
               JUPYTER_RUNTIME_DIR=str(tmp / "jupyter-runtime"), JUPYTER_CONFIG_DIR=str(tmp / "jupyter-config"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    env.pop("MPLBACKEND", None)  # the kernel's inline backend draws the figures
    return env


def start_lab(root: Path, port: int, token: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
           ]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for_lab(proc: subprocess.Popen, port: int, token: str, log: Path, seconds: float = 40) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"JupyterLab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"JupyterLab did not answer on port {port} within {seconds:.0f} s:\n{log.read_text()[-3000:]}")


def wait_for_kernel(port: int, token: str, seconds: float = 45) -> None:
    """Until the server holds a kernel with a browser connected, and idle: the page's own indicator reads "idle"
    once before the kernel connects, and Run All before that runs nothing."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/kernels?token={token}", timeout=5) as r:
            kernels = json.loads(r.read())
        if any(k.get("connections", 0) >= 1 and k.get("execution_state") == "idle" for k in kernels):
            return
        time.sleep(0.5)
    pytest.fail(f"no kernel connected to the page within {seconds:.0f} s (kernels: {kernels})")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to JupyterLab's process group (it shuts its kernel down), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("material"))


@pytest.mark.parametrize("ci, outcome", [("true", "fail"), ("1", "fail"), ("", "skip"), ("false", "skip")])
def test_a_missing_browser_skips_for_users_and_fails_on_ci(tmp_path, monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(expected, match="no Chromium here"):
        require_browser(str(tmp_path / "no-chromium"))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_notebook_08_shows_a_prediction_and_its_overlay_in_jupyterlab(tmp_path, run_dir):
    require_browser()
    import papermill
    from playwright.sync_api import sync_playwright

    started = time.monotonic()
    root = tmp_path / "lab"
    root.mkdir()
    out_dir = tmp_path / "notebook-out"
    papermill.execute_notebook(str(NOTEBOOK), str(root / NOTEBOOK.name), prepare_only=True, kernel_name="python3",
                               parameters={"RUN_DIR": str(run_dir), "OUT_DIR": str(out_dir)}, progress_bar=False)
    port, token, log = free_port(), secrets.token_hex(16), tmp_path / "jupyterlab.log"
    lab = start_lab(root, port, token, lab_environment(tmp_path), log)
    shots = []
    try:
        wait_for_lab(lab, port, token, log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                run_notebook_and_check(page, port, token, tmp_path, shots)
            finally:
                browser.close()
    finally:
        stop(lab)
    saved = json.loads((out_dir / "metrics.json").read_text())  # the last cell ran
    assert saved["prediction"] in ("normal", "benign", "primary", "metastatic")
    assert (out_dir / "prediction.png").is_file()
    print(f"browser test took {time.monotonic() - started:.1f}s")


def run_notebook_and_check(page, port: int, token: str, tmp_path: Path, shots: list[Path]) -> None:
    """Open notebook 08, Run > Run All Cells, then read the predictor's drawing from the page. On a failure the
    page is saved as ``failure.png`` and its outputs' text is added to the message."""
    try:
        page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}")
        page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=LOAD_MS)
        dialog = page.locator(".jp-Dialog .jp-mod-accept")  # "Select Kernel", should JupyterLab still ask
        if dialog.count():
            dialog.first.click()
        wait_for_kernel(port, token)
        page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=LOAD_MS)
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
        text = page.locator(".ussf-predictor .ussf-prediction-text")
        text.wait_for(timeout=RUN_MS)
        overlay = page.locator(".ussf-predictor img.ussf-overlay")
        overlay.wait_for(timeout=10_000)
        overlay.scroll_into_view_if_needed()
        shots.append(tmp_path / "predictor.png")
        page.locator(".ussf-predictor").screenshot(path=str(shots[-1]))
        page.locator(".jp-OutputArea-output", has_text="metrics.json").wait_for(timeout=RUN_MS)
        shots.append(tmp_path / "jupyterlab.png")
        page.screenshot(path=str(shots[-1]))
        # A user's change: another image in the drop-down redraws the prediction for it.
        select = page.locator(".ussf-predictor .ussf-image select")
        other = select.locator("option").last.inner_text().strip()  # "<class>: <file name>" (ipywidgets: nbsp)
        select.select_option(label=other)
        name = re.split(r":\s", other)[-1]
        page.locator(".ussf-predictor .ussf-prediction", has_text=name).wait_for(timeout=30_000)
        for shot in shots:
            print(f"screenshot: {shot}")
        assert re.fullmatch(r"Prediction: (normal|benign|primary|metastatic) \(p=[01]\.\d\d\)",
                            text.inner_text().strip()), text.inner_text()
        assert overlay.evaluate("img => img.complete && img.naturalWidth > 100"), "the overlay did not load"
        assert page.locator(".ussf-predictor .ussf-prob-bar").count() == 4
        assert page.locator(".ussf-predictor .ussf-error").count() == 0
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
        assert errors.count() == 0, errors.first.inner_text()
    except Exception as exc:
        failure = tmp_path / "failure.png"
        page.screenshot(path=str(failure))
        outputs = "\n".join(t[:500] for t in page.locator(".jp-OutputArea-output").all_inner_texts())
        raise AssertionError(f"{exc}\nscreenshot: {failure}\noutputs in the page:\n{outputs}") from exc


# --------------------------------------------------------------------------------------------- without a browser


@pytest.mark.slow
def test_the_predictor_draws_a_prediction_an_error_and_an_upload(run_dir, tmp_path):
    """What the browser sees, read from the widgets in this process: the Output widget's drawing."""
    from ussf_lib.nbrun.widgets import build_predictor, example_images, run_checkpoints

    checkpoints, images = run_checkpoints(run_dir), example_images(run_dir, fold=0, per_class=1)
    assert list(checkpoints) == ["fold 0", "fold 1"] and len(images) == 4
    box, predict = build_predictor(checkpoints, images, upload_dir=tmp_path / "uploads")
    output = box.children[-1]

    def drawn() -> str:
        return output.outputs[0]["data"]["text/html"]

    shown = predict(next(iter(images.values())))
    assert re.fullmatch(r"Prediction: \w+ \(p=[01]\.\d\d\)", shown.text())
    assert shown.text() in drawn() and 'class="ussf-overlay"' in drawn() and drawn().count("ussf-prob-bar") == 4
    assert predict(tmp_path / "missing.png") is None and "ussf-error" in drawn()
    image_box, upload = box.children[0].children
    content = next(iter(images.values())).read_bytes()
    upload.value = ({"name": "mine.png", "type": "image/png", "size": len(content), "last_modified": datetime.now(),
                     "content": memoryview(content)},)
    assert image_box.value == str(tmp_path / "uploads" / "mine.png") and "mine.png" in drawn()  # redrawn
    ckpt_box, ckpt_text = box.children[1].children
    ckpt_text.value = str(run_dir)  # a run folder: its fold 0 checkpoint
    assert ckpt_box.value == str(run_dir / "folds" / "0" / "checkpoint.pt")
    ckpt_text.value = str(tmp_path / "nowhere")
    assert "ussf-error" in drawn() and "nowhere" in drawn()


@pytest.mark.slow
def test_held_out_explanations_of_a_run(run_dir):
    import pandas as pd

    from ussf_lib.evaluation.report import load_predictions
    from ussf_lib.explain.heldout import fold_frequency, heldout_cams, image_and_patient_level, pick_examples

    pred = load_predictions(run_dir)
    rows = pick_examples(pred, n=2)
    assert len(rows) <= 4 and rows["correct"].is_monotonic_decreasing
    images, cams, probs, titles = heldout_cams(run_dir, rows, target="true")
    assert images.shape[0] == cams.shape[0] == len(rows) == len(titles) and cams.min() >= 0 and cams.max() <= 1
    stored = rows[[c for c in rows.columns if c.startswith("prob_")]].to_numpy()
    assert abs(probs - stored).max() < 1e-4  # each image explained by the fold that tested it
    shares, response, about = fold_frequency(run_dir, fold=0, n_bins=4)
    assert len(shares) == 5 and abs(shares.filter(like="share_").sum(axis=1) - 1).max() < 1e-9 and "fold 0" in about
    table = image_and_patient_level(json.loads((run_dir / "summary.json").read_text()))
    assert isinstance(table, pd.DataFrame) and {"image mean", "patient mean"} <= set(table.columns)
