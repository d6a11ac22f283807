"""The app through gradio_client against launch(prevent_thread_lock=True), on tiny checkpoints,
and once in real headless Chromium (skipped with a reason when chromium is not installed)."""
import concurrent.futures as cf
import contextlib
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import tiny_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    cks = tmp / "checkpoints"
    cks.mkdir()
    for model in ("cmi-mtl", "cmdpi", "baseline"):
        shutil.copytree(tiny_checkpoint(tmp / model, model), cks / f"{model}-vqa-rad")
    old = os.environ.get("MEDVQA_CHECKPOINTS")
    os.environ["MEDVQA_CHECKPOINTS"] = str(cks)
    os.environ["MEDVQA_DATA"] = str(tmp / "user-data")
    os.environ["MEDVQA_DATA_ROOT"] = str(tmp / "no-datasets")   # unit-speed app: no nearest-case index over real data
    from medvqa.app import build

    demo = build()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    os.environ.pop("MEDVQA_DATA", None)
    os.environ.pop("MEDVQA_DATA_ROOT", None)
    if old is None:
        os.environ.pop("MEDVQA_CHECKPOINTS", None)
    else:
        os.environ["MEDVQA_CHECKPOINTS"] = old


def _img(path, level):
    a = np.full((48, 48), level, np.uint8)
    a[10:20, 10:30] = 255 - level
    Image.fromarray(a).save(path)
    return path


def test_ask_both_models(app_url, tmp_path):
    from gradio_client import Client, handle_file

    c = Client(app_url, verbose=False)
    r = c.predict(handle_file(str(_img(tmp_path / "a.png", 30))), "Is there a fracture?", "vqa-rad", api_name="/ask")
    assert set(r["models"]) == {"cmi-mtl-vqa-rad", "cmdpi-vqa-rad", "baseline-vqa-rad"}
    for m in r["models"].values():
        assert {"answer", "score", "top_k", "free_text"} <= set(m) and m["answer"] == m["top_k"][0][0]
    cmi = r["models"]["cmi-mtl-vqa-rad"]
    assert isinstance(cmi["free_text"], str) == (cmi["kind"] == "open")   # the AHead writes for open answers


def test_bad_upload_and_question_clear_errors(app_url, tmp_path):
    from gradio_client import Client, handle_file

    c = Client(app_url, verbose=False)
    (tmp_path / "x.png").write_bytes(b"this is not an image")
    with pytest.raises(Exception, match="not a readable image"):
        c.predict(handle_file(str(tmp_path / "x.png")), "Is it?", "vqa-rad", api_name="/ask")
    with pytest.raises(Exception, match="question is empty"):
        c.predict(handle_file(str(_img(tmp_path / "a.png", 30))), "  ", "vqa-rad", api_name="/ask")
    with pytest.raises(Exception, match="was not uploaded"):   # FileData without its meta tag skips Gradio's checks
        c.predict({"path": "/etc/passwd"}, "Is it?", "vqa-rad", api_name="/ask")
    # still serving
    r = c.predict(handle_file(str(_img(tmp_path / "b.png", 90))), "Is it normal?", "vqa-rad", api_name="/ask")
    assert r["models"]


def test_concurrent_asks_never_mix(app_url, tmp_path):
    """A bounded loopback load test: 20 clients at once over different images and questions, with
    corrupt uploads and empty questions mixed in. Each good ask gets its own single-user answer, each
    bad one its clear message, and the app keeps serving."""
    from gradio_client import Client, handle_file

    from medvqa.predict import Predictor

    (tmp_path / "bad.png").write_bytes(b"this is not an image")
    cases = [(str(_img(tmp_path / f"c{i}.png", 12 * i)), f"Question number {i}?") for i in range(20)]
    bad = {3: (str(tmp_path / "bad.png"), "Is it?"), 9: (cases[9][0], "   "), 15: (str(tmp_path / "bad.png"), "Is it?")}
    cases = [bad.get(i, c) for i, c in enumerate(cases)]
    cks = {m: Predictor.load(os.path.join(os.environ["MEDVQA_CHECKPOINTS"], f"{m}-vqa-rad"))
           for m in ("cmi-mtl", "cmdpi", "baseline")}
    want = [None if i in bad else {m: p.answer(im, q).top_k for m, p in cks.items()} for i, (im, q) in enumerate(cases)]
    cks["cmi-mtl"].backbone.clear()            # the answers above must not simply come back from the cache
    n = len(cks["cmi-mtl"].backbone.batches)

    def ask(pq):
        try:
            return Client(app_url, verbose=False).predict(handle_file(pq[0]), pq[1], "vqa-rad", api_name="/ask")
        except Exception as e:
            return e
    with cf.ThreadPoolExecutor(20) as ex:
        got = list(ex.map(ask, cases))
    for i, (w, g) in enumerate(zip(want, got)):
        if w is None:
            assert isinstance(g, Exception) and ("not a readable image" in str(g) or "question is empty" in str(g)), g
            continue
        for m, top in w.items():
            t = g["models"][f"{m}-vqa-rad"]["top_k"]
            assert [a for a, _ in t] == [a for a, _ in top]
            assert np.allclose([s for _, s in t], [s for _, s in top], atol=1e-3)
    assert len(cks["cmi-mtl"].backbone.batches) - n <= 17     # never more passes than good images
    r = Client(app_url, verbose=False).predict(handle_file(cases[0][0]), "Is it normal?", "vqa-rad", api_name="/ask")
    assert r["models"]


@contextlib.contextmanager
def _page(app_url):
    """A headless Chromium page on the app (the test is skipped when chromium is not installed)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url)
        try:
            yield page
        finally:
            browser.close()


def test_browser_click_example(app_url, tmp_path):
    """Real headless Chromium: load the page, click an example, see both answers and a saliency image."""
    from medvqa.predict import Predictor

    with _page(app_url) as page:
        # the first example's answers and maps are there on load, computed once for every visitor
        page.get_by_text("Saliency: head-attention").nth(2).wait_for(timeout=60_000)
        bb = Predictor.load(os.path.join(os.environ["MEDVQA_CHECKPOINTS"], "cmi-mtl-vqa-rad")).backbone
        n = len(bb.batches)
        second = page.context.browser.new_page(viewport={"width": 1366, "height": 900})
        second.goto(app_url)
        second.get_by_text("Saliency: head-attention").nth(2).wait_for(timeout=60_000)
        assert len(bb.batches) == n, "a visitor's page load ran the backbone"
        second.close()
        page.get_by_text("Is there evidence of an aortic aneurysm?").first.click()
        page.get_by_text("Top answers").nth(1).wait_for(timeout=60_000)
        page.locator("text=Saliency").first.wait_for(timeout=60_000)
        page.get_by_text("Saliency: head-attention").nth(2).wait_for(timeout=60_000)   # each model's own map
        assert page.get_by_text("CMI-MTL").count() >= 1 and page.get_by_text("CMDPI").count() >= 1 and page.get_by_text("Baseline").count() >= 1
        page.wait_for_timeout(1500)
        page.screenshot(path=str(tmp_path / "ask.png"), full_page=True)
    assert (tmp_path / "ask.png").stat().st_size > 20_000


def test_browser_heatmap_toggle(app_url):
    """Real headless Chromium: the Heatmap switch hides every model's map (the plain image, labelled
    so) and brings the maps back."""
    with _page(app_url) as page:
        # The first screen (the first example, shown on load) has the maps: clicking that example again
        # would start a second ask whose answer could land after the switch and overwrite it.
        page.get_by_text("Saliency: head-attention").nth(2).wait_for(timeout=60_000)
        page.get_by_label("Heatmap").uncheck()
        page.get_by_text("Saliency: heatmap off").nth(2).wait_for(timeout=60_000)       # all three slots
        assert page.get_by_text("Saliency: head-attention").count() == 0
        page.get_by_label("Heatmap").check()
        page.get_by_text("Saliency: head-attention").nth(2).wait_for(timeout=60_000)
        assert page.get_by_text("Saliency: heatmap off").count() == 0


def test_browser_heatmap_switched_during_an_ask_stays_switched(app_url, monkeypatch):
    """Real headless Chromium: the switch flipped while an ask runs holds when the ask's answers land
    (they were drawn with the switch as it stood at the click)."""
    import time

    import medvqa.app.ask as ask

    slow = ask.ask_json
    monkeypatch.setattr(ask, "ask_json", lambda *a: (time.sleep(3), slow(*a))[1])   # an ask as slow as a real one
    with _page(app_url) as page:
        page.get_by_text("Saliency: head-attention").nth(2).wait_for(timeout=60_000)
        page.get_by_text("Is this an axial plane?").first.click()
        page.get_by_label("Heatmap").uncheck()              # the switch's own redraw lands before the ask's answers
        page.get_by_text("Saliency: heatmap off").nth(2).wait_for(timeout=60_000)
        page.wait_for_timeout(8_000)                        # the ask (3 s + tiny models) and what follows it are done
        assert page.get_by_text("Saliency: head-attention").count() == 0
        assert page.get_by_text("Saliency: heatmap off").count() == 3


def test_saliency_method_a_model_lacks_falls_back_and_says_so(app_url, tmp_path):
    """query-attention is CMI-MTL's and the baseline's, not CMDPI's: CMDPI's slot shows its own map
    (the rollout), labelled so, instead of failing the whole answer."""
    from medvqa.app.ask import OWN_METHOD, _cams
    from medvqa.app.common import checkpoints_for

    cks = checkpoints_for("vqa-rad")              # cmi-mtl, cmdpi, baseline
    im = Image.open(_img(tmp_path / "s.png", 40)).convert("RGB")
    q = "Is there a fracture?"
    mtl, cmdpi, base = _cams(cks, im, q, "query-attention", [None] * 3, 0.5)
    assert cmdpi["label"] == "Saliency: head-attention (query-attention: not available for this model)"
    w, h = cmdpi["value"].size
    assert w > im.width and h > im.height         # the caption above the map and the colour bar beside it
    off = _cams(cks[1:2], im, q, "query-attention", [None], 0.5, heatmap=False)[0]
    assert off["value"] is im and off["label"] == "Saliency: heatmap off"
    assert _cams(cks[:1], im, q, OWN_METHOD, [None], 0.5)[0]["label"] == "Saliency: head-attention"
    assert base["label"] == mtl["label"] == "Saliency: query-attention"
    assert "the same map for every answer" in _cams(cks[:1], im, q, "query-attention", ["yes"], 0.5)[0]["label"]


def test_review_survives_restart_and_exports(app_url):
    from gradio_client import Client

    from medvqa.app import build

    c = Client(app_url, verbose=False)
    summ = c.predict("Dr A", "examples", "ex0", "cmi-mtl-vqa-rad", "corrected", "left lung", "subtle",
                     api_name="/review")
    assert summ["models"]["cmi-mtl-vqa-rad"]["n"] == 1
    try:
        c.predict("Dr A", "examples", "ex1", "cmi-mtl-vqa-rad", "maybe", "", "", api_name="/review")
        raise AssertionError("a bad verdict must be refused")
    except Exception as e:
        assert "verdict" in str(e)
    second = build()   # a restarted app on the same user data dir
    port = _free_port()
    second.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        text = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(api_name="/review_export")
    finally:
        second.close()
    lines = text.strip().splitlines()
    assert lines[0].startswith("reviewer,source,qid") and len(lines) == 2
    assert "Dr A,examples,ex0" in lines[1] and "left lung" in lines[1]


def _cases_zip(tmp_path, n=24):
    import zipfile

    from tests.helpers import make_cases_csv

    make_cases_csv(tmp_path / "cases", n)
    z = tmp_path / f"cases{n}.zip"
    with zipfile.ZipFile(z, "w") as zf:
        for p in (tmp_path / "cases").iterdir():
            zf.write(p, p.name)
    return z


def _wait(c, until, timeout=300):
    import time

    t0 = time.time()
    while time.time() - t0 < timeout:
        s = c.predict(api_name="/finetune_status")
        if s["status"] in until:
            return s
        time.sleep(1)
    raise AssertionError(f"fine-tune still {s['status']} after {timeout} s")


def test_finetune_runs_then_cancel_leaves_checkpoint(app_url, tmp_path):
    from gradio_client import Client, handle_file

    c = Client(app_url, verbose=False)
    z = handle_file(str(_cases_zip(tmp_path)))
    name = c.predict("baseline", "uploaded zip", z, "tiny", 2, 1e-3, [], 1, api_name="/finetune")   # top block trained
    s = _wait(c, ("done", "failed", "cancelled"))
    assert s["status"] == "done", s
    ck = Path(s["out"])
    assert ck.name == name and (ck / "model.safetensors").is_file() and (ck / "backbone.safetensors").is_file()
    before = (ck / "model.safetensors").read_bytes()
    r = c.predict(handle_file(str(_img(tmp_path / "q.png", 60))), "Is there a fracture?", "folder", api_name="/ask")
    assert name in r["models"]                                   # selectable in Ask
    big = handle_file(str(_cases_zip(tmp_path, 400)))          # long enough to still be running below
    name2 = c.predict("baseline", "uploaded zip", big, "tiny", 10, 1e-3, [], api_name="/finetune")
    refused = False
    try:
        c.predict("baseline", "uploaded zip", z, "tiny", 1, 1e-3, [], api_name="/finetune")
    except Exception as e:
        refused = "already going" in str(e)
    c.predict(api_name="/finetune_cancel")
    assert refused, "a second run must be refused while one is going"
    s = _wait(c, ("done", "failed", "cancelled"))
    assert s["status"] == "cancelled" and not Path(s["out"]).exists() and s["name"] == name2, s
    assert (ck / "model.safetensors").read_bytes() == before


def test_fine_tune_names_never_collide(tmp_path, monkeypatch):
    """Two runs started within one second got one name, and the second wrote into the first's folder."""
    from medvqa.app.finetune import _fresh_name

    monkeypatch.setenv("MEDVQA_DATA", str(tmp_path))
    assert _fresh_name("baseline-uploaded-ft-20261129-131850") == "baseline-uploaded-ft-20261129-131850"
    (tmp_path / "checkpoints" / "baseline-uploaded-ft-20261129-131850").mkdir(parents=True)
    (tmp_path / "runs" / "baseline-uploaded-ft-20261129-131850-2").mkdir(parents=True)   # a cancelled run's workdir
    assert _fresh_name("baseline-uploaded-ft-20261129-131850") == "baseline-uploaded-ft-20261129-131850-3"


def test_fine_tune_offers_only_the_terms_its_run_trains():
    """The tab fine-tunes (`train`): CMDPI's pretraining terms would be ignored there, so they are not offered."""
    from medvqa.app.finetune import _ablations, start

    assert _ablations("cmdpi")["choices"] == ["diff", "mixup"]
    with pytest.raises(ValueError, match="diff, mixup"):
        start("cmdpi", "vqa-rad", None, "tiny", 1, 1e-4, ["global"])


def test_feature_points_follow_the_weights(tmp_path, monkeypatch):
    """A precomputed UMAP file is used only for the weights it was computed from: the shipped
    ones match the shipped checkpoints, and a retrained checkpoint never shows old points."""
    import json

    from medvqa.app.features import SHIPPED_POINTS, load_points, weights_id

    shipped = Path(__file__).parents[1] / "assets" / "checkpoints"
    for f in sorted(SHIPPED_POINTS.glob("*.json")):
        assert json.loads(f.read_text()).get("weights") == weights_id(shipped / f.stem), f"{f.name} is stale: python -m medvqa.app.features assets/checkpoints/{f.stem} DATASET_ROOT"
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "mine"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"first weights")
    cached = tmp_path / "cache" / "embeddings" / "mine.json"
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps({"weights": weights_id(ck), "xy": [[0, 0]]}))
    assert load_points(ck) == {"weights": weights_id(ck), "xy": [[0, 0]]}
    (ck / "model.safetensors").write_bytes(b"retrained weights")
    assert load_points(ck) is None            # stale, and no dataset to recompute from


def test_about_shows_each_accuracy_with_its_interval(tmp_path, monkeypatch):
    import json

    from medvqa.app import about
    from medvqa.calibration import gate

    assert about._overall({"overall": 72.73, "n": 451}) == "72.73 (68.4–76.6)"
    assert about._overall({"overall": 50.0}) == "50.0" and about._overall({}) == "–"     # older metrics without n
    ck = tmp_path / "cmdpi-vqa-rad"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model": "cmdpi"}))
    (ck / "metrics.json").write_text(json.dumps({"test": {"open": 60.89, "closed": 80.51, "overall": 72.73, "n": 451}}))
    monkeypatch.setattr(about, "checkpoints_for", lambda ds: [ck])
    rows = about.accuracy_table().splitlines()
    assert "overall (95 % interval)" in rows[0] and "| 72.73 (68.4–76.6) |" in rows[2]
    assert about._ece({"ece": 18.25, "ece_calibrated": 9.26}, {"temperature": 2.2543}) == "18.25 → 9.26 (T = 2.25)"
    assert about._ece({"ece": 15.01, "ece_calibrated": 15.01}, {"temperature": 1.0}) == "15.01 (not calibrated)"
    gated = gate({"temperature": 1.65}, {"ece_before": 11.8, "ece_after": 15.66}, "fitted on a slice")
    assert about._ece({"ece": 15.01, "ece_calibrated": 15.01}, gated) == \
        "15.01 (T = 1: the fitted T did not lower the ECE where it was fitted)"
    assert about._ece({"ece": 9.11}, {}) == "9.11 (not calibrated)" and about._ece({}, {}) == "–"


def test_review_shows_each_models_map_to_keep_with_the_verdict(app_url):
    """The Review tab shows every model's own map beside its answer, with an unticked "map points
    at the wrong place" box, and hands those very images on to be stored with the verdicts."""
    from medvqa.app.review import SLOT_WIDTH, load_cases, show

    cases = load_cases("examples", None)
    out = show(cases, 0, "vqa-rad", "ann", "examples")
    shown, slots = out[-1], out[4:-1]
    assert len(slots) == SLOT_WIDTH * len(shown)
    for k, s in enumerate(shown[:3]):
        method, fig = s
        ans, _, _, cam, wrong = slots[SLOT_WIDTH * k: SLOT_WIDTH * (k + 1)]
        assert method == "head-attention" and cam["value"] is fig and cam["label"].endswith("map: head-attention")
        assert wrong["value"] is False and wrong["visible"]
    assert shown[3] is None                                          # no fourth model installed
