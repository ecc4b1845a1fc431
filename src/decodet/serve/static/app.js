// decodet web page: send one image to /v1/detect, draw the answer on a canvas.
// The request asks for every detection (threshold 0); the slider filters them here, so
// moving it needs no new request.  Drawn boxes are also listed in #detections (one <li> per
// box, with data-label / data-name / data-score / data-box) and counted in canvas[data-drawn].
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, result: null, names: {} };

function colour(label) {
  const hue = (Number(label) * 137.508) % 360; // golden-angle steps: neighbouring ids differ
  return `hsl(${hue.toFixed(0)}, 85%, 45%)`;
}

function headers() {
  const key = $("api-key").value;
  return key ? { "X-API-Key": key } : {};
}

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.dataset.state = kind;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/model", { headers: headers() });
    if (res.status === 401) {
      $("key-row").hidden = false;
      $("model-info").textContent = "this server needs an API key";
      return;
    }
    const info = await res.json();
    state.names = Object.fromEntries(info.classes.map((c) => [c.id, c.name]));
    $("model-info").textContent =
      `${info.preset} · ${info.backend} · input ${info.input_size.height}×${info.input_size.width}` +
      ` · ${info.classes.length || info.num_classes} classes`;
    $("key-row").hidden = !info.auth;
    $("threshold").value = info.threshold;
    showThreshold();
  } catch (err) {
    $("model-info").textContent = `cannot reach the server (${err})`;
  }
}

function showThreshold() {
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
}

async function detect(file) {
  if (!file) return;
  setStatus(`Detecting objects in ${file.name}…`, "running");
  $("latency").textContent = "";
  state.result = null;
  try {
    state.image = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch (err) {
    state.image = null; // not decodable here: the server still says what is wrong with it
  }
  const start = performance.now();
  let res, body;
  try {
    res = await fetch("/v1/detect?threshold=0", {
      method: "POST",
      headers: { ...headers(), "Content-Type": file.type || "application/octet-stream" },
      body: file,
    });
    body = await res.json();
  } catch (err) {
    setStatus(`Request failed: ${err}`, "error");
    draw();
    return;
  }
  const roundTrip = performance.now() - start;
  if (!res.ok) {
    if (res.status === 401) $("key-row").hidden = false;
    setStatus(`Error ${res.status}: ${body.error}`, "error");
    draw();
    return;
  }
  state.result = body;
  const t = body.timings_ms;
  $("latency").textContent =
    `Latency ${roundTrip.toFixed(0)} ms round trip; server: decode ${t.decode.toFixed(1)} ms, ` +
    `queue ${t.queue.toFixed(1)} ms, inference ${t.inference.toFixed(1)} ms (batch of ${body.batch_size}).`;
  setStatus(`${file.name}: ${body.image_size.width}×${body.image_size.height}`, "done");
  draw();
}

function visible() {
  const r = state.result;
  if (!r) return [];
  const thr = Number($("threshold").value);
  const out = [];
  for (let i = 0; i < r.scores.length; i++) {
    if (r.scores[i] >= thr) out.push({ box: r.boxes[i], score: r.scores[i], label: r.labels[i], name: r.names[i] });
  }
  return out;
}

function draw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  const dets = visible();
  if (state.image) {
    canvas.width = state.image.width;
    canvas.height = state.image.height;
    ctx.drawImage(state.image, 0, 0);
  } else {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
  }
  const line = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 200));
  ctx.lineWidth = line;
  ctx.font = `${Math.max(12, line * 6)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  const list = $("detections");
  list.replaceChildren();
  const counts = new Map();
  for (const d of dets) {
    const [x1, y1, x2, y2] = d.box;
    const c = colour(d.label);
    ctx.strokeStyle = c;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.name} ${d.score.toFixed(2)}`;
    const w = ctx.measureText(text).width + 2 * line;
    const h = Math.max(12, line * 6) + line;
    const ty = y1 - h >= 0 ? y1 - h : y1;
    ctx.fillStyle = c;
    ctx.fillRect(x1, ty, w, h);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x1 + line, ty + line / 2);
    const li = document.createElement("li");
    li.dataset.label = d.label;
    li.dataset.name = d.name;
    li.dataset.score = d.score;
    li.dataset.box = JSON.stringify(d.box);
    li.textContent = `${text} [${d.box.map((v) => v.toFixed(0)).join(", ")}]`;
    list.append(li);
    counts.set(d.name, (counts.get(d.name) || 0) + 1);
  }
  canvas.dataset.drawn = String(dets.length);
  const classes = $("classes");
  classes.replaceChildren();
  const sorted = [...counts.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  for (const [name, n] of sorted) {
    const li = document.createElement("li");
    li.dataset.name = name;
    li.dataset.count = n;
    const label = dets.find((d) => d.name === name).label;
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = colour(label);
    li.append(sw, `${name}: ${n}`);
    classes.append(li);
  }
}

$("file").addEventListener("change", (e) => detect(e.target.files[0]));
$("threshold").addEventListener("input", () => { showThreshold(); draw(); });
$("api-key").addEventListener("change", loadModel);
const drop = $("drop");
for (const ev of ["dragenter", "dragover"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const ev of ["dragleave", "drop"]) {
  drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => detect(e.dataTransfer.files[0]));
loadModel();
