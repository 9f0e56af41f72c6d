"""report(): one self-contained HTML file; checked in headless Chromium when it is installed."""
import json
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _analysis_fixtures import (CLASS_NAMES, CLASS_TO_SUPER, SUPER_NAMES, BrightGate, RedBlueGate,  # noqa: E402
                                TinyMoENet, planted_images, planted_routing, probe_routing_arrays)

from moecnn.analysis import analyze, report  # noqa: E402

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CHECK_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images), bad = [];
  imgs.forEach(function (im, i) { if (!(im.complete && im.naturalWidth > 0)) bad.push(im.alt || String(i)); });
  var el = document.createElement('pre'); el.id = 'imgcheck';
  el.textContent = 'IMGCHECK ' + JSON.stringify({total: imgs.length, broken: bad});
  document.body.appendChild(el);
});
</script>"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    images, labels = planted_images(n_per_class=40)
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"epoch": e, "routing": {"layer4.moe": {"importance": [0.6 - 0.05 * e, 0.4 + 0.05 * e], "routed": [1, 1]}}})
        for e in range(4)) + "\n")
    acc = {"source": "test", "default": {"top1": 80.0, "per_class": [80.0] * 4, "per_superclass": [80.0, 80.0]},
           "k_sweep": {"1": {"top1": 78.0}, "2": {"top1": 80.0}},
           "forced": {"0": {"top1": 50.0, "per_superclass": [90.0, 10.0]},
                      "1": {"top1": 52.0, "per_superclass": [12.0, 92.0]}},
           "disabled": {"0": {"top1": 51.0}, "1": {"top1": 49.0}}}
    analyze(d, routing={**planted_routing(labels), "images": images}, class_names=CLASS_NAMES,
            superclass_names=SUPER_NAMES, class_to_super=CLASS_TO_SUPER, accuracy=acc, max_tsne=120, n_perm=50,
            progress=False)
    report(d)
    return d


@pytest.fixture(scope="module")
def explain_run(tmp_path_factory):
    """A run analysed with its model (two MoE layers: colour, then brightness), attribution, concepts, a probe
    routing file and training metrics: every section of the report."""
    d = tmp_path_factory.mktemp("explain")
    images, labels = planted_images(n_per_class=30, size=32)
    np.savez(d / "probe_routing.npz", **probe_routing_arrays())
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(
        {"epoch": e, "routing": {"moe1": {"importance": [0.5, 0.5], "routed": [1, 1]}}}) for e in range(3)) + "\n")
    concepts = d / "concepts.csv"
    concepts.write_text("image_id,concept\n" + "".join(f"{i},{'bright' if labels[i] % 2 == 0 else 'plain'}\n"
                                                        for i in range(0, len(labels), 3)))
    model = TinyMoENet(RedBlueGate(), k=2, gate2=BrightGate(threshold=0.4)).eval()
    analyze(d, model=model, images=images, labels=labels, class_names=CLASS_NAMES, superclass_names=SUPER_NAMES,
            class_to_super=CLASS_TO_SUPER, max_tsne=60, n_perm=50, attribution=24, attribution_examples=2,
            ig_steps=8, concepts=concepts, progress=False, compute_accuracy_with_model=False)
    report(d)
    return d


def _n_figures(summary):
    n = sum(len(L["figures"]) for L in summary["per_layer"].values())
    n += len((summary.get("accuracy") or {}).get("figures", {}))
    n += len((summary.get("training") or {}).get("figures", {}))
    n += len((summary.get("flow") or {}).get("figures", {})) + len((summary.get("dynamics") or {}).get("figures", {}))
    return n


def _check_self_contained(html, summary):
    srcs = re.findall(r'src="([^"]*)"', html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing fetched from the network
    assert "<link" not in html and "missing figure" not in html
    assert len(srcs) == _n_figures(summary)


def test_report_is_self_contained(run_dir):
    html = (run_dir / "report.html").read_text()
    summary = json.loads((run_dir / "analysis" / "summary.json").read_text())
    _check_self_contained(html, summary)
    assert "forced_per_superclass" in summary["accuracy"]["figures"]
    for text in ("Utilisation", "Specialisation tests", "t-SNE of gate logits", "Fig. 3", "Fig. 4",
                 "expert 0: flowers", "Accuracy under routing controls", "Utilisation over training",
                 "weights most and least"):
        assert text in html, text


def test_report_explain_sections(explain_run):
    html = (explain_run / "report.html").read_text()
    summary = json.loads((explain_run / "analysis" / "summary.json").read_text())
    _check_self_contained(html, summary)
    for text in ("Which image attributes does routing follow?", "Concept labels", "Why this expert? Gate attribution",
                 "What does each expert add? Expert contribution", "Layer-to-layer flow",
                 "Routing dynamics during training", "All tests of this run (Benjamini–Hochberg)",
                 "href='#flow'", "href='#dynamics'", "href='#tests'", "Utilisation over training"):
        assert text in html, text
    # every figure of the new sections comes with its one-sentence caption
    captions = re.findall(r"</figure>", html)
    new = [k for L in summary["per_layer"].values() for k in L["figures"]
           if k in ("attributes", "concepts", "attribution_mean", "attribution_examples", "contribution",
                    "interchangeability", "contribution_examples")]
    assert len(new) == 14 and len(captions) >= len(new) + 2
    for m in re.finditer(r"<figure><img [^>]*alt=\"(attribution|contribution|flow|dynamics|attributes|concepts|"
                         r"interchangeability)[^\"]*\"[^>]*><figcaption>([^<]*)</figcaption>", html):
        assert m.group(2).strip().endswith("."), m.group(0)[:80]


def test_detection_sections_included(tmp_path, monkeypatch):
    (tmp_path / "config.yaml").write_text("task: detection\n")
    fake = types.ModuleType("moecnn.analysis.detection")
    fake.detection_report_sections = lambda rd: [("Detection AP per forced expert", "<p>AP table here</p>")]
    monkeypatch.setitem(sys.modules, "moecnn.analysis.detection", fake)
    path = report(tmp_path)
    html = path.read_text()
    assert "Detection AP per forced expert" in html and "AP table here" in html
    assert json.loads((tmp_path / "analysis" / "summary.json").read_text())["task"] == "detection"


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        p = shutil.which(name)
        if p:
            return p
    return None


@pytest.mark.browser
@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (apt-get install -y chromium)")
@pytest.mark.parametrize("which", ["run_dir", "explain_run"])
def test_report_renders_in_chromium(which, request, tmp_path):
    run_dir = request.getfixturevalue(which)
    exe = _chromium()
    html = (run_dir / "report.html").read_text()
    page = tmp_path / "check.html"
    page.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"))
    flags = CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([exe, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"IMGCHECK (\{.*?\})", dom.stdout)
    assert m, f"the check script did not run; stderr tail: {dom.stderr[-2000:]}"
    res = json.loads(m.group(1).replace("&quot;", '"'))
    assert res["total"] == html.count("<img ") and res["total"] > 10
    assert res["broken"] == [], f"images that did not load: {res['broken']}"
    shot = run_dir / "report_screenshot.png"
    subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile2'}", f"--screenshot={shot}",
                    "--window-size=1280,3000", "--hide-scrollbars", (run_dir / "report.html").as_uri()],
                   capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert shot.is_file() and shot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size[0] >= 1000
        arr = np.asarray(im.convert("L"))
    assert arr.std() > 5  # not a blank page
    shutil.copy(shot, tmp_path / "report_screenshot.png")


def test_detection_run_with_real_module(tmp_path):
    pytest.importorskip("moecnn.analysis.detection")
    (tmp_path / "config.yaml").write_text("task: detection\n")
    html = report(tmp_path).read_text()
    assert html.startswith("<!DOCTYPE html>") and "detection analyses failed" not in html


def test_report_function_not_shadowed_by_module(run_dir):
    import moecnn.analysis as A

    A.report(run_dir)
    assert callable(A.report) and callable(A.report) and A.report(run_dir).name == "report.html"
