"""The self-contained report page: images inlined as base64 data URIs, inline CSS and JS, no network.

Every piece of text that reaches the page goes through `html.escape`; the
per-frame data travels as JSON inside a `<script type="application/json">`
block (with `<` escaped) and the script only ever sets `textContent` and `src`.
"""

from __future__ import annotations

import base64
import html
import io
import json

import numpy as np
from PIL import Image


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def file_data_uri(path) -> str:
    with open(path, "rb") as handle:
        return "data:image/png;base64," + base64.b64encode(handle.read()).decode("ascii")


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "–" if not np.isfinite(value) else f"{value:.{digits}g}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell if isinstance(cell, Markup) else esc(fmt(cell))}</td>"
                                    for cell in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Markup(str):
    """A string that is already HTML (built from escaped parts); `table` inserts it as is."""


def img(uri: str, alt: str, cls: str = "") -> Markup:
    return Markup(f'<img class="{esc(cls)}" src="{esc(uri)}" alt="{esc(alt)}">')


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0 auto;max-width:1180px;
 padding:16px 24px;color:#222;background:#fbfaf8}
h1{font-size:1.5em;margin-bottom:0}h2{border-bottom:2px solid #b03a8c;padding-bottom:2px;margin-top:2em}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:8px 0 16px;font-size:0.9em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f0ecf2}
td:first-child,th:first-child{text-align:left}
.met{color:#1a7f37;font-weight:600}.miss{color:#c62828;font-weight:600}
.seed-row{display:flex;gap:18px;align-items:center;background:#fff;border:1px solid #e3dde6;border-radius:6px;
 padding:8px 12px;margin:8px 0}
.frame{width:192px;height:192px;image-rendering:pixelated;border:1px solid #999;background:#eee}
.panel{width:380px;flex:none;font-size:0.9em;overflow-wrap:anywhere}.panel .cond{font-size:1.2em;font-weight:600}
.panel .score{font-size:1.4em;font-weight:700;color:#b03a8c}.panel table{margin:4px 0}
.panel td{padding:1px 6px}.slider{width:250px}
.thumbs{display:flex;flex-wrap:wrap;gap:2px;flex:1}
.thumbs img{width:40px;height:40px;image-rendering:pixelated;border:2px solid transparent;cursor:pointer}
.thumbs img.on{border-color:#b03a8c}.thumbs img.input{outline:2px dashed #2e8b57}
.plot{max-width:100%;border:1px solid #eee;background:#fff}.noise img{width:48px;height:48px;image-rendering:pixelated}
.note{color:#555;font-size:0.9em;max-width:900px}
"""

SCRIPT = """
(function(){
 const DATA = JSON.parse(document.getElementById('report-data').textContent);
 document.querySelectorAll('.seed-row').forEach(function(row){
  const entry = DATA[row.dataset.folder].seeds[+row.dataset.index];
  const names = DATA[row.dataset.folder].feature_names;
  const slider = row.querySelector('input.slider');
  const frame = row.querySelector('img.frame');
  const cond = row.querySelector('.cond'), score = row.querySelector('.score'), members = row.querySelector('.members');
  const cells = row.querySelectorAll('td.feature');
  const thumbs = row.querySelector('.thumbs');
  entry.frames.forEach(function(src, i){
   const t = document.createElement('img'); t.src = src; t.alt = entry.captions[i]; t.title = entry.captions[i];
   if (entry.is_input[i]) t.classList.add('input');
   t.addEventListener('click', function(){ slider.value = i; update(); });
   thumbs.appendChild(t);
  });
  function update(){
   const i = +slider.value;
   frame.src = entry.frames[i]; frame.alt = entry.captions[i];
   cond.textContent = entry.captions[i];
   score.textContent = 'classifier score ' + entry.scores[i].toFixed(3);
   members.textContent = '± ' + entry.stds[i].toFixed(3) + ' (std over ensemble members)';
   cells.forEach(function(cell, k){ const v = entry.features[i][k];
     cell.textContent = (v === null) ? 'not segmented' : v.toFixed(names[k].digits); });
   thumbs.querySelectorAll('img').forEach(function(t, k){ t.classList.toggle('on', k === i); });
  }
  slider.addEventListener('input', update);
  update();
 });
})();
"""


def seed_rows(key: str, folder: dict) -> str:
    """One row per seed: the big frame, a slider over the columns, score and features, all thumbnails."""
    parts = []
    for index, entry in enumerate(folder["seeds"]):
        features = "".join(f'<tr><td>{esc(f["label"])}</td><td class="feature"></td></tr>'
                           for f in folder["feature_names"])
        parts.append(
            f'<div class="seed-row" data-folder="{esc(key)}" data-index="{index}">'
            f'<div><img class="frame" src="{esc(entry["frames"][0])}" alt="{esc(entry["captions"][0])}"></div>'
            f'<div class="panel"><div><b>{esc(entry["title"])}</b></div>'
            f'<input class="slider" type="range" min="0" max="{len(entry["frames"]) - 1}" step="1" value="0" '
            f'aria-label="{esc(entry["title"])}: condition">'
            f'<div class="cond"></div><div class="score"></div><div class="members note"></div>'
            f'<table>{features}</table></div>'
            f'<div class="thumbs"></div></div>')
    return "\n".join(parts)


def render(page: dict) -> str:
    """The whole page from `page`: title, subtitle, sections [(heading, html)], folders {key: data}."""
    data = json.dumps({key: {"seeds": [{k: v for k, v in s.items() if k != "title"} for s in f["seeds"]],
                             "feature_names": f["feature_names"]}
                       for key, f in page["folders"].items()})
    data = data.replace("<", "\\u003c")  # keeps `</script>` in any string from closing the block
    sections = "\n".join(f"<section><h2>{esc(heading)}</h2>\n{body}</section>" for heading, body in page["sections"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{esc(page["title"])}</title><style>{STYLE}</style></head>
<body><h1>{esc(page["title"])}</h1><p class="sub">{esc(page["subtitle"])}</p>
{sections}
<script type="application/json" id="report-data">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""
