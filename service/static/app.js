// The demo page: upload an image, name classes, draw the detections on a canvas.
// Talks to the same API as any client (POST /v1/detect, multipart).
"use strict";

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

function draw(bitmap, detections) {
  const canvas = $("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const line = Math.max(2, Math.round(Math.min(bitmap.width, bitmap.height) / 200));
  ctx.lineWidth = line;
  ctx.font = `${6 * line + 6}px system-ui, sans-serif`;
  ctx.textBaseline = "bottom";
  for (const d of detections) {
    const [x1, y1, x2, y2] = d.box;
    const colour = colourOf(d.label);
    ctx.strokeStyle = colour;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.label} ${d.score.toFixed(2)}`;
    const w = ctx.measureText(text).width + 4;
    const h = 6 * line + 8;
    const top = y1 - h < 0 ? y1 + h : y1;  // keep labels at the top edge inside the canvas
    ctx.fillStyle = colour;
    ctx.fillRect(x1, top - h, w, h);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x1 + 2, top - 1);
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

async function detect(event) {
  event.preventDefault();
  const file = $("image").files[0];
  if (!file) { setStatus("choose an image first", true); return; }
  const form = new FormData();
  form.append("image", file);
  const vocabulary = $("vocabulary").value;
  if (vocabulary) form.append("vocabulary", vocabulary);
  else form.append("classes", $("classes").value);
  if ($("score").value !== "") form.append("score_threshold", $("score").value);
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
    draw(bitmap, body.detections);
    fillTable(body.detections);
    setStatus(`${body.detections.length} detections in ${body.timings_ms.total.toFixed(0)} ms`);
  } catch (e) {
    setStatus(`request failed: ${e}`, true);
  } finally {
    $("submit").disabled = false;
  }
}

$("detect-form").addEventListener("submit", detect);
$("api-key").addEventListener("change", loadModelInfo);
loadModelInfo();
