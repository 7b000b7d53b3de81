// The explorer page: OpenSeadragon on the left, the clicked nucleus and its transition on the right.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, slide: null, request: null, result: null, frame: 0, marker: null };
let viewer = null;

function status(text) { $("status").textContent = text; }

async function api(method, url, body) {
  const res = await fetch(url, {
    method, headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(data.error || `HTTP ${res.status}`);
  return data;
}

function fmt(v, digits = 3) { return v === null || v === undefined ? "—" : Number(v).toFixed(digits); }

function settings() {
  return { mode: $("mode").value, strength: Number($("strength").value), guidance: Number($("guidance").value) };
}

async function init() {
  state.info = await api("GET", "/api/info");
  const d = state.info.defaults;
  $("strength").value = d.strength;
  $("guidance").value = d.guidance;
  $("mode").addEventListener("change", () => {
    $("strength").value = $("mode").value === "sdedit" ? state.info.sdedit_strength : d.strength;
  });
  for (const s of state.info.slides) $("slide-select").add(new Option(`${s.name} (${s.width}×${s.height})`, s.name));
  for (const ds of state.info.datasets) $("dataset-select").add(new Option(`${ds.name} (${ds.patches})`, ds.name));
  viewer = OpenSeadragon({
    id: "viewer", prefixUrl: "/static/openseadragon/images/", showNavigator: false,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: true }, maxZoomPixelRatio: 4,
    animationTime: 0.4,
  });
  viewer.addHandler("canvas-click", (event) => {
    if (!event.quick) return;  // a drag pans; only a click picks
    const p = viewer.viewport.viewerElementToImageCoordinates(event.position);
    pickNucleus(Math.round(p.x), Math.round(p.y));
  });
  viewer.addHandler("open", () => { document.body.dataset.slideOpen = state.slide; });
  $("slide-select").addEventListener("change", () => openSlide($("slide-select").value));
  $("dataset-select").addEventListener("change", () => openDataset($("dataset-select").value));
  $("slider").addEventListener("input", () => showFrame(Number($("slider").value)));
  $("rerender").addEventListener("click", () => state.request && render(state.request));
  $("export").addEventListener("click", exportStrip);
  if (state.info.slides.length) openSlide(state.info.slides[0].name);
  else if (state.info.datasets.length) { $("dataset-select").value = state.info.datasets[0].name; openDataset(state.info.datasets[0].name); }
  status("ready");
}

function openSlide(name) {
  state.slide = name;
  $("grid").hidden = true; $("viewer").hidden = false; $("dataset-select").value = "";
  state.marker = null;
  viewer.clearOverlays();
  viewer.open(`/slides/${encodeURIComponent(name)}.dzi`);
}

async function openDataset(name) {
  if (!name) { if (state.slide) openSlide(state.slide); return; }
  const grid = await api("GET", `/datasets/${encodeURIComponent(name)}/grid`);
  const box = $("grid");
  box.innerHTML = "";
  for (const bin of grid.bins) {
    const h = document.createElement("h3");
    h.textContent = `${bin.title} (${bin.count} patches)`;
    box.appendChild(h);
    for (const item of bin.items) {
      const img = document.createElement("img");
      img.src = item.thumb; img.title = `${item.id} label ${item.label ?? "none"}`; img.dataset.index = item.index;
      img.addEventListener("click", () => {
        box.querySelectorAll("img.on").forEach((el) => el.classList.remove("on"));
        img.classList.add("on");
        render({ dataset: name, index: item.index });
      });
      box.appendChild(img);
    }
  }
  $("viewer").hidden = true; box.hidden = false;
}

function placeMarker(cx, cy, size) {
  const rect = viewer.viewport.imageToViewportRectangle(cx - size / 2, cy - size / 2, size, size);
  if (!state.marker) {
    state.marker = document.createElement("div");
    state.marker.className = "marker";
    state.marker.id = "marker";
    viewer.addOverlay({ element: state.marker, location: rect });
  } else {
    viewer.updateOverlay(state.marker, rect);
  }
}

async function pickNucleus(x, y) {
  status(`nucleus near (${x}, ${y})…`);
  try {
    const n = await api("POST", "/nucleus", { slide: state.slide, x, y });
    placeMarker(n.centre[0], n.centre[1], n.size);
    $("hint").hidden = true; $("nucleus").hidden = false;
    $("input").src = n.patch; $("frame").src = n.patch;
    $("input-score").textContent = `${fmt(n.score)} ± ${fmt(n.score_std)}`;
    $("where").textContent = `${n.slide} click (${n.click}) → nucleus (${n.centre})` +
      (n.detected ? ` ${n.distance} px away` : " (no nucleus detected nearby: centred on the click)");
    await render({ slide: state.slide, x, y });
  } catch (err) { status(`error: ${err.message}`); }
}

async function render(source) {
  state.request = source;
  $("panel").classList.add("busy");
  status("rendering transition…");
  const t0 = performance.now();
  try {
    const r = await api("POST", "/transition", { ...source, ...settings() });
    state.result = r;
    $("hint").hidden = true; $("nucleus").hidden = false;
    $("input").src = r.input;
    $("input-score").textContent = `${fmt(r.input_score)} ± ${fmt(r.input_score_std)}`;
    if (source.dataset) $("where").textContent = `${source.dataset}: ${r.source.id}`;
    $("slider").max = r.frames.length - 1;
    const strip = $("strip");
    strip.innerHTML = "";
    strip.style.gridTemplateColumns = `repeat(${r.frames.length}, 1fr)`;
    r.frames.forEach((src, i) => {
      const img = document.createElement("img");
      img.src = src; img.title = `y = ${r.settings.conditions[i]}`;
      img.addEventListener("click", () => { $("slider").value = i; showFrame(i); });
      strip.appendChild(img);
    });
    showFrame(Math.min(Number($("slider").value), r.frames.length - 1));
    status(`${r.cached ? "cached" : "rendered"} in ${Math.round(performance.now() - t0)} ms`);
    document.body.dataset.transition = r.key;
  } catch (err) { status(`error: ${err.message}`); }
  $("panel").classList.remove("busy");
}

function sparkline(values) {
  const finite = values.filter((v) => v !== null);
  if (!finite.length) return "";
  const lo = Math.min(...finite), hi = Math.max(...finite), bars = "▁▂▃▄▅▆▇█";
  return values.map((v) => (v === null ? " " : bars[Math.round(((v - lo) / (hi - lo || 1)) * 7)])).join("");
}

function showFrame(i) {
  const r = state.result;
  if (!r) return;
  state.frame = i;
  $("slider").value = i;
  $("frame").src = r.frames[i];
  $("cond").textContent = `condition y = ${Number(r.settings.conditions[i]).toFixed(2)}`;
  $("score").textContent = `classifier score ${fmt(r.scores[i])} ± ${fmt(r.scores_std[i])}`;
  document.querySelectorAll("#strip img").forEach((img, k) => img.classList.toggle("on", k === i));
  const body = $("features").querySelector("tbody");
  body.innerHTML = "";
  for (const [name, values] of Object.entries(r.features)) {
    const row = body.insertRow();
    row.insertCell().textContent = name;
    const cell = row.insertCell(); cell.className = "num feature"; cell.textContent = fmt(values[i]);
    row.insertCell().textContent = sparkline(values);
  }
}

async function exportStrip() {
  if (!state.request) return;
  status("exporting…");
  try {
    const e = await api("POST", "/export", { ...state.request, ...settings() });
    const box = $("export-status");
    box.innerHTML = "";
    for (const [label, href] of [["strip PNG", e.png], ["settings JSON", e.json]]) {
      const a = document.createElement("a");
      a.href = href; a.textContent = label; a.download = href.split("/").pop();
      box.appendChild(a);
    }
    box.appendChild(document.createTextNode(`written to ${e.folder}`));
    box.dataset.json = e.json;
    status("exported");
  } catch (err) { status(`error: ${err.message}`); }
}

init().catch((err) => status(`error: ${err.message}`));
