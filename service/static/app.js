// The demo page: upload an image (or pick a sample scene), name classes and/or drag example
// boxes on it, draw the detections on a canvas. Talks to the same API as any client
// (POST /v1/detect, multipart). The request asks for everything above REQUEST_FLOOR; the score
// slider and the class filter then act on the answer in the page, without asking the server again.
"use strict";

const REQUEST_FLOOR = 0.05;
let last = null;  // {body, bitmap} of the last answer
let chosen = null;  // {file, bitmap}: the image to search (an upload or a sample scene)
const examples = [];  // [{box: [x1, y1, x2, y2] image pixels, label}] drawn on `chosen`
let dragging = null;  // {x, y} image pixels where the current drag started
let choosing = Promise.resolve();  // the latest choice of image, until its bitmap is ready

const COLOURS = { base: "#1f77b4", novel: "#d62728", other: "#2ca02c", example: "#9467bd" };
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
  if (examples.some((e) => e.label === label)) return COLOURS.example;
  return COLOURS[splits.get(label.toLowerCase()) || "other"];
}

function overlaps(a, b) {
  return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;
}

function drawExamples(ctx, scale, pending) {
  ctx.save();
  ctx.strokeStyle = COLOURS.example;
  ctx.setLineDash([6 * scale, 4 * scale]);
  for (const e of pending ? [...examples, pending] : examples) {
    const [x1, y1, x2, y2] = e.box;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  }
  ctx.restore();
}

function draw(bitmap, detections, pending = null) {
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
  drawExamples(ctx, scale, pending);
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

function render(pending = null) {
  $("score-value").textContent = Number($("score").value).toFixed(2);
  const bitmap = last ? last.bitmap : chosen && chosen.bitmap;
  if (!last || pending) {
    if (bitmap) draw(bitmap, last ? shown() : [], pending);
    return;
  }
  const detections = shown();
  if (bitmap) draw(bitmap, detections);
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

// ---------------------------------------------------------------- the image and example boxes

async function choose(file) {
  // EXIF orientation is applied by the server; createImageBitmap applies it too ("from-image").
  // A file the browser cannot show is still sent: the server's answer says what is wrong with it.
  const bitmap = await createImageBitmap(file, { imageOrientation: "from-image" }).catch(() => null);
  chosen = { file, bitmap };
  last = null;
  examples.length = 0;
  listExamples();
  $("results").querySelector("tbody").replaceChildren();
  $("download").disabled = true;
  setStatus("");
  render();
}

async function chooseSample(event) {
  const src = event.target.dataset.src;
  const r = await fetch(src);
  if (!r.ok) { setStatus(`sample ${src}: HTTP ${r.status}`, true); return; }
  $("image").value = "";
  await choose(new File([await r.blob()], src.split("/").pop(), { type: "image/jpeg" }));
}

function listExamples() {
  $("examples").replaceChildren(...examples.map((e, i) => {
    const item = document.createElement("li");
    item.textContent = `${e.label}: [${e.box.map((v) => v.toFixed(0)).join(", ")}]`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove this example";
    remove.addEventListener("click", () => { examples.splice(i, 1); listExamples(); render(); });
    item.appendChild(remove);
    return item;
  }));
}

function imagePoint(event) {
  const canvas = $("canvas");
  const rect = canvas.getBoundingClientRect();
  const x = (event.clientX - rect.left) * canvas.width / rect.width;
  const y = (event.clientY - rect.top) * canvas.height / rect.height;
  return { x: Math.min(Math.max(x, 0), canvas.width), y: Math.min(Math.max(y, 0), canvas.height) };
}

function dragBox(event) {
  const p = imagePoint(event);
  return [Math.min(dragging.x, p.x), Math.min(dragging.y, p.y), Math.max(dragging.x, p.x), Math.max(dragging.y, p.y)];
}

function startDrag(event) {
  if (!chosen || !chosen.bitmap) return;
  dragging = imagePoint(event);
  $("canvas").setPointerCapture?.(event.pointerId);
}

function moveDrag(event) {
  if (dragging) render({ box: dragBox(event) });
}

function endDrag(event) {
  if (!dragging) return;
  const box = dragBox(event);
  dragging = null;
  if (box[2] - box[0] >= 3 && box[3] - box[1] >= 3) {  // a click is not a box
    examples.push({ box, label: $("example-label").value.trim() || "example" });
    listExamples();
  }
  render();
}

// ---------------------------------------------------------------- the request

async function detect(event) {
  event.preventDefault();
  await choosing;
  if (!chosen) { setStatus("choose an image first", true); return; }
  const file = chosen.file;
  const form = new FormData();
  form.append("image", file);
  const vocabulary = $("vocabulary").value;
  if (vocabulary) form.append("vocabulary", vocabulary);
  else if ($("classes").value.trim() || !examples.length) form.append("classes", $("classes").value);
  if (examples.length) form.append("examples", JSON.stringify(examples));
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
    last = { body, bitmap: chosen.bitmap };
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
$("image").addEventListener("change", () => { if ($("image").files[0]) choosing = choose($("image").files[0]); });
for (const b of document.querySelectorAll(".sample")) {
  b.addEventListener("click", (event) => { choosing = chooseSample(event); });
}
$("canvas").addEventListener("pointerdown", startDrag);
$("canvas").addEventListener("pointermove", moveDrag);
$("canvas").addEventListener("pointerup", endDrag);
$("score").addEventListener("input", () => render());
$("class-filter").addEventListener("change", () => render());
$("download").addEventListener("click", download);
$("api-key").addEventListener("change", loadModelInfo);
loadModelInfo();
