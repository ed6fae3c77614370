"""webui: the real server process (python -m webui) over HTTP, and the whole workflow in headless Chromium.

The browser test needs Debian's `chromium` and the `playwright` Python package (never a downloaded browser);
it skips when either is missing. Screenshots go to test-artifacts/webui/.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import FakeHub, FakeRepo
from full_disk import full_disk_at

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "webui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "hf_webuiSecretToken0123456789abcd"


class Server:
    """`python -m webui` in its own process, on a free port, with its own job worker."""

    def __init__(self, workspace: Path, env: dict[str, str] | None = None):
        self.workspace = workspace
        self.proc = subprocess.Popen([sys.executable, "-m", "webui", "--workspace", str(workspace), "--port", "0"],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, f"server did not start: {line}{self.proc.stdout.read() if self.proc.poll() is not None else ''}"
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | str | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """Raw request: the path goes on the wire exactly as given (no client-side normalisation of ../)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            c.putrequest(method, path, skip_accept_encoding=True)
            data = body.encode() if isinstance(body, str) else body
            for k, v in (headers or {}).items():
                c.putheader(k, v)
            if data is not None and "Content-Length" not in (headers or {}):
                c.putheader("Content-Length", str(len(data)))
            c.endheaders(data)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def json(self, method: str, path: str, obj=None) -> tuple[int, dict]:
        status, raw = self.request(method, path, json.dumps(obj) if obj is not None else None,
                                   {"Content-Type": "application/json"} if obj is not None else None)
        return status, json.loads(raw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture()
def workspace(tmp_path, tiny_model):
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    shutil.copytree(tiny_model("llama"), ws / "models" / "tiny")
    return ws


@pytest.fixture()
def server(workspace, tmp_path):
    s = Server(workspace, {"HF_HOME": str(tmp_path / "hf-home")})
    yield s
    s.stop()


# --------------------------------------------------------------------------------------- security
def test_never_serves_files_outside_the_workspace(server, workspace, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    (workspace / "link").symlink_to(tmp_path)                  # a directory symlink leading out
    (workspace / "models" / "leak.txt").symlink_to(secret)     # a file symlink leading out
    (workspace / "ok.txt").write_text("inside")
    assert server.request("GET", "/files/ok.txt") == (200, b"inside")
    attempts = [
        "/files/../secret.txt", "/files/../../etc/passwd", "/files/%2e%2e/secret.txt", "/files/%2E%2E%2Fsecret.txt",
        "/files/models/../../secret.txt", "/files/" + str(secret), "/files//etc/passwd", "/files/link/secret.txt",
        "/files/models/leak.txt", "/files/..%2f..%2fetc%2fpasswd", "/static/../server.py", "/static/%2e%2e/server.py",
        "/static/../../jobs/store.py", "/files/%00", "/..%2f..%2fetc/passwd",
        "/api/files?dir=..", "/api/files?dir=%2e%2e", "/api/files?dir=/etc", "/api/files?dir=link",
        "/api/plan?path=../secret.txt", "/api/plan?path=" + str(secret), "/api/plan?path=link/secret.txt",
        "/api/verify?path=link/secret.txt", "/api/tensors?model=../", "/api/measurements?db=link/secret.txt",
    ]
    for path in attempts:
        status, body = server.request("GET", path)
        assert status in (400, 403, 404), (path, status, body[:200])
        assert b"TOP-SECRET" not in body and b"root:" not in body and b"import " not in body, path
        if status == 403:
            assert b"outside the workspace" in body or b"outside the static folder" in body
    # listing the workspace hides symlinks that lead out
    status, listing = server.json("GET", "/api/files?dir=.")
    assert status == 200 and "link" not in [e["name"] for e in listing["entries"]]
    # jobs cannot be pointed outside either
    for params in ({"model": "../x"}, {"model": str(tmp_path)}, {"model": "link"}):
        status, r = server.json("POST", "/api/jobs", {"kind": "measure", "params": params})
        assert status == 403 and "outside the workspace" in r["error"], (params, r)
    status, r = server.json("POST", "/api/plan/save", {"path": "../evil.yaml", "plan": {"default_type": "Q8_0"}})
    assert status == 403 and not (tmp_path / "evil.yaml").exists()
    status, r = server.json("POST", "/api/plan/tensor-type-file", {"path": "x.yaml", "out": "link/out.txt"})
    assert status in (403, 404) and not (tmp_path / "out.txt").exists()


def test_bad_requests_never_crash_the_server(server):
    cases = [
        ("POST", "/api/jobs", "{not json", {"Content-Type": "application/json"}),
        ("POST", "/api/jobs", "[1, 2]", {"Content-Type": "application/json"}),
        ("POST", "/api/jobs", '{"kind": "rm -rf"}', None),
        ("POST", "/api/jobs", '{"kind": "measure", "params": "x"}', None),
        ("POST", "/api/jobs", '{"kind": "measure", "params": {}}', None),
        ("POST", "/api/jobs", "\xff\xfe", None),
        ("GET", "/api/jobs/abc", None, None),
        ("GET", "/api/jobs/999999", None, None),
        ("POST", "/api/jobs/999999/cancel", None, None),
        ("GET", "/api/nope", None, None),
        ("DELETE", "/api/jobs", None, None),
        ("PUT", "/", "x", None),
        ("GET", "/api/tensors", None, None),
        ("GET", "/api/tensors?model=models", None, None),
        ("GET", "/api/plan?path=missing.yaml", None, None),
        ("POST", "/api/models/open", '{"path": 42}', None),
        ("POST", "/api/models/open", '{"path": "models"}', None),
        ("POST", "/api/plan/save", '{"path": "a.yaml", "plan": "nope"}', None),
        ("POST", "/api/jobs", "", {"Content-Length": "99999999999"}),
        ("POST", "/api/jobs", "", {"Content-Length": "-5"}),
        ("GET", "/nothing-here", None, None),
    ]
    for method, path, body, headers in cases:
        status, raw = server.request(method, path, body, headers)
        assert 400 <= status < 500 or status == 501, (method, path, status, raw[:300])
        if path.startswith("/api/"):
            assert "error" in json.loads(raw), raw
    status, info = server.json("GET", "/api/info")
    assert status == 200 and info["workspace"] == str(server.workspace.resolve())
    assert server.proc.poll() is None


def test_errors_match_the_cli(server, workspace):
    bad = workspace / "strategies" / "broken.yaml"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("default_type: [Q4_K\n")
    status, r = server.json("GET", "/api/plan?path=strategies/broken.yaml")
    cli = subprocess.run([sys.executable, "-m", "strategy", "show", str(bad)], cwd=ROOT, capture_output=True,
                         text=True)
    assert status == 400 and cli.returncode != 0
    assert f"error: {r['error']}" == cli.stderr.strip()
    # a type the tools do not know: the same validation message the converter prints
    status, r = server.json("POST", "/api/plan/save", {"path": "strategies/t.yaml", "model": "models/tiny",
                                                       "plan": {"default_type": "Q8_0",
                                                                "tensors": {"blk.0.attn_q.weight": "Q9_K"}}})
    assert status == 400 and "tensor blk.0.attn_q.weight: unknown type 'Q9_K'" in r["error"]
    status, r = server.json("POST", "/api/plan/save", {"path": "strategies/t.yaml", "model": "models/tiny",
                                                       "plan": {"tensors": {"blk.9.attn_q.weight": "Q4_K"}}})
    assert status == 400 and "not in the model" in r["error"] and "did you mean" in r["error"]
    status, r = server.json("POST", "/api/models/open", {"path": "strategies"})
    assert status == 400 and "no config.json" in r["error"]


def test_saving_onto_a_full_disk_is_one_line(server, workspace):
    """The CLIs' one line for a full disk (HTTP 507), not 'internal error', and no temp file left behind."""
    with full_disk_at(workspace / "full", leave=0) as disk:
        status, r = server.json("POST", "/api/plan/save", {"path": "full/p.yaml", "model": "models/tiny",
                                                           "plan": {"default_type": "Q8_0"}})
        assert status == 507, r
        assert r["error"] == f"{disk / 'p.yaml'}: no space left on device; free some space or choose an output path " \
                             "on another disk"
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_download_job_through_the_api_keeps_the_token_secret(tiny_model, tmp_path):
    src = tiny_model("llama")
    with FakeHub(repos={"org/gated": FakeRepo.from_dir(src, gated=True)}, tokens={TOKEN: {"org/gated"}}) as hub:
        ws = tmp_path / "ws"
        s = Server(ws, {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")})
        try:
            status, j = s.json("POST", "/api/jobs", {"kind": "download", "params": {"repo_id": "org/gated"}})
            assert status == 200
            status, j2 = s.json("POST", "/api/jobs", {"kind": "download", "params": {"repo_id": "org/gated"},
                                                      "token": TOKEN})
            end = time.time() + 90
            while time.time() < end:
                jobs = {x["id"]: x for x in s.json("GET", "/api/jobs")[1]["jobs"]}
                if all(jobs[i]["state"] in ("done", "failed") for i in (j["id"], j2["id"])):
                    break
                time.sleep(0.3)
            assert jobs[j["id"]]["state"] == "failed" and "is a gated repo" in jobs[j["id"]]["error"]
            assert jobs[j2["id"]]["state"] == "done", jobs[j2["id"]]
            status, m = s.json("POST", "/api/models/open", {"path": jobs[j2["id"]]["result"]["model"]})
            assert status == 200 and m["architectures"] == ["LlamaForCausalLM"]
        finally:
            s.stop()
        blob = b"".join(p.read_bytes() for p in (ws / "jobs").rglob("*") if p.is_file())
        assert TOKEN.encode() not in blob


def test_killed_ui_leaves_the_worker_and_its_jobs_running(workspace, tmp_path):
    s = Server(workspace, {"HF_HOME": str(tmp_path / "hf-home")})
    deadline = time.monotonic() + 60
    while (worker := s.json("GET", "/api/info")[1]["worker"]) is None:  # None until it holds the worker lock
        assert time.monotonic() < deadline, "the UI's job worker never came up"
        time.sleep(0.2)
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait()
    os.kill(worker, 0)  # still alive: jobs continue without the UI
    s2 = Server(workspace, {"HF_HOME": str(tmp_path / "hf-home")})
    try:
        assert s2.json("GET", "/api/info")[1]["worker"] == worker  # reused, not a second worker
    finally:
        s2.stop()
        os.kill(worker, signal.SIGTERM)


# --------------------------------------------------------------------------------------- browser
def _have_browser() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "the playwright Python package is not installed (pip install playwright; never `playwright install`)"
    if not Path(CHROMIUM).exists():
        return "Debian's chromium is not installed (apt-get install -y chromium)"
    return None


@pytest.fixture()
def page():
    why = _have_browser()
    if why:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.js_errors = errors  # type: ignore[attr-defined]
        yield pg
        browser.close()


def _stage_ready(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _wait_job(page, box: str, timeout_s: float = 240) -> str:
    page.wait_for_selector(f"{box} .job[data-state=done], {box} .job[data-state=failed], "
                           f"{box} .job[data-state=cancelled]", timeout=timeout_s * 1000)
    st = page.get_attribute(f"{box} .job", "data-state")
    if st != "done":
        raise AssertionError(f"{box}: job {st}: {page.inner_text(box)}")
    return st


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.slow
def test_whole_workflow_in_the_browser(page, tiny_model, tmp_path):
    """Download (fake hub, gated, token typed in), open, measure, build, edit one type, save, export, convert,
    verify — checking what the page shows at each step and what lands on disk."""
    import gguf

    from strategy.plan import load_plan

    missing: list[str] = []
    src = tiny_model("llama")
    hub = FakeHub(repos={"org/tiny": FakeRepo.from_dir(src, gated=True)}, tokens={TOKEN: {"org/tiny"}}).start()
    ws = tmp_path / "ws"
    srv = Server(ws, {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home")})
    try:
        page.goto(srv.url)
        page.wait_for_selector("body[data-ready='1']")

        # ---- 1. models: a bad folder first (same message as the API), then download with a typed token
        page.fill("#open-path", "../../etc")
        page.click("#open-btn")
        page.wait_for_selector("#error:not([hidden])")
        assert "outside the workspace" in page.inner_text("#error-text")
        page.click("#error-close")
        page.fill("#dl-repo", "org/tiny")
        page.fill("#dl-token", TOKEN)
        page.click("#dl-start")
        _wait_job(page, "#dl-job", 120)
        assert page.input_value("#dl-token") == ""
        page.wait_for_function("document.querySelectorAll('#tensor-table tbody tr').length > 0", timeout=120_000)
        assert page.inner_text("#current-model") == "models/org__tiny"
        import catalog

        infos = catalog.list_tensors(src)
        assert page.locator("#tensor-table tbody tr").count() == len(infos)
        row = page.locator("#tensor-table tbody tr[data-name='blk.0.attn_q.weight'] td")
        q = next(i for i in infos if i.name == "blk.0.attn_q.weight")
        assert row.nth(1).inner_text() == " × ".join(map(str, q.shape))
        assert row.nth(2).inner_text() == f"{q.n_params:,}"
        assert row.nth(3).inner_text() == q.cls
        assert f"{len(infos)} tensors" in page.inner_text("#tensor-summary")
        model = ws / "models" / "org__tiny"
        name = "org__tiny"
        # importance matrix from the bundled calibration text; the table then shows each tensor's coverage
        if _stage_ready("measure.imatrix_compute"):
            page.click("#imatrix-compute")
            _wait_job(page, "#imatrix-job", 300)
            page.wait_for_function("document.querySelector('#tensor-table tbody tr[data-name=\"blk.0.attn_q.weight\"] "
                                   "td.imatrix').textContent.includes('%')", timeout=60_000)
            cov = page.inner_text("#tensor-table tbody tr[data-name='blk.0.attn_q.weight'] td.imatrix")
            assert cov.startswith("100% · ") and "tokens" in cov, cov
            assert page.inner_text("#tensor-table tbody tr[data-name='blk.0.attn_norm.weight'] td.imatrix") == "–"
            assert "quantizable tensors have importance data" in page.inner_text("#imatrix-note")
            assert page.input_value("#measure-imatrix") == f"measurements/{name}.imatrix.gguf"
        else:
            missing.append("imatrix (python -m measure imatrix)")
        _shot(page, "1-models")

        # ---- 2. measurement
        page.click("#tab-measure")
        if _stage_ready("measure.db") and _stage_ready("measure.__main__"):
            page.click("#measure-start")
            _wait_job(page, "#measure-job", 600)
        else:  # stand-in until the measure stage lands: the same Measurement rows the strategy e2e test makes
            missing.append("measure (python -m measure / measure.db)")
            from test_strategy_e2e import measure_tiny

            rows = measure_tiny(model)
            (ws / "measurements" / f"{name}.json").write_text(json.dumps([r.to_dict() for r in rows]))
            page.fill("#measure-db", f"measurements/{name}.json")
            page.click("#measure-load")
        page.wait_for_selector("#measure-svg circle.point")
        n_opts = page.locator("#measure-tensor option").count()
        assert n_opts == sum(1 for i in infos if i.quantizable)
        page.select_option("#measure-tensor", "blk.0.attn_q.weight")
        page.wait_for_selector("#measure-chart[data-tensor='blk.0.attn_q.weight']")
        labels = page.locator("#measure-svg circle.point").evaluate_all("els => els.map(e => e.dataset.label)")
        assert {"Q2_K", "Q4_K", "Q8_0"} <= set(labels)
        assert page.locator("#measure-svg circle.knee").count() == 1
        _shot(page, "2-measure")

        # ---- 3. strategy: build at the knee, change one tensor's type, save, export
        page.click("#tab-strategy")
        page.select_option("#build-method", "knee")
        page.click("#build-start")
        _wait_job(page, "#build-job", 240)
        page.wait_for_selector("#plan-table tbody tr[data-name='blk.0.attn_q.weight']")
        sel = "#plan-table select.type-select[data-name='blk.0.attn_q.weight']"
        before_type = page.input_value(sel)
        before_total = int(float(page.get_attribute("#plan-total-size", "data-bytes")))
        new_type = "Q8_0" if before_type != "Q8_0" else "Q6_K"
        page.select_option(sel, new_type)
        tr = page.locator("#plan-table tbody tr[data-name='blk.0.attn_q.weight']")
        rows_, per_row = q.n_params // q.shape[-1], q.shape[-1]
        sizes = {"Q8_0": (32, 34), "Q6_K": (256, 210)}
        blk, nb = sizes[new_type]
        expect_bytes = rows_ * (per_row // blk) * nb
        assert tr.locator("td.bytes").inner_text() == f"{expect_bytes:,}"
        assert "changed" in (tr.get_attribute("class") or "")
        assert "1 tensor(s) changed" in page.inner_text("#plan-changed")
        after_total = int(float(page.get_attribute("#plan-total-size", "data-bytes")))
        old_cell = {"Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_K": (256, 176), "Q4_K": (256, 144),
                    "Q3_K": (256, 110), "Q2_K": (256, 84)}.get(before_type)
        if old_cell:  # the total moves by exactly this tensor's size difference
            assert after_total - before_total == expect_bytes - rows_ * (per_row // old_cell[0]) * old_cell[1]
        assert after_total != before_total
        _shot(page, "3-strategy-edited")
        # measurement chart now marks the edited type as chosen
        page.click("#tab-measure")
        page.wait_for_selector(f"#measure-svg circle.chosen[data-label='{new_type}']")
        page.click("#tab-strategy")
        # a bad file name: the error shows on the page, nothing written
        page.fill("#plan-save-path", "strategies/edited.txt")
        page.click("#plan-save")
        page.wait_for_selector("#error:not([hidden])")
        assert "end in .yaml, .yml or .json" in page.inner_text("#error-text")
        page.click("#error-close")
        page.fill("#plan-save-path", f"strategies/{name}-edited.yaml")
        page.click("#plan-save")
        page.wait_for_function(f"document.querySelector('#notice').textContent.includes('saved strategies/{name}-edited.yaml')")
        saved = load_plan(ws / "strategies" / f"{name}-edited.yaml")
        assert saved.type_for("blk.0.attn_q.weight") == new_type
        built = load_plan(ws / "strategies" / f"{name}.yaml")
        assert all(saved.type_for(i.name) == built.type_for(i.name) for i in infos
                   if i.quantizable and i.name != "blk.0.attn_q.weight")
        # JSON round trip: save as JSON, load it back
        page.fill("#plan-save-path", f"strategies/{name}-edited.json")
        page.click("#plan-save")
        page.wait_for_function(f"document.querySelector('#notice').textContent.includes('saved strategies/{name}-edited.json')")
        assert load_plan(ws / "strategies" / f"{name}-edited.json").digest() == saved.digest()
        assert page.input_value(sel) == new_type
        page.fill("#plan-export-path", f"strategies/{name}.tensor-types.txt")
        page.click("#plan-export")
        page.wait_for_selector("#plan-export-text:not([hidden])")
        exported = (ws / "strategies" / f"{name}.tensor-types.txt").read_text()
        assert f"^blk\\.0\\.attn_q\\.weight$={new_type.lower()}" in exported.splitlines()

        # ---- 4. convert with the edited strategy, and the BF16 base
        page.click("#tab-convert")
        page.fill("#convert-strategy", f"strategies/{name}-edited.yaml")
        page.click("#convert-start")
        _wait_job(page, "#convert-job", 300)
        out = ws / "gguf" / f"{name}-mixed.gguf"
        r = gguf.GGUFReader(str(out))
        assert next(t for t in r.tensors if t.name == "blk.0.attn_q.weight").tensor_type.name == new_type
        page.click("#base-start")
        _wait_job(page, "#convert-job", 300)
        assert (ws / "gguf" / f"{name}-bf16.gguf").exists()

        # ---- 5. verify: KLD of the mixed file against the base, as a table and a chart
        page.fill("#verify-ctx", "128")
        page.click("#verify-start")
        _wait_job(page, "#verify-job", 600)
        page.wait_for_selector("#verify-table tbody tr")
        labels = page.locator("#verify-table tbody tr").evaluate_all("els => els.map(e => e.dataset.label)")
        assert len(labels) == 2
        report = json.loads((ws / "verify" / name / "results.json").read_text())
        cand = report["entries"][0]
        cells = page.locator(f"#verify-table tbody tr[data-label='{cand['label']}'] td").all_inner_texts()
        assert f"{cand['kld_mean']:.6f}" in cells
        assert page.locator("#verify-svg circle.point").count() == 1
        _shot(page, "4-verify")

        # ---- 6. jobs page lists every job as done
        page.click("#tab-jobs")
        page.wait_for_selector("#jobs-table tbody tr")
        states = page.locator("#jobs-table tbody tr td:nth-child(3)").all_inner_texts()
        assert states and all(s == "done" for s in states), states
        _shot(page, "5-jobs")
        assert not page.js_errors, page.js_errors  # type: ignore[attr-defined]
    finally:
        srv.stop()
        hub.stop()
    if missing:
        pytest.xfail("stages not landed yet, stand-ins used for: " + "; ".join(missing))


@pytest.mark.slow
def test_tune_form_in_the_browser(page, server, workspace):
    """The convert page's Tune form: prefilled from the model name, submitted as a tune job on a real quantized
    GGUF, followed live to done at 100%; the tuned file lands where the form says and joins the verify candidates."""
    for outtype, name in (("q4_k", "tiny-mixed"), ("bf16", "tiny-bf16")):
        r = subprocess.run([sys.executable, str(ROOT / "convert_hf_to_gguf_strategy.py"), str(workspace / "models" / "tiny"),
                            "--outtype", outtype, "--outfile", str(workspace / "gguf" / f"{name}.gguf")],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    quant, tuned = workspace / "gguf" / "tiny-mixed.gguf", workspace / "gguf" / "tiny-tuned.gguf"
    # the texts go through the same workspace check as every other path
    status, err = server.json("POST", "/api/jobs", {"kind": "tune", "params": {
        "gguf": "gguf/tiny-mixed.gguf", "base": "gguf/tiny-bf16.gguf", "texts": ["texts/calibration.txt", "../x.txt"]}})
    assert status == 403 and "outside the workspace" in err["error"], err

    page.goto(server.url)
    page.wait_for_selector("body[data-ready='1']")
    page.fill("#open-path", "models/tiny")
    page.click("#open-btn")
    page.wait_for_function("document.querySelectorAll('#tensor-table tbody tr').length > 0", timeout=120_000)
    page.click("#tab-convert")
    assert page.input_value("#tune-gguf") == "gguf/tiny-mixed.gguf"
    assert page.input_value("#tune-base") == "gguf/tiny-bf16.gguf"
    assert page.input_value("#tune-output") == "gguf/tiny-tuned.gguf"
    assert page.input_value("#tune-texts") == "texts/calibration.txt"
    assert page.input_value("#tune-steps") == "60"
    assert [page.is_checked(f"#tune-what-{w}") for w in ("scales", "norms", "codes")] == [True, True, False]
    # nothing to tune: said on the page, no job submitted
    page.uncheck("#tune-what-scales")
    page.uncheck("#tune-what-norms")
    page.click("#tune-start")
    page.wait_for_selector("#error:not([hidden])")
    assert "choose what to tune" in page.inner_text("#error-text")
    assert server.json("GET", "/api/jobs")[1]["jobs"] == []
    page.click("#error-close")
    # a few short steps on a few short chunks: seconds on 2 cores
    page.check("#tune-what-scales")
    page.check("#tune-what-codes")
    page.fill("#tune-texts", "texts/calibration.txt, texts/evaluation.txt")
    page.fill("#tune-steps", "3")
    page.fill("#tune-ctx", "64")
    page.fill("#tune-chunks", "3")
    page.fill("#tune-val-chunks", "2")
    page.click("#tune-start")
    page.wait_for_selector("#tune-job .job")
    _wait_job(page, "#tune-job", 300)
    assert page.inner_text("#tune-job .pct") == "100.0%"
    assert tuned.is_file() and tuned.stat().st_size == quant.stat().st_size
    (job,) = server.json("GET", "/api/jobs")[1]["jobs"]
    assert job["kind"] == "tune" and job["state"] == "done" and job["progress"] == 1.0
    assert job["params"]["what"] == "scales,codes" and job["params"]["texts"] == ["texts/calibration.txt",
                                                                                   "texts/evaluation.txt"]
    full = server.json("GET", f"/api/jobs/{job['id']}")[1]
    assert any("step 3/3" in ln for ln in full["log"]), full["log"]  # the tool's own last step, parsed as 100%
    page.wait_for_function("document.querySelector('#notice').textContent.includes('wrote gguf/tiny-tuned.gguf')")
    assert page.input_value("#verify-candidates") == "gguf/tiny-mixed.gguf, gguf/tiny-tuned.gguf"
    _shot(page, "6-tune")
    assert not page.js_errors, page.js_errors  # type: ignore[attr-defined]
