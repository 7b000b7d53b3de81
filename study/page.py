"""The reader-study page: one self-contained HTML file (images as data URIs, inline CSS and JS, no network).

Blinding: the page is the same template for every study; items appear only as
`{"id", "src"}` pairs sorted by their opaque id, and the one image element only
ever changes its `src`. The words "real" and "generated" occur only in the
fixed answer buttons and help text, never per item.

Per reader: the order is a Fisher-Yates shuffle seeded from (reader id, study
seed); answers, position and timing live in localStorage, so a reader can
close the page and resume; Export downloads `answers-READER.csv`.
"""

from __future__ import annotations

import html
import json

from . import ANSWER_COLUMNS

STYLE = """
*{box-sizing:border-box}body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;
 color:#222;background:#f4f2ef}header{background:#3b2a48;color:#fff;padding:10px 24px;display:flex;
 align-items:center;gap:24px}header h1{font-size:1.15em;margin:0;font-weight:600}#who{opacity:.85}
main{max-width:980px;margin:18px auto;padding:0 16px}.card{background:#fff;border:1px solid #ddd6e1;
 border-radius:8px;padding:18px 22px}#start label{display:block;margin:10px 0 4px;font-weight:600}
#reader{font-size:1.1em;padding:6px 8px;width:260px}button{font:inherit;padding:6px 12px;border:1px solid #8a7a96;
 border-radius:5px;background:#fff;cursor:pointer}button:hover{background:#f0ebf4}button.on{background:#5b3f70;
 color:#fff;border-color:#5b3f70}#msg{color:#b3261e;min-height:1.3em;margin:6px 0}
#progress{height:10px;background:#e4dfe8;border-radius:5px;overflow:hidden;margin:4px 0 2px}
#bar{height:100%;background:#7b4f9a;width:0}#where{font-size:.9em;color:#555}
#trial{display:flex;gap:28px;align-items:flex-start;margin-top:12px}
#patch{width:384px;height:384px;border:1px solid #999;background:#ddd;flex:none}
body.pixelated #patch{image-rendering:pixelated}#controls{flex:1}.row{border:2px solid transparent;
 border-radius:6px;padding:8px 10px;margin-bottom:10px}.row.active{border-color:#7b4f9a;background:#faf7fc}
.row h3{margin:0 0 6px;font-size:1em}.row .hint{font-size:.85em;color:#666;margin-top:4px}
#rating{width:100%}#rating.unset{opacity:.35}.scale{display:flex;justify-content:space-between;font-size:.8em;
 color:#555}#rating-text{font-weight:600}#item-label{font-family:ui-monospace,monospace;color:#777;font-size:.85em}
.keys{font-size:.85em;color:#555;line-height:1.6}kbd{border:1px solid #bbb;border-bottom-width:2px;
 border-radius:3px;padding:0 4px;background:#fafafa;font-size:.9em}.nav{display:flex;gap:10px;margin-top:6px}
header kbd,button.on kbd{color:#222}[hidden]{display:none!important}
"""

BODY = """
<header><h1>TITLE</h1><span id="who"></span><span style="flex:1"></span>
<label><input type="checkbox" id="pixelated" checked> nearest-neighbour upscaling (<kbd>P</kbd>)</label>
<button id="export" type="button" disabled>Export answers (<kbd>E</kbd>)</button>
<button id="pause" type="button" disabled>Pause</button></header>
<main>
<section id="start" class="card">
 <p>You will see N_ITEMS nucleus-centred patches, one at a time. Some are real microscopy, some were generated
 by a model. For each: is it <b>real</b> or <b>generated</b>, how <b>mitotic</b> does it look (0 = not mitotic,
 4 = certainly mitotic), and how <b>confident</b> are you (1 = unsure, 3 = sure)?</p>
 <p>Your answers are kept in this browser, so you can close the page and resume later with the same reader id.
 When you are done, press <b>Export</b> and send the downloaded CSV file.</p>
 <label for="reader">Reader id (letters, digits, <code>.</code> <code>_</code> <code>-</code>)</label>
 <input id="reader" autocomplete="off" spellcheck="false" maxlength="40"> <button id="go" type="button">Start / resume
 (<kbd>Enter</kbd>)</button><div id="msg"></div>
</section>
<section id="study" class="card" hidden>
 <div id="progress"><div id="bar"></div></div>
 <div id="where"><span id="position"></span> · <span id="answered"></span> · <span id="item-label"></span></div>
 <div id="trial"><img id="patch" alt="patch under review" src="">
 <div id="controls">
  <div class="row" id="row-kind"><h3>1. Real or generated?</h3>
   <button type="button" class="choice" id="kind-real">Real (<kbd>R</kbd>)</button>
   <button type="button" class="choice" id="kind-generated">Generated (<kbd>G</kbd>)</button></div>
  <div class="row" id="row-rating"><h3>2. How mitotic does it look? <span id="rating-text"></span></h3>
   <input type="range" id="rating" min="0" max="4" step="1" value="2" class="unset" aria-label="mitotic rating">
   <div class="scale"><span>0 not</span><span>1 unlikely</span><span>2 uncertain</span><span>3 probably</span>
    <span>4 certainly</span></div>
   <div class="hint">keys <kbd>0</kbd>–<kbd>4</kbd> or the slider</div></div>
  <div class="row" id="row-confidence"><h3>3. Confidence</h3>
   <button type="button" class="choice" data-confidence="1">1 unsure</button>
   <button type="button" class="choice" data-confidence="2">2 fairly sure</button>
   <button type="button" class="choice" data-confidence="3">3 sure</button>
   <div class="hint">keys <kbd>1</kbd>–<kbd>3</kbd> once the rating is set (<kbd>↑</kbd> <kbd>↓</kbd> choose the
   row that digits answer)</div></div>
  <div class="nav"><button type="button" id="back">← Back</button>
   <button type="button" id="next">Save and next (<kbd>Enter</kbd>)</button></div>
  <div id="msg2" style="color:#b3261e;min-height:1.3em;margin-top:6px"></div>
  <div class="keys"><kbd>R</kbd>/<kbd>G</kbd> real or generated · <kbd>0</kbd>–<kbd>4</kbd> rating ·
   <kbd>1</kbd>–<kbd>3</kbd> confidence · <kbd>Enter</kbd> or <kbd>→</kbd> save and next · <kbd>←</kbd> back ·
   <kbd>P</kbd> pixels · <kbd>E</kbd> export</div>
 </div></div>
</section>
<section id="done" class="card" hidden><h2>All items answered</h2>
 <p>Thank you. Press <b>Export</b> (<kbd>E</kbd>) to download your answers, then send the CSV file.
 <kbd>←</kbd> goes back to review an answer.</p></section>
</main>
"""

SCRIPT = r"""
(function(){
'use strict';
const STUDY = JSON.parse(document.getElementById('study-data').textContent);
const COLUMNS = COLUMNS_JSON;
const SRC = {}; STUDY.items.forEach(function(it){ SRC[it.id] = it.src; });
const $ = function(id){ return document.getElementById(id); };
// A small seeded PRNG by hand (string hash + mulberry32): the page runs offline with no library to import.
function hash32(text){
 let h = 0x811c9dc5;
 for (let i = 0; i < text.length; i++){ h = Math.imul(h ^ text.charCodeAt(i), 0x01000193); }
 h = Math.imul(h ^ (h >>> 16), 0x85ebca6b); h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
 return (h ^ (h >>> 16)) >>> 0;
}
function mulberry32(a){ return function(){ a = (a + 0x6D2B79F5) | 0; let t = Math.imul(a ^ (a >>> 15), 1 | a);
 t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t; return ((t ^ (t >>> 14)) >>> 0) / 4294967296; }; }
function orderFor(reader){
 const rand = mulberry32(hash32(reader + '|' + STUDY.order_seed));
 const ids = STUDY.items.map(function(it){ return it.id; });
 for (let i = ids.length - 1; i > 0; i--){
  const j = Math.floor(rand() * (i + 1)); const t = ids[i]; ids[i] = ids[j]; ids[j] = t;
 }
 return ids;
}
let state = null, draft = null, active = 'rating', shownAt = 0;
function storageKey(reader){ return 'mitosis-ldm-study:' + STUDY.study_id + ':' + reader; }
function save(){ try { localStorage.setItem(storageKey(state.reader), JSON.stringify(state)); }
 catch (e) { $('msg2').textContent = 'could not save in this browser (' + e.name + '): export often'; } }
function load(reader){
 try { const s = JSON.parse(localStorage.getItem(storageKey(reader)) || 'null');
  if (s && s.order && s.order.length === STUDY.items.length) return s; } catch (e) {}
 return null;
}
function start(){
 const reader = $('reader').value.trim();
 if (!/^[A-Za-z0-9._-]{1,40}$/.test(reader)){
  $('msg').textContent = 'Enter a reader id of letters, digits, . _ or -'; return;
 }
 state = load(reader) || {reader: reader, order: orderFor(reader), pos: 0, answers: {}};
 save();
 $('reader').blur(); $('start').hidden = true; $('who').textContent = 'reader ' + reader;
 $('export').disabled = false; $('pause').disabled = false;
 show();
}
function pause(){
 if (!state) return; save(); state = null;
 $('study').hidden = true; $('done').hidden = true; $('start').hidden = false;
 $('export').disabled = true; $('pause').disabled = true; $('who').textContent = '';
 $('msg').textContent = 'Paused. Enter your reader id to resume.'; $('reader').focus();
}
function answeredCount(){ return Object.keys(state.answers).length; }
function progress(){
 const n = STUDY.items.length, k = answeredCount();
 $('bar').style.width = (100 * k / n) + '%';
 $('answered').textContent = k + ' of ' + n + ' answered';
 $('position').textContent = 'patch ' + Math.min(state.pos + 1, n) + ' of ' + n;
}
function show(){
 progress();
 if (state.pos >= state.order.length){ $('study').hidden = true; $('done').hidden = false; return; }
 $('done').hidden = true; $('study').hidden = false;
 const id = state.order[state.pos];
 $('patch').src = SRC[id]; $('item-label').textContent = 'item ' + id;
 draft = Object.assign({}, state.answers[id] || {});
 active = draft.rating === undefined ? 'rating' : 'confidence';
 shownAt = performance.now(); $('msg2').textContent = '';
 paint();
}
function paint(){
 $('kind-real').classList.toggle('on', draft.kind === 'real');
 $('kind-generated').classList.toggle('on', draft.kind === 'generated');
 const r = $('rating'); r.classList.toggle('unset', draft.rating === undefined);
 if (draft.rating !== undefined) r.value = draft.rating;
 $('rating-text').textContent = draft.rating === undefined ? '(not rated yet)' : String(draft.rating);
 document.querySelectorAll('[data-confidence]').forEach(function(b){
  b.classList.toggle('on', +b.dataset.confidence === draft.confidence);
 });
 $('row-rating').classList.toggle('active', active === 'rating');
 $('row-confidence').classList.toggle('active', active === 'confidence');
}
function setKind(kind){ draft.kind = kind; paint(); }
function setRating(v){ draft.rating = v; active = 'confidence'; paint(); }
function setConfidence(v){ draft.confidence = v; paint(); }
function next(){
 if (state.pos >= state.order.length) return;
 if (draft.kind === undefined || draft.rating === undefined || draft.confidence === undefined){
  $('msg2').textContent = 'Answer all three: real or generated, rating and confidence.'; return; }
 const id = state.order[state.pos], before = state.answers[id];
 const seconds = (before ? before.seconds : 0) + (performance.now() - shownAt) / 1000;
 state.answers[id] = {kind: draft.kind, rating: draft.rating, confidence: draft.confidence,
  seconds: Math.round(seconds * 1000) / 1000, answered_at: new Date().toISOString()};
 state.pos += 1; save(); show();
}
function back(){ if (state.pos > 0){ state.pos -= 1; save(); show(); } }
function exportCsv(){
 if (!state) return;
 const lines = [COLUMNS.join(',')];
 state.order.forEach(function(id){ const a = state.answers[id]; if (!a) return;
  lines.push([STUDY.study_id, state.reader, id, a.kind, a.rating, a.confidence, a.seconds.toFixed(3),
              a.answered_at].join(',')); });
 const blob = new Blob([lines.join('\n') + '\n'], {type: 'text/csv'});
 const link = document.createElement('a'); link.href = URL.createObjectURL(blob);
 link.download = 'answers-' + state.reader + '.csv'; document.body.appendChild(link); link.click();
 setTimeout(function(){ URL.revokeObjectURL(link.href); link.remove(); }, 2000);
}
function setPixelated(on){ document.body.classList.toggle('pixelated', on); $('pixelated').checked = on; }
$('go').addEventListener('click', start);
$('reader').addEventListener('keydown', function(e){ if (e.key === 'Enter'){ e.preventDefault(); start(); } });
$('pause').addEventListener('click', pause);
$('export').addEventListener('click', exportCsv);
$('pixelated').addEventListener('change', function(){ setPixelated($('pixelated').checked); });
$('kind-real').addEventListener('click', function(){ setKind('real'); });
$('kind-generated').addEventListener('click', function(){ setKind('generated'); });
$('rating').addEventListener('input', function(){ setRating(+$('rating').value); });
document.querySelectorAll('[data-confidence]').forEach(function(b){
 b.addEventListener('click', function(){ setConfidence(+b.dataset.confidence); });
});
$('row-rating').addEventListener('click', function(){ active = 'rating'; paint(); });
$('row-confidence').addEventListener('click', function(){ active = 'confidence'; paint(); });
$('next').addEventListener('click', next);
$('back').addEventListener('click', back);
document.addEventListener('keydown', function(e){
 if (!state || e.target === $('reader') || e.ctrlKey || e.metaKey || e.altKey) return;
 const key = e.key.toLowerCase(), onSlider = e.target === $('rating');
 if (key === 'e'){ exportCsv(); return; }
 if (key === 'p'){ setPixelated(!document.body.classList.contains('pixelated')); return; }
 if (key === 'arrowleft' && !onSlider || key === 'backspace'){ e.preventDefault(); back(); return; }
 if (state.pos >= state.order.length) return;
 if (key === 'r'){ setKind('real'); }
 else if (key === 'g'){ setKind('generated'); }
 else if (key === 'enter' || key === 'arrowright' && !onSlider){ e.preventDefault(); next(); }
 else if ((key === 'arrowup' || key === 'arrowdown') && !onSlider){
  e.preventDefault(); active = key === 'arrowup' ? 'rating' : 'confidence'; paint();
 }
 else if (/^[0-9]$/.test(key)){
  const v = +key;
  if (active === 'rating' && v <= 4){ e.preventDefault(); setRating(v); }
  else if (active === 'confidence' && v >= 1 && v <= 3){ e.preventDefault(); setConfidence(v); }
 }
});
setPixelated(true);
$('reader').focus();
})();
"""


def render(study_id: str, title: str, order_seed: int, items: list[dict]) -> str:
    """The whole page. `items` are `{"id", "src"}` only, in id order: nothing per item but its pixels."""
    data = json.dumps({"study_id": study_id, "order_seed": order_seed,
                       "items": [{"id": it["id"], "src": it["src"]} for it in items]})
    data = data.replace("<", "\\u003c")  # keeps `</script>` in any string from closing the block
    body = BODY.replace("TITLE", html.escape(title)).replace("N_ITEMS", str(len(items)))
    script = SCRIPT.replace("COLUMNS_JSON", json.dumps(ANSWER_COLUMNS))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
 content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>{body}
<script type="application/json" id="study-data">{data}</script>
<script>{script}</script>
</body></html>
"""
