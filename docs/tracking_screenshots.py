"""Screenshots of a real run's MLflow pages for docs/TRACKING.md (not part of CI).

Starts ``mlflow server`` on a loopback port with a fresh sqlite store, trains the ``tiny`` preset for
150 steps (--steps) into it (system metrics every second), then photographs the experiment page
and the run's overview, model-metrics and system-metrics tabs with headless Chromium (Debian:
``apt-get install chromium``) driven by Playwright (``pip install playwright``; it uses that
Chromium, nothing is downloaded), waiting until the charts are drawn, and stops the server by its
process group.

    python docs/tracking_screenshots.py [--out docs/images] [--steps 150] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from mtx_launchers.env import free_port  # noqa: E402

# MLflow 3.17's UI takes its view (GenAI or model training) from a browser-wide switch, default GenAI;
# ``workflowType=machine_learning`` in the URL selects the training view, as the links we print do.
VIEW = "?workflowType=machine_learning"
PAGES = {  # file name -> route of MLflow 3's UI
    "tracking-experiment.png": "#/experiments/{exp}/runs" + VIEW,
    "tracking-run-overview.png": "#/experiments/{exp}/runs/{run}" + VIEW,
    "tracking-model-metrics.png": "#/experiments/{exp}/runs/{run}/model-metrics" + VIEW,
    "tracking-system-metrics.png": "#/experiments/{exp}/runs/{run}/system-metrics" + VIEW,
}


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"mlflow server at {url} did not answer within {timeout_s:.0f} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "docs", "images"))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--size", default="1500,1000", help="window width,height")
    a = p.parse_args()
    if not os.path.exists(a.chromium):
        raise SystemExit(f"no Chromium at {a.chromium} (Debian: apt-get install chromium)")
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="mtx-tracking-shots-")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PYTHONPATH": REPO}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{work}/mlflow.db", "--artifacts-destination", f"{work}/artifacts"],
        stdout=open(os.path.join(work, "server.log"), "wb"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True)
    try:
        wait_healthy(url, server)
        train = subprocess.run(
            [sys.executable, "-m", "mtx_dist", "train", f"run.steps={a.steps}", "run.name=tiny-quickstart",
             f"run.dir={work}/run", f"data.demo_dir={work}/demo", f"tracking.uri={url}", "tracking.experiment=mtx-dist",
             "tracking.system_metrics_interval_s=1"], cwd=work, env=env)
        if train.returncode != 0:
            raise SystemExit(f"training failed ({train.returncode})")
        from mlflow.tracking import MlflowClient
        client = MlflowClient(url)
        exp = client.get_experiment_by_name("mtx-dist")
        run = client.search_runs([exp.experiment_id], max_results=1)[0]
        from playwright.sync_api import sync_playwright
        width, height = map(int, a.size.split(","))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=a.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": width, "height": height})
            for name, route in PAGES.items():
                target = os.path.join(a.out, name)
                page.goto(f"{url}/{route.format(exp=exp.experiment_id, run=run.info.run_id)}")
                page.wait_for_selector("text=tiny-quickstart", timeout=60_000)  # the UI polls: never network-idle
                if "metrics" in name:  # plotly draws each chart into an svg once its data arrived
                    page.wait_for_selector(".js-plotly-plot .main-svg", timeout=60_000)
                page.wait_for_timeout(3000)
                page.screenshot(path=target)
                print(f"wrote {target}")
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
