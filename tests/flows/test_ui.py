"""Both UIs as a person uses them, in headless Chromium (playwright driving Debian's chromium-headless-shell through
``executable_path``; BATON_CHROMIUM names another binary). The Prefect and MLflow UIs are React apps: every check
waits for what a person would see, and a failing check leaves a full-page screenshot (path printed) in its tmp dir
(or in $BATON_UI_SHOTS, with the pages each check passes through).

- default suite: the Prefect server ``baton serve`` starts, on a port that is not 4200, tells its UI to call its own
  API (bug: the UI called :4200 and showed "Unable to connect"), and the UI shows a `baton run`'s flow run, its task
  and its artifacts;
- slow: `baton serve` serves one deployment per recipe; a Custom Run from the deployment's Run form with one
  override completes, the flow run records the recipe it resolved and Retry reruns exactly that; then `baton ui`
  (MLflow) shows bert's and detector's LoggedModels as the vl stage run's inputs and the lineage picture on the
  parent run.
"""
import json
import os
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import BATON, ROOT, baton
from test_serve import free_port, wait

from tools.faults import snapshot_code

CONFIG = "configs/vlp-micro.yaml"
CHROMIUM = Path(os.environ.get("BATON_CHROMIUM", "/usr/bin/chromium-headless-shell"))
OVERRIDE = "stages.vqa.train.steps=4"  # the one override of the UI's Custom Run
ML_LAYOUT = "?workflowType=machine_learning"  # MLflow 3.17's model-training layout, as baton's links open it


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no headless Chromium at {CHROMIUM}: `apt-get install chromium-headless-shell` (.ci/run does), "
                    f"or BATON_CHROMIUM=/path/to/chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@contextmanager
def page_of(browser, shots: Path, name: str):
    """A fresh page; on failure a full-page screenshot ``shots/NAME-failed.png``. ``page.shot(tag)`` saves one on
    the way (the pages described in the notes)."""
    shots = Path(os.environ.get("BATON_UI_SHOTS", shots))  # pytest keeps only its 3 newest tmp dirs
    shots.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)  # a loaded 2-core CI machine: the MLflow UI takes ~20 s to draw a run
    page.shot = lambda tag: page.screenshot(path=shots / f"{name}-{tag}.png", full_page=True)
    try:
        yield page
    except BaseException as e:
        if isinstance(e, pytest.xfail.Exception):
            raise
        path = shots / f"{name}-failed.png"
        page.screenshot(path=path, full_page=True)
        print(f"screenshot of the failing page: {path}")
        raise
    finally:
        page.close()


def child_env(art: Path) -> dict[str, str]:
    env = os.environ | {"BATON_ARTIFACTS": str(art), "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(art / "prefect"),
                        "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    for k in ("PREFECT_API_URL", "PREFECT_UI_API_URL"):
        env.pop(k, None)
    return env


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (as a terminal's Ctrl-C reaches it), then SIGKILL to what is left of it
    (`mlflow ui` takes its time over SIGTERM)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def flow_run_artifact_keys(api: str, flow_run_id: str) -> set[str]:
    r = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {a["key"] for a in r.json() if a.get("key")}


def check_flow_run_page(page, api: str, flow_run_id: str, tasks: list[str]) -> None:
    """The flow run's page: Completed, its task runs, and every artifact the API lists for it in the Artifacts tab."""
    page.wait_for_url(re.compile(f"/runs/flow-run/{flow_run_id}"))
    page.get_by_role("tab", name="Artifacts").wait_for()  # the flow run's page, drawn
    page.get_by_text("Completed").first.wait_for()
    page.get_by_role("tab", name="Task Runs").click()
    for t in tasks:
        page.get_by_text(t, exact=True).first.wait_for()
    page.get_by_role("tab", name="Artifacts").click()
    keys = flow_run_artifact_keys(api, flow_run_id)
    assert keys, f"flow run {flow_run_id} has no artifacts (expected at least the resolved recipe)"
    for key in keys:
        page.get_by_text(key, exact=True).first.wait_for()


def test_serve_on_another_port_the_ui_calls_its_own_api_and_shows_the_flow_run(browser, tmp_path):
    """Bug 1: `baton serve --port N` (N != 4200) served a UI that called :4200. The server `baton serve` starts
    (flows.server --ui, here with --parent: it exits when that process is gone) must tell the UI its own URL."""
    art, port = tmp_path / "artifacts", free_port()
    assert port != 4200
    url = f"http://127.0.0.1:{port}"
    parent = subprocess.Popen(["sleep", "600"])
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        srv = subprocess.Popen([sys.executable, "-m", "flows.server", str(art), "--port", str(port), "--ui", "--parent",
                                str(parent.pid)], cwd=ROOT, env=child_env(art), stdout=f, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        wait(lambda: (art / "prefect" / "server.json").exists(), 120, "server up", srv, log)
        # what the UI is told to call (GET /ui-settings, its first request)
        assert httpx.get(f"{url}/ui-settings").json()["api_url"] == f"{url}/api"
        p = baton(["run", CONFIG, "--only", "world", "--no-track", "--server", f"{url}/api"], art)
        assert "world      ran" in p.stdout
        (fid,) = [r["id"] for r in httpx.post(f"{url}/api/flow_runs/filter", json={}).json()]
        with page_of(browser, tmp_path / "shots", "prefect") as page:
            calls: list[str] = []
            page.on("request", lambda r: "/api/" in r.url and calls.append(r.url))
            page.goto(url + "/")  # as a person would: the default UI, then Runs, then the run
            page.get_by_role("link", name="Runs", exact=True).first.click()
            page.get_by_text("vlp-micro").first.wait_for()
            page.shot("runs")
            page.locator(f"a[href*='/runs/flow-run/{fid}']").first.click()
            check_flow_run_page(page, f"{url}/api", fid, ["world"])
            page.shot("flow-run-artifacts")
            assert "Unable to connect" not in page.inner_text("body")
        assert calls and all(c.startswith(f"{url}/api/") for c in calls), sorted(set(calls))[:5]
        parent.kill()  # the process that started the server is gone: the server follows
        srv.wait(timeout=30)
        assert "is gone: stopping" in log.read_text()
    finally:
        parent.kill()
        stop(srv)


# ---- slow: a served recipe run from the UI's Run form, its retry, then the MLflow UI over the same run ----------

@pytest.fixture(scope="module")
def ui_run(browser, tmp_path_factory):
    """`baton serve --port P extra/my-recipe.yaml` in a code snapshot; the vlp-micro deployment run from the UI's
    Custom Run form with one override, until its flow run is final. Yields what the tests look at."""
    tmp = tmp_path_factory.mktemp("ui")
    code, _ = snapshot_code(tmp / "code", ROOT / CONFIG)
    (code / "extra").mkdir()
    (code / "extra" / "my-recipe.yaml").write_text((ROOT / CONFIG).read_text())
    art, port = tmp / "artifacts", free_port()
    url, log = f"http://127.0.0.1:{port}", tmp / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(BATON + ["serve", "--port", str(port), "extra/my-recipe.yaml"], cwd=code,
                                env=child_env(art), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait(lambda: "Prefect UI: " in log.read_text(), 300, "baton serve started", proc, log)
        assert httpx.get(f"{url}/ui-settings").json()["api_url"] == f"{url}/api"  # bug 1, through `baton serve`
        def deployments() -> dict:
            return {d["name"]: d for d in httpx.post(f"{url}/api/deployments/filter", json={}).json()}

        deps = wait(lambda: {"vlp-micro", "my-recipe"} <= set(d := deployments()) and d, 120,
                    "deployments baton/vlp-micro (configs/) and baton/my-recipe (named)", proc, log)
        with page_of(browser, tmp / "shots", "run-form") as page:
            fid = custom_run(page, url)
            final = wait(lambda: (s := httpx.get(f"{url}/api/flow_runs/{fid}").json())["state"]["type"] in
                         ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") and s, 900, "the UI's run finished", proc, log)
            page.goto(f"{url}/v2/runs/flow-run/{fid}")
            if final["state"]["type"] == "COMPLETED":
                check_flow_run_page(page, f"{url}/api", fid, ["world", "vl", "vqa"])
            page.shot("flow-run")
        yield {"code": code, "art": art, "url": url, "log": log, "fid": fid, "final": final, "deps": deps,
               "shots": tmp / "shots"}
    finally:
        stop(proc)


def custom_run(page, url: str) -> str:
    """Deployments -> vlp-micro -> Run -> Custom run: the form has the recipe (read-only), overrides, only, track and
    cluster; one override added, Submit. Returns the new flow run's id."""
    page.goto(url + "/")
    page.get_by_role("link", name="Deployments", exact=True).first.click()
    page.get_by_role("link", name="vlp-micro", exact=True).first.click()
    page.get_by_role("button", name="Run", exact=True).first.click()
    page.get_by_role("menuitem", name="Custom run").click()
    for field in ("recipe_path", "overrides", "only", "track", "cluster"):
        page.get_by_text(re.compile(rf"^{field}( \(Optional\))?$")).first.wait_for()
    assert "recipe_snapshot" not in page.inner_text("body")
    page.get_by_role("button", name="Add item").click()
    page.locator("textarea").first.fill(OVERRIDE)  # the new overrides item (the last one is the cluster field)
    page.shot("custom-run")
    page.get_by_role("button", name="Submit").click()
    page.get_by_text(re.compile("scheduled to start")).first.wait_for()
    runs = httpx.post(f"{url}/api/flow_runs/filter", json={}).json()
    assert len(runs) == 1, runs
    return runs[0]["id"]


@pytest.mark.slow  # ~3-5 min with the MLflow check below: baton serve, a whole micro run, a retry
def test_a_recipe_deployment_run_from_the_ui_form_with_one_override_completes(ui_run):
    final, code = ui_run["final"], ui_run["code"]
    assert final["state"]["type"] == "COMPLETED", (final["state"], ui_run["log"].read_text()[-4000:])
    deps = ui_run["deps"]
    assert deps["my-recipe"]["parameters"]["recipe_path"] == str(code / "extra" / "my-recipe.yaml")
    schema = deps["vlp-micro"]["parameter_openapi_schema"]
    assert set(schema["properties"]) == {"recipe_path", "artifacts", "overrides", "only", "track", "cluster"}
    params = final["parameters"]
    assert params["overrides"] == [OVERRIDE]
    assert params["recipe_snapshot"]["stages"]["vqa"]["train"]["steps"] == 4  # the resolved recipe, recorded
    st = json.loads(subprocess.run(BATON + ["status", CONFIG, OVERRIDE, "--json"], cwd=code,
                                   env=child_env(ui_run["art"]), capture_output=True, text=True, check=True).stdout)
    assert {s["name"]: s["state"] for s in st["stages"]} == {s["name"]: "complete" for s in st["stages"]}


@pytest.mark.slow
def test_retry_reruns_the_recipe_the_flow_run_recorded_not_the_edited_file(ui_run):
    url, fid, log, code = ui_run["url"], ui_run["fid"], ui_run["log"], ui_run["code"]
    path = code / CONFIG
    recipe = yaml.safe_load(path.read_text())
    recipe["stages"]["vqa"]["train"]["steps"] = 7  # edited after the run: a retry must not pick this up
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    n_done = log.read_text().count("] done in")
    r = httpx.post(f"{url}/api/flow_runs/{fid}/set_state", json={
        "state": {"type": "SCHEDULED", "name": "AwaitingRetry", "message": "Retry from the UI"}, "force": True})
    assert r.json()["status"] == "ACCEPT", r.text
    fr = wait(lambda: (s := httpx.get(f"{url}/api/flow_runs/{fid}").json())["run_count"] >= 2 and
              s["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") and s, 300, "retry finished", log=log)
    text = log.read_text()
    assert fr["state"]["type"] == "COMPLETED", text[-4000:]
    assert text.count("] done in") == n_done, text[-4000:]  # nothing trained: the recorded recipe's stages, Cached
    assert text.count("[vqa] cached:") >= 1


@pytest.mark.slow
def test_mlflow_ui_shows_vl_inputs_and_the_lineage_picture(ui_run, browser, tmp_path):
    """`baton ui` after the run: the vl stage run lists bert's and detector's LoggedModels as Inputs (and its own
    as Output); the parent run's artifacts hold the recipe and the lineage picture."""
    assert ui_run["final"]["state"]["type"] == "COMPLETED"
    check_mlflow_ui(browser, ui_run["art"], tmp_path)


def check_mlflow_ui(browser, art: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    info = {res.parent.parent.name: json.loads(res.read_text())["info"] for res in art.glob("stages/*/*/result.json")}
    model_of = {stage: i.get("mlflow_model_id") for stage, i in info.items()}
    client = MlflowClient(f"sqlite:///{art / 'mlflow.db'}")
    vl = info["vl"]["mlflow_run_id"]  # the run that trained vl (a later all-cached invocation may list vl too)
    run = client.get_run(vl)
    exp, parent_id = run.info.experiment_id, run.data.tags["mlflow.parentRunId"]
    port = free_port()
    log = tmp_path / "mlflow-ui.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(BATON + ["ui", "--port", str(port)], cwd=ROOT, env=child_env(art), stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait(lambda: _answers(url), 300, "MLflow UI up", proc, log)
        with page_of(browser, tmp_path / "shots", "mlflow") as page:
            page.goto(f"{url}/#/experiments/{exp}/runs/{vl}{ML_LAYOUT}")
            page.get_by_text("Logged models").first.wait_for()
            for stage, role in (("detector", "Input"), ("bert", "Input"), ("vl", "Output")):
                # the Logged models table's row of this stage's model, "Input | - | detector | Ready ..." (the run's
                # description and metrics table may link the same model)
                row = page.get_by_role("row").filter(has=page.locator(f"a[href*='/models/{model_of[stage]}']")) \
                    .filter(has_text=re.compile(rf"^\s*{role}(?![A-Za-z])")).first
                row.wait_for()
                assert stage in row.inner_text().split(), row.inner_text()
            row.scroll_into_view_if_needed()
            page.shot("vl-run")
            page.goto(f"{url}/#/experiments/{exp}/runs/{parent_id}/artifacts{ML_LAYOUT}")
            page.get_by_text("recipe.yaml").first.wait_for()
            page.shot("parent-artifacts")
            # THE LINEAGE PICTURE: lineage.svg at the parent run's artifact root (flows.picture)
            names = {a.path for a in client.list_artifacts(parent_id)}
            assert "lineage.svg" in names, sorted(names)
            page.get_by_text(re.compile(r"^lineage\.(png|svg)$")).first.click()
            img = page.locator("img[alt^='lineage.']").first  # the preview pane draws the picture
            img.wait_for()
            assert img.evaluate("i => i.complete && i.naturalWidth > 0")
            page.shot("lineage")
    finally:
        stop(proc)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False
