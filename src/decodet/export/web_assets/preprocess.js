// Pre-processing of decodet's Detector, in the browser (no dependencies; also runs under Node).
//
// Detector (decodet/inference/inputs.py) does: decode to 8-bit RGB (alpha composited over grey
// 128), resize the uint8 image to the model's fixed (H, W) with torchvision's antialiased
// bilinear filter, divide by 255, normalise with the model's mean/std.  A canvas resize is
// not used: browsers resample with their own, unspecified filters.  Torch's uint8 antialiased
// resize (the Pillow-SIMD algorithm) is written out here instead: separable triangle filter
// stretched by the scale, weights rounded to int16 fixed point, horizontal pass then
// vertical, each rounded to uint8 — so the model sees the same pixels as in Python.

const BACKGROUND_GREY = 128;

/** RGBA bytes (canvas ImageData.data, length 4*h*w) -> RGB bytes [h, w, 3], alpha blended
 * over grey 128 with Pillow's paste-with-mask rounding. */
export function rgbaToRgb(rgba, h, w) {
  const out = new Uint8Array(h * w * 3);
  for (let p = 0, q = 0; p < h * w; p++, q += 3) {
    const a = rgba[4 * p + 3];
    for (let c = 0; c < 3; c++) {
      const v = rgba[4 * p + c];
      if (a === 255) {
        out[q + c] = v;
      } else {
        const t = v * a + BACKGROUND_GREY * (255 - a) + 128;
        out[q + c] = (t + (t >> 8)) >> 8;
      }
    }
  }
  return out;
}

/** Antialiased bilinear taps for one axis: for each output index, the first input index and
 * int16 fixed-point weights; returns {start, size, weights, ksize, precision}. */
export function resizeTaps(inSize, outSize) {
  const scale = inSize / outSize;
  const support = scale >= 1 ? scale : 1.0;
  const invscale = scale >= 1 ? 1.0 / scale : 1.0;
  const ksize = Math.ceil(support) * 2 + 1;
  const start = new Int32Array(outSize);
  const size = new Int32Array(outSize);
  const fw = new Float64Array(outSize * ksize);
  let maxW = 0;
  for (let i = 0; i < outSize; i++) {
    const center = scale * (i + 0.5);
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xsize = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let total = 0;
    for (let j = 0; j < xsize; j++) {
      const x = Math.abs((j + xmin - center + 0.5) * invscale);
      const wgt = x < 1 ? 1 - x : 0;
      fw[i * ksize + j] = wgt;
      total += wgt;
    }
    for (let j = 0; j < xsize; j++) {
      if (total !== 0) fw[i * ksize + j] /= total;
      maxW = Math.max(maxW, fw[i * ksize + j]);
    }
    start[i] = xmin;
    size[i] = xsize;
  }
  let precision = 0;
  for (; precision < 22; precision++) {
    if (Math.trunc(0.5 + maxW * 2 ** (precision + 1)) >= 1 << 15) break;
  }
  const weights = new Int32Array(outSize * ksize);
  for (let k = 0; k < fw.length; k++) {
    const v = fw[k] * 2 ** precision;
    weights[k] = v < 0 ? Math.trunc(-0.5 + v) : Math.trunc(0.5 + v);
  }
  return { start, size, weights, ksize, precision };
}

function clip8(v) {
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** One resampling pass over RGB bytes [h, w, 3]: along the width (to [h, outSize, 3]) or,
 * with `vertical`, along the height (to [outSize, w, 3]); sums rounded to uint8. */
function resamplePass(src, h, w, outSize, vertical) {
  const t = resizeTaps(vertical ? h : w, outSize);
  const outH = vertical ? outSize : h;
  const outW = vertical ? w : outSize;
  const step = vertical ? w * 3 : 3; // from one tap to the next in src
  const half = 1 << (t.precision - 1);
  const div = 2 ** t.precision;
  const dst = new Uint8Array(outH * outW * 3);
  for (let y = 0; y < outH; y++) {
    for (let x = 0; x < outW; x++) {
      const i = vertical ? y : x; // the output index along the resampled axis
      const first = vertical ? (t.start[y] * w + x) * 3 : (y * w + t.start[x]) * 3;
      for (let c = 0; c < 3; c++) {
        let acc = half;
        for (let j = 0; j < t.size[i]; j++) acc += src[first + j * step + c] * t.weights[i * t.ksize + j];
        dst[(y * outW + x) * 3 + c] = clip8(Math.floor(acc / div));
      }
    }
  }
  return dst;
}

/** RGB bytes [h, w, 3] -> RGB bytes [outH, outW, 3], torchvision's uint8 antialiased
 * bilinear resize: horizontal pass, then vertical (an axis of unchanged length is not
 * resampled, as in torch). */
export function resizeRgb(rgb, h, w, outH, outW) {
  const wide = outW === w ? rgb : resamplePass(rgb, h, w, outW, false);
  return outH === h ? wide : resamplePass(wide, h, outW, outH, true);
}

/** RGB bytes [h, w, 3] -> Float32Array [3, H, W]: resized, /255, (x - mean) / std. */
export function toModelInput(rgb, h, w, outH, outW, mean, std) {
  const small = resizeRgb(rgb, h, w, outH, outW);
  const plane = outH * outW;
  const out = new Float32Array(3 * plane);
  for (let c = 0; c < 3; c++) {
    for (let p = 0; p < plane; p++) {
      out[c * plane + p] = (Math.fround(small[p * 3 + c] / 255) - mean[c]) / std[c];
    }
  }
  return out;
}
