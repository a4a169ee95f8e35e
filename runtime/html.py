"""Search and score results as one self-contained HTML page (``--html`` of runtime.search and runtime.score).

    with atomic_open("results.html", "w") as f:
        page = ResultsPage(f, "runtime.search: gallery_index")
        page.caption_query(0, "a red dog", [Match("photos/dog.jpg", 0.81, picture="in/photos/dog.jpg"), ...])
        page.picture_query(1, "cat.jpg", "in/cat.jpg", [Match("a cat on a sofa", 0.77), ...])
        page.close()

One file, nothing fetched: every picture is inlined as a ``data:`` URI of a thumbnail (at most
THUMB_SIZE px a side, downscaled with Pillow: JPEG for photographs, PNG for drawings (PNG, GIF,
BMP sources), EXIF orientation applied, transparency on white), each made once per page and
kept in a small cache. A query is a caption with its best pictures (an image gallery), or a
picture with its best captions (a caption gallery); items that are region features, not
pictures, are shown by id and score only, and the page says so. Every text (captions, ids, file
names) is escaped (html.escape); the page has no script. The page is written as it goes (one
query section at a time): memory stays that of one query, whatever the number of queries.

numpy-free: Pillow and the standard library only.
"""
from __future__ import annotations

import base64
import html
import io
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from PIL import Image, ImageOps

from .images import MAX_PIXELS, to_rgb

THUMB_SIZE = 160  # px, the longer side of a thumbnail at most
THUMB_CACHE = 512  # thumbnails kept for reuse (a picture matched by many queries is made once per 512)
JPEG_QUALITY = 85
LOSSLESS_FORMATS = ("PNG", "GIF", "BMP")  # drawings, shapes, screenshots: PNG thumbnails

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}
p.info{color:#555;margin:.2em 0}
section.query{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em 1em;margin:1em 0}
section.query h2{font-size:1.05em;margin:0 0 .6em;font-weight:600}
section.query h2 .n{color:#888;font-weight:400;margin-right:.4em}
.note{color:#a15c00;font-size:.9em;margin:.2em 0 .6em}
.grid{display:flex;flex-wrap:wrap;gap:.8em}
figure{margin:0;width:%(size)dpx}
figure .frame{width:%(size)dpx;height:%(size)dpx;display:flex;align-items:center;justify-content:center;
background:#eee;border-radius:4px;overflow:hidden}
figure img{max-width:%(size)dpx;max-height:%(size)dpx}
figure .none{color:#888;font-size:.8em;text-align:center;padding:.5em}
figcaption{font-size:.8em;margin-top:.3em;word-break:break-all}
.rank{color:#888}.score{font-family:ui-monospace,monospace}
.querypic{display:flex;gap:1.2em;align-items:flex-start}
ol.captions{margin:0;padding-left:1.6em}
ol.captions li{margin:.25em 0}
""" % {"size": THUMB_SIZE}


@dataclass
class Match:
    """One result: label (an id or a caption), score, and picture: the file to show (None: none)."""
    label: str
    score: float
    picture: str | None = None
    row: int | None = None


def esc(text: object) -> str:
    """Text for HTML element content or a quoted attribute."""
    return html.escape(str(text), quote=True)


def thumbnail(path: str | os.PathLike, size: int = THUMB_SIZE) -> str | None:
    """The picture at ``path`` as a ``data:image/...;base64,`` URI of at most ``size`` px a side;
    None when it is missing or cannot be decoded (the page then shows its id without it)."""
    try:
        with Image.open(os.fspath(path)) as image:
            if image.size[0] * image.size[1] > MAX_PIXELS:
                return None
            lossless = image.format in LOSSLESS_FORMATS
            if image.format == "JPEG":
                image.draft("RGB", (2 * size, 2 * size))  # decode at a reduced scale: fast for large photos
            image = to_rgb(ImageOps.exif_transpose(image))
            image.thumbnail((size, size), Image.LANCZOS)
            out = io.BytesIO()
            if lossless:
                image.save(out, "PNG", optimize=True)
            else:
                image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None
    kind = "png" if lossless else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(out.getvalue()).decode('ascii')}"


class ResultsPage:
    """Writes the page to ``stream`` (a text file open for writing) as queries come.

    title: the page's heading; info: lines shown under it (what was searched, with what);
    no_pictures: the items are region features, not pictures (the page says so once)."""

    def __init__(self, stream, title: str, info: Iterable[str] = (), no_pictures: str | None = None):
        self.stream, self.n_queries, self._cache = stream, 0, OrderedDict()
        stream.write("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                     "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
                     f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
                     f"<h1>{esc(title)}</h1>\n")
        for line in info:
            stream.write(f"<p class=\"info\">{esc(line)}</p>\n")
        if no_pictures:
            stream.write(f"<p class=\"info note\">{esc(no_pictures)}</p>\n")

    def _thumb(self, path: str | None) -> str | None:
        if path is None:
            return None
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        uri = self._cache[path] = thumbnail(path)
        if len(self._cache) > THUMB_CACHE:
            self._cache.popitem(last=False)
        return uri

    def _figure(self, uri: str | None, caption: str, missing: str = "") -> str:
        inner = (f"<img src=\"{uri}\" alt=\"\">" if uri else
                 f"<div class=\"none\">{esc(missing)}</div>" if missing else "<div class=\"none\">no picture</div>")
        return f"<figure><div class=\"frame\">{inner}</div><figcaption>{caption}</figcaption></figure>"

    def _section(self, number: int, heading: str, body: str, notes: Iterable[str] = ()) -> None:
        self.n_queries += 1
        self.stream.write(f"<section class=\"query\" id=\"s{self.n_queries}\">\n<h2><span class=\"n\">{number}</span>"
                          f"{heading}</h2>\n")
        for note in notes:
            self.stream.write(f"<p class=\"note\">{esc(note)}</p>\n")
        self.stream.write(body + "</section>\n")

    def caption_query(self, number: int, text: str, matches: Iterable[Match], notes: Iterable[str] = ()) -> None:
        """A caption and its best items (pictures when known, else a list of ids), best first."""
        matches = list(matches)
        if all(m.picture is None for m in matches):  # region features: ids and scores
            items = "".join(f"<li><span class=\"score\">{m.score:.4f}</span> {esc(m.label)}</li>" for m in matches)
            self._section(number, esc(text), f"<ol class=\"captions\">{items}</ol>\n", notes)
            return
        figures = []
        for rank, m in enumerate(matches, 1):
            uri = self._thumb(m.picture)
            label = f"<span class=\"rank\">{rank}.</span> <span class=\"score\">{m.score:.4f}</span><br>{esc(m.label)}"
            figures.append(self._figure(uri, label, "" if m.picture is None else "picture not readable"))
        self._section(number, esc(text), "<div class=\"grid\">" + "".join(figures) + "</div>\n", notes)

    def picture_query(self, number: int, label: str, picture: str | None, matches: Iterable[Match],
                      notes: Iterable[str] = ()) -> None:
        """A picture (or a features row: picture None) and its best captions, best first."""
        query = "" if picture is None else self._figure(self._thumb(picture), "", "picture not readable")
        items = "".join(f"<li><span class=\"score\">{m.score:.4f}</span> {esc(m.label)}</li>" for m in matches)
        self._section(number, esc(label), f"<div class=\"querypic\">{query}<ol class=\"captions\">{items}</ol></div>\n",
                      notes)

    def heading(self, text: str) -> None:
        """A heading between groups of queries."""
        self.stream.write(f"<h1>{esc(text)}</h1>\n")

    def close(self) -> None:
        self.stream.write("</body>\n</html>\n")
