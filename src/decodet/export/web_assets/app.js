// The page's logic: load model.json + model.onnx into ONNX Runtime Web (WASM, one thread),
// run it on a chosen or dropped image, draw the boxes above the score threshold.
//
// For tests and tools: window.decodetReady (true once the model is loaded), window.decodetError
// (a message if anything failed), window.lastDetections (what is drawn: {orig_size: [h, w],
// threshold, latency_ms, boxes: [[x1, y1, x2, y2], ...] in original pixels, scores, labels, names}).
import * as ort from "./ort/ort.wasm.min.mjs";
import { rgbaToRgb, toModelInput } from "./preprocess.js";

const $ = (id) => document.getElementById(id);
const state = { meta: null, session: null, image: null, raw: null, latency: 0 };

function fail(message) {
  window.decodetError = String(message);
  $("status").textContent = `error: ${message}`;
}

async function init() {
  ort.env.wasm.numThreads = 1; // single-threaded: no SharedArrayBuffer, no COOP/COEP headers needed
  ort.env.wasm.proxy = false;
  ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
  const res = await fetch("model.json");
  if (!res.ok) throw new Error(`model.json: HTTP ${res.status}`);
  state.meta = await res.json();
  state.session = await ort.InferenceSession.create("model.onnx", { executionProviders: ["wasm"] });
  const fromUrl = new URLSearchParams(location.search).get("threshold");
  const threshold = fromUrl !== null && !Number.isNaN(Number(fromUrl)) ? Number(fromUrl) : state.meta.threshold;
  setThreshold(threshold);
  const [h, w] = state.meta.imgsz;
  $("model").textContent = `Model: ${state.meta.model}, ${state.meta.precision}, input ${h}×${w}.`;
  $("status").textContent = "ready: choose or drop an image";
  window.decodetReady = true;
}

/** Decode like Detector: EXIF orientation applied, no colour management, 8-bit RGB. */
async function decode(blob) {
  const bitmap = await createImageBitmap(blob, {
    imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none",
  });
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  const data = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
  return { bitmap, h: bitmap.height, w: bitmap.width, rgb: rgbaToRgb(data, bitmap.height, bitmap.width) };
}

async function detect(blob) {
  $("status").textContent = "detecting…";
  const img = await decode(blob);
  const [H, W] = state.meta.imgsz;
  const t0 = performance.now();
  const x = toModelInput(img.rgb, img.h, img.w, H, W, state.meta.mean, state.meta.std);
  const out = await state.session.run({
    images: new ort.Tensor("float32", x, [1, 3, H, W]),
    orig_sizes: new ort.Tensor("float32", Float32Array.of(img.h, img.w), [1, 2]),
  });
  state.latency = performance.now() - t0;
  const k = out.scores.dims[1];
  state.raw = [];
  for (let i = 0; i < k; i++) {
    const label = Number(out.labels.data[i]);
    state.raw.push({
      box: Array.from(out.boxes.data.subarray(4 * i, 4 * i + 4)),
      score: out.scores.data[i],
      label,
      name: state.meta.class_names[String(label)] ?? String(label),
    });
  }
  state.image = img;
  render();
}

function setThreshold(value) {
  $("threshold").value = String(value);
  $("threshold-value").textContent = Number(value).toFixed(2);
}

/** Keep the detections at or above the threshold (as Detector does), draw, list, expose. */
function render() {
  if (!state.image) return;
  const threshold = Number($("threshold").value);
  const kept = state.raw.filter((d) => d.score >= threshold);
  const { bitmap, h, w } = state.image;
  const canvas = $("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const line = Math.max(2, Math.round(Math.min(h, w) / 200));
  ctx.lineWidth = line;
  ctx.font = `${Math.max(12, 6 * line)}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of kept) {
    const [x1, y1, x2, y2] = d.box;
    const colour = `hsl(${(d.label * 67) % 360} 80% 45%)`;
    ctx.strokeStyle = colour;
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.name} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(text).width + 2 * line;
    ctx.fillStyle = colour;
    ctx.fillRect(x1, y1, tw, 6 * line + 2 * line);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x1 + line, y1 + line);
  }
  const counts = new Map();
  for (const d of kept) counts.set(d.name, (counts.get(d.name) ?? 0) + 1);
  $("classes").replaceChildren(...[...counts].sort((a, b) => b[1] - a[1]).map(([name, n]) => {
    const li = document.createElement("li");
    li.innerHTML = "<span></span><b></b>";
    li.firstChild.textContent = name;
    li.lastChild.textContent = String(n);
    return li;
  }));
  $("latency").textContent = `latency ${state.latency.toFixed(0)} ms (pre-processing + model)`;
  $("status").textContent = `${kept.length} detection(s) at score ≥ ${threshold.toFixed(2)}`;
  window.lastDetections = {
    orig_size: [h, w],
    threshold,
    latency_ms: state.latency,
    boxes: kept.map((d) => d.box),
    scores: kept.map((d) => d.score),
    labels: kept.map((d) => d.label),
    names: kept.map((d) => d.name),
  };
}

function run(blob) {
  if (!state.session) return;
  window.lastDetections = null;
  detect(blob).catch((e) => fail(e && e.message ? e.message : e));
}

$("file").addEventListener("change", (e) => e.target.files[0] && run(e.target.files[0]));
$("threshold").addEventListener("input", (e) => {
  setThreshold(e.target.value);
  render();
});
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files[0]) run(e.dataTransfer.files[0]);
});

init().catch((e) => fail(e && e.message ? e.message : e));
