// Building DOM nodes from data. Text always goes in as text nodes, never as markup:
// device names, queries, model replies and code output are untrusted.

const SVG_NS = "http://www.w3.org/2000/svg";

function setProps(node, props) {
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.setAttribute("class", value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
}

function appendAll(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
}

/** An HTML element: h("td", {class: "num"}, "42", otherNode). */
export function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  setProps(node, props);
  appendAll(node, children);
  return node;
}

/** An SVG element, with numbers and fixed names as attributes. */
export function s(tag, props = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setProps(node, props);
  appendAll(node, children);
  return node;
}

// Colour by a fixed table, always next to the word itself.
const TONES = {
  healthy: "good", up: "good", closed: "good", finished: "good", ok: "good", ready: "good",
  unhealthy: "bad", down: "bad", open: "bad", failed: "bad", error: "bad", lost: "bad",
  half_open: "warn", incomplete: "warn", loading: "warn", timeout: "warn", stopped: "warn",
  running: "info", probing: "info", cancelled: "muted", unknown: "muted",
};

/** A status label: a coloured pill that always carries its word. */
export function badge(word, title) {
  const tone = TONES[word] ?? "muted";
  return h("span", {class: `badge ${tone}`, title},
    h("span", {class: "badge-dot", "aria-hidden": "true"}), word.replace(/_/g, "-"));
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(value >= 100 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 10) return `${ms.toFixed(1)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  return `${(ms / 1000).toFixed(1)} s`;
}

export function formatAgo(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 1) return "just now";
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

export function formatSpan(seconds) {
  if (seconds < 90) return `${Math.max(1, Math.round(seconds))} s`;
  return `${Math.round(seconds / 60)} min`;
}

export function formatCount(value) {
  return value === null || value === undefined ? "–" : value.toLocaleString("en-US");
}

export function formatClock(epochSeconds) {
  const date = new Date(epochSeconds * 1000);
  const today = new Date();
  const time = date.toLocaleTimeString("en-GB", {hour12: false});
  if (date.toDateString() === today.toDateString()) return time;
  return `${date.toISOString().slice(0, 10)} ${time}`;
}

/** The text cut to a length, with the whole text kept for a tooltip. */
export function clip(text, length) {
  return text.length <= length ? text : `${text.slice(0, length - 1)}…`;
}

// How a run ended, by its stop reason: answered, stopped at a limit, failed or cancelled.
const OUTCOMES = {
  final: "finished", final_var: "finished", answer_dict: "finished", direct: "finished",
  max_iterations: "stopped", timeout: "stopped", token_budget: "stopped",
  error: "failed", cancelled: "cancelled",
};

/** The status word of a run that is no longer running ("incomplete" without a stop reason). */
export function runOutcome(stopReason) {
  return stopReason ? OUTCOMES[stopReason] ?? "finished" : "incomplete";
}
