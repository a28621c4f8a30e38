// Small inline-SVG charts of a device's history samples: [at, cpu_percent, memory_used_percent].

import {formatSpan, s} from "./dom.js";

const WIDTH = 120;
const HEIGHT = 30;
const PAD = 2;

/**
 * A chart of one column of samples, 0–100 %, from the oldest sample in the window to now.
 * now and the sample times are on the device table's clock (not the browser's).
 */
export function sparkline(samples, column, {now, windowS, label}) {
  const points = samples.filter((sample) => sample[0] >= now - windowS);
  const svg = s("svg", {
    class: "spark", viewBox: `0 0 ${WIDTH} ${HEIGHT}`, width: WIDTH, height: HEIGHT,
    role: "img", preserveAspectRatio: "none",
  });
  svg.append(s("line", {class: "spark-grid", x1: 0, x2: WIDTH, y1: y(50), y2: y(50)}));
  if (points.length < 2) {
    svg.setAttribute("aria-label", `${label}: not enough samples yet`);
    svg.append(s("title", {}, `${label}: collecting samples…`));
    return svg;
  }
  const start = Math.max(now - windowS, points[0][0]);
  const span = Math.max(now - start, 1e-6);
  const x = (at) => PAD + ((at - start) / span) * (WIDTH - 2 * PAD);
  const coords = points.map((sample) => [x(sample[0]), y(sample[column])]);
  const line = coords.map(([px, py]) => `${px.toFixed(1)},${py.toFixed(1)}`).join(" ");
  const first = coords[0];
  const last = coords[coords.length - 1];
  const area = `M${first[0].toFixed(1)},${HEIGHT} L${line.replace(/ /g, " L")} ` +
    `L${last[0].toFixed(1)},${HEIGHT} Z`;
  const values = points.map((sample) => sample[column]);
  const current = values[values.length - 1];
  const summary = `${label} over the last ${formatSpan(now - start)}: now ${Math.round(current)} %, ` +
    `lowest ${Math.round(Math.min(...values))} %, highest ${Math.round(Math.max(...values))} %`;
  svg.setAttribute("aria-label", summary);
  svg.append(
    s("title", {}, summary),
    s("path", {class: "spark-area", d: area}),
    s("polyline", {class: "spark-line", points: line}),
    s("circle", {class: "spark-dot", cx: last[0].toFixed(1), cy: last[1].toFixed(1), r: 2.2}),
  );
  return svg;
}

function y(percent) {
  const clamped = Math.min(100, Math.max(0, Number(percent) || 0));
  return HEIGHT - PAD - (clamped / 100) * (HEIGHT - 2 * PAD);
}

/** A horizontal bar for a value in [0, 1], such as a device score. */
export function bar(fraction, label) {
  const width = 64;
  const clamped = Math.min(1, Math.max(0, Number(fraction) || 0));
  return s("svg", {class: "bar", viewBox: `0 0 ${width} 8`, width, height: 8, role: "img",
    "aria-label": label},
  s("rect", {class: "bar-track", x: 0, y: 0, width, height: 8, rx: 4}),
  s("rect", {class: "bar-fill", x: 0, y: 0, width: (clamped * width).toFixed(1), height: 8, rx: 4}));
}
