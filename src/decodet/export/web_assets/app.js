// decodet's web page: choose or drop an image, see the boxes, move the score threshold.
//
// One page, two sources of detections, picked by the config in <script id="config">:
//   {"source": "onnx"}               the exported model (model.json, model.onnx) run in this page
//                                    by ONNX Runtime Web (WASM, one thread); no image leaves it
//   {"source": "api", "root": ""}    the decodet serve HTTP API (GET /v1/model, POST /v1/detect)
// A source loads once ({info, threshold}) and answers detect(file, bitmap) with every detection
// ({size: [h, w], dets: [{box, score, label, name}], ms, latency}); the slider filters them here
// (score >= threshold, Detector's rule), so moving it runs nothing again.
//
// For tests and tools: window.decodetReady (the source is loaded), window.decodetError (the last
// failure), window.lastDetections (what is drawn: {orig_size: [h, w], threshold, latency_ms, boxes
// [[x1, y1, x2, y2] in image pixels], scores, labels, names}); in the DOM, #detections has one <li>
// per box (data-label, data-name, data-score, data-box), #classes one per class (data-name,
// data-count), canvas[data-drawn] counts the boxes and #status[data-state] is idle, running, done
// or error.
import { rgbaToRgb, toModelInput } from "./preprocess.js";

const $ = (id) => document.getElementById(id);
const config = JSON.parse($("config").textContent);
const state = { image: null, result: null, file: null };

function setStatus(text, kind) {
  $("status").textContent = text;
  $("status").dataset.state = kind;
  if (kind === "error") window.decodetError = text;
}

function setThreshold(value) {
  $("threshold").value = String(value);
  $("threshold-value").textContent = Number(value).toFixed(2);
}

function colour(label) {
  return `hsl(${((Number(label) * 137.508) % 360).toFixed(0)}, 85%, 45%)`; // golden-angle hues
}

// ------------------------------------------------------------------------- source: HTTP API

function apiSource({ root = "" }) {
  const headers = () => ($("api-key").value ? { "X-API-Key": $("api-key").value } : {});
  async function load() {
    const res = await fetch(`${root}/v1/model`, { headers: headers() });
    if (res.status === 401) {
      $("key-row").hidden = false;
      return { info: "this server needs an API key" };
    }
    const m = await res.json();
    $("key-row").hidden = !m.auth;
    const what = `input ${m.input_size.height}×${m.input_size.width} · ${m.classes.length || m.num_classes} classes`;
    return { info: `${m.preset} · ${m.backend} · ${what}`, threshold: m.threshold };
  }
  $("api-key").addEventListener("change", () => start(load));
  $("docs").href = `${root}/docs`;
  $("docs").hidden = false;
  return {
    load,
    async detect(file) {
      const t0 = performance.now();
      const res = await fetch(`${root}/v1/detect?threshold=0`, {
        method: "POST",
        headers: { ...headers(), "Content-Type": file.type || "application/octet-stream" },
        body: file,
      });
      const body = await res.json();
      const ms = performance.now() - t0;
      if (res.status === 401) $("key-row").hidden = false;
      if (!res.ok) throw new Error(`Error ${res.status}: ${body.error}`);
      const t = body.timings_ms;
      return {
        size: [body.image_size.height, body.image_size.width],
        dets: body.scores.map((score, i) => ({
          box: body.boxes[i], score, label: body.labels[i], name: body.names[i],
        })),
        ms,
        latency: `Latency ${ms.toFixed(0)} ms round trip; server: decode ${t.decode.toFixed(1)} ms, queue ` +
          `${t.queue.toFixed(1)} ms, inference ${t.inference.toFixed(1)} ms (batch of ${body.batch_size}).`,
      };
    },
  };
}

// ------------------------------------------------------------ source: ONNX Runtime Web here

function onnxSource() {
  let ort, meta, session;
  return {
    async load() {
      ort = await import("./ort/ort.wasm.min.mjs");
      ort.env.wasm.numThreads = 1; // one thread: no SharedArrayBuffer, so no COOP/COEP headers needed
      ort.env.wasm.proxy = false;
      ort.env.wasm.wasmPaths = new URL("./ort/", import.meta.url).href;
      const res = await fetch(new URL("model.json", import.meta.url));
      if (!res.ok) throw new Error(`model.json: HTTP ${res.status}`);
      meta = await res.json();
      const model = new URL("model.onnx", import.meta.url).href;
      session = await ort.InferenceSession.create(model, { executionProviders: ["wasm"] });
      const [h, w] = meta.imgsz;
      const what = `in this page (ONNX Runtime Web) · input ${h}×${w} · ${Object.keys(meta.class_names).length} classes`;
      return { info: `${meta.model} · ${meta.precision} · ${what}`, threshold: meta.threshold };
    },
    async detect(file, bitmap) {
      if (!bitmap) throw new Error(`cannot decode ${file.name} as an image`);
      const { width: w, height: h } = bitmap;
      const ctx = new OffscreenCanvas(w, h).getContext("2d", { willReadFrequently: true });
      ctx.drawImage(bitmap, 0, 0);
      const rgb = rgbaToRgb(ctx.getImageData(0, 0, w, h).data, h, w);
      const [H, W] = meta.imgsz;
      const t0 = performance.now();
      const out = await session.run({
        images: new ort.Tensor("float32", toModelInput(rgb, h, w, H, W, meta.mean, meta.std), [1, 3, H, W]),
        orig_sizes: new ort.Tensor("float32", Float32Array.of(h, w), [1, 2]),
      });
      const ms = performance.now() - t0;
      const dets = Array.from(out.scores.data, (score, i) => {
        const label = Number(out.labels.data[i]);
        const box = Array.from(out.boxes.data.subarray(4 * i, 4 * i + 4));
        return { box, score, label, name: meta.class_names[String(label)] ?? String(label) };
      });
      const latency = `Latency ${ms.toFixed(0)} ms (pre-processing + model, in this page).`;
      return { size: [h, w], dets, ms, latency };
    },
  };
}

// -------------------------------------------------------------------- the page, either source

const source = config.source === "api" ? apiSource(config) : onnxSource();
let ready = null;

function start(load) {
  window.decodetReady = false;
  ready = load().then(({ info, threshold }) => {
    $("model-info").textContent = info;
    const fromUrl = new URLSearchParams(location.search).get("threshold");
    const t = fromUrl !== null && !Number.isNaN(Number(fromUrl)) ? Number(fromUrl) : threshold;
    if (t !== undefined) setThreshold(t);
    window.decodetReady = true;
  });
  ready.catch((err) => {
    $("model-info").textContent = "the model did not load";
    setStatus(`Cannot load the model: ${err.message ?? err}`, "error");
  });
}

async function detect(file) {
  if (!file) return;
  setStatus(`Detecting objects in ${file.name}…`, "running");
  $("latency").textContent = "";
  state.result = null;
  window.lastDetections = null;
  window.decodetError = undefined;
  try {
    await ready;
    const opts = { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" };
    state.image = await createImageBitmap(file, opts).catch(() => null); // the API says what is wrong
    state.file = file;
    state.result = await source.detect(file, state.image);
    $("latency").textContent = state.result.latency;
  } catch (err) {
    setStatus(err.message ?? String(err), "error");
  }
  render();
}

/** Keep the detections at or above the threshold; draw, list and expose them. */
function render() {
  const r = state.result;
  const threshold = Number($("threshold").value);
  const kept = r ? r.dets.filter((d) => d.score >= threshold) : [];
  draw(kept);
  list(kept);
  if (!r) return;
  const [h, w] = r.size;
  const shown = `${kept.length} detection(s) at score ≥ ${threshold.toFixed(2)}`;
  setStatus(`${state.file.name}: ${w}×${h}, ${shown}`, "done");
  window.lastDetections = {
    orig_size: r.size,
    threshold,
    latency_ms: r.ms,
    boxes: kept.map((d) => d.box),
    scores: kept.map((d) => d.score),
    labels: kept.map((d) => d.label),
    names: kept.map((d) => d.name),
  };
}

function draw(dets) {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  if (state.image) {
    canvas.width = state.image.width;
    canvas.height = state.image.height;
    ctx.drawImage(state.image, 0, 0);
  } else {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
  }
  const line = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 200));
  const size = Math.max(12, line * 6);
  ctx.lineWidth = line;
  ctx.font = `${size}px system-ui, sans-serif`;
  ctx.textBaseline = "top";
  for (const d of dets) {
    const [x1, y1, x2, y2] = d.box;
    ctx.strokeStyle = ctx.fillStyle = colour(d.label);
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    const text = `${d.name} ${d.score.toFixed(2)}`;
    const ty = y1 - size - line >= 0 ? y1 - size - line : y1; // the label above the box when it fits
    ctx.fillRect(x1, ty, ctx.measureText(text).width + 2 * line, size + line);
    ctx.fillStyle = "#fff";
    ctx.fillText(text, x1 + line, ty + line / 2);
  }
  canvas.dataset.drawn = String(dets.length);
}

function list(dets) {
  const counts = new Map();
  $("detections").replaceChildren(
    ...dets.map((d) => {
      const li = document.createElement("li");
      Object.assign(li.dataset, { label: d.label, name: d.name, score: d.score, box: JSON.stringify(d.box) });
      li.textContent = `${d.name} ${d.score.toFixed(2)} [${d.box.map((v) => v.toFixed(0)).join(", ")}]`;
      counts.set(d.name, [d.label, (counts.get(d.name)?.[1] ?? 0) + 1]);
      return li;
    }),
  );
  const sorted = [...counts].sort((a, b) => b[1][1] - a[1][1] || a[0].localeCompare(b[0]));
  $("classes").replaceChildren(
    ...sorted.map(([name, [label, n]]) => {
      const li = document.createElement("li");
      Object.assign(li.dataset, { name, count: n });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = colour(label);
      li.append(swatch, `${name}: ${n}`);
      return li;
    }),
  );
}

$("file").addEventListener("change", (e) => detect(e.target.files[0]));
$("threshold").addEventListener("input", (e) => {
  setThreshold(e.target.value);
  render();
});
const drop = $("drop");
for (const ev of ["dragenter", "dragover", "dragleave", "drop"]) {
  drop.addEventListener(ev, (e) => {
    e.preventDefault();
    drop.classList.toggle("over", ev === "dragenter" || ev === "dragover");
  });
}
drop.addEventListener("drop", (e) => detect(e.dataTransfer.files[0]));
start(source.load);
