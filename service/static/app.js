// The demo page: upload an image, name classes, draw the detections on a canvas.
// Talks to the same API as any client (POST /v1/detect, multipart). The request asks for
// everything above REQUEST_FLOOR; the score slider and the class filter then act on the
// answer in the page, without asking the server again.
"use strict";

const REQUEST_FLOOR = 0.05;
let last = null;  // {body, bitmap} of the last answer

const COLOURS = { base: "#1f77b4", novel: "#d62728", other: "#2ca02c" };
const splits = new Map();  // lower-cased category name -> "base" | "novel", from the manifest

const $ = (id) => document.getElementById(id);

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function loadModelInfo() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) { $("model-info").textContent = "model info needs an API key"; return; }
    const m = await r.json();
    $("model-info").textContent = `model ${m.name} ${m.version}`;
    for (const c of m.categories || []) splits.set(c.name.toLowerCase(), c.split);
    const names = (m.categories || []).map((c) => c.name);
    if (!$("classes").value && names.length) $("classes").value = names.join("\n");
    const v = await fetch("/v1/vocabularies", { headers: headers() });
    if (v.ok) {
      for (const voc of (await v.json()).vocabularies) {
        const opt = document.createElement("option");
        opt.value = voc.id;
        opt.textContent = `${voc.id} (${voc.size} names)`;
        $("vocabulary").appendChild(opt);
      }
    }
  } catch (e) {
    $("model-info").textContent = "server not reachable";
  }
}

function colourOf(label) {
  return COLOURS[splits.get(label.toLowerCase()) || "other"];
}

function overlaps(a, b) {
  return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
}

function draw(bitmap, detections) {
  const canvas = $("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  // The canvas is shown at up to 60rem wide: size lines and labels for the displayed scale.
  const scale = bitmap.width / Math.max(1, canvas.getBoundingClientRect().width || bitmap.width);
  const line = Math.max(1, Math.round(2 * scale));
  const h = Math.round(16 * scale);
  ctx.lineWidth = line;
  ctx.font = `${Math.round(13 * scale)}px system-ui, sans-serif`;
  ctx.textBaseline = "bottom";
  const placed = [];  // label rectangles already drawn: a new label moves down until it is free
  for (const d of detections) {
    const [x1, y1, x2, y2] = d.box;
    const colour = colourOf(d.label);
    ctx.strokeStyle = colour;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.label} ${d.score.toFixed(2)}`;
    const rect = { x: x1, y: y1 - h < 0 ? y1 : y1 - h, w: ctx.measureText(text).width + 4 * scale, h };
    for (let tries = 0; tries < 8 && placed.some((p) => overlaps(p, rect)); tries++) rect.y += h;
    placed.push(rect);
    ctx.fillStyle = colour;
    ctx.fillRect(rect.x, rect.y, rect.w, rect.h);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, rect.x + 2 * scale, rect.y + rect.h - scale);
  }
  canvas.dataset.boxes = String(detections.length);
}

function fillTable(detections) {
  const body = $("results").querySelector("tbody");
  body.replaceChildren();
  detections.forEach((d, i) => {
    const row = body.insertRow();
    row.className = "detection";
    for (const value of [i + 1, d.label, d.score.toFixed(3), d.box.map((v) => v.toFixed(1)).join(", ")]) {
      row.insertCell().textContent = value;  // textContent: labels are user input, never HTML
    }
    row.cells[1].style.color = colourOf(d.label);
  });
}

function shown() {
  const min = Number($("score").value);
  const only = $("class-filter").value;
  return last.body.detections.filter((d) => d.score >= min && (!only || d.label === only));
}

function render() {
  $("score-value").textContent = Number($("score").value).toFixed(2);
  if (!last) return;
  const detections = shown();
  draw(last.bitmap, detections);
  fillTable(detections);
  setStatus(`${detections.length} of ${last.body.detections.length} detections shown ` +
            `(${last.body.detections.length} detections in ${last.body.timings_ms.total.toFixed(0)} ms` +
            (last.body.image.tiles ? `, ${last.body.image.tiles} tiles)` : ")"));
}

function showWarnings(warnings) {
  $("warnings").replaceChildren(...warnings.map((w) => {
    const item = document.createElement("li");
    item.textContent = w.message;
    return item;
  }));
}

function fillClassFilter(classes) {
  const keep = $("class-filter").value;
  $("class-filter").replaceChildren(new Option("all classes", ""), ...classes.map((c) => new Option(c, c)));
  $("class-filter").value = classes.includes(keep) ? keep : "";
}

function download() {
  const blob = new Blob([JSON.stringify(last.body, null, 1)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "detections.json";
  a.click();
  URL.revokeObjectURL(a.href);
}

async function detect(event) {
  event.preventDefault();
  const file = $("image").files[0];
  if (!file) { setStatus("choose an image first", true); return; }
  const form = new FormData();
  form.append("image", file);
  const vocabulary = $("vocabulary").value;
  if (vocabulary) form.append("vocabulary", vocabulary);
  else form.append("classes", $("classes").value);
  form.append("score_threshold", String(Math.min(REQUEST_FLOOR, Number($("score").value))));
  form.append("score_mode", $("score-mode").value);
  form.append("tiles", $("tiles").value);
  if ($("nms").value !== "") form.append("nms_threshold", $("nms").value);
  if ($("agnostic").checked) form.append("class_agnostic", "true");
  $("submit").disabled = true;
  setStatus("detecting…");
  try {
    const r = await fetch("/v1/detect", { method: "POST", body: form, headers: headers() });
    const body = await r.json();
    if (!r.ok) {
      setStatus(body.error ? `${body.error.code}: ${body.error.message}` : `HTTP ${r.status}`, true);
      return;
    }
    // EXIF orientation is applied by the server; createImageBitmap applies it too ("from-image").
    const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    last = { body, bitmap };
    showWarnings(body.warnings || []);
    fillClassFilter(body.classes);
    $("download").disabled = false;
    render();
  } catch (e) {
    setStatus(`request failed: ${e}`, true);
  } finally {
    $("submit").disabled = false;
  }
}

$("detect-form").addEventListener("submit", detect);
$("score").addEventListener("input", render);
$("class-filter").addEventListener("change", render);
$("download").addEventListener("click", download);
$("api-key").addEventListener("change", loadModelInfo);
loadModelInfo();
