// The page's tables, rebuilt from each snapshot of GET /v1/events.

import {
  badge, clip, formatAgo, formatBytes, formatClock, formatCount, formatMs, formatSpan, h,
  runOutcome,
} from "./dom.js";
import {bar, sparkline} from "./sparkline.js";

const $ = (id) => document.getElementById(id);

function fill(tableId, emptyId, rows) {
  $(tableId).tBodies[0].replaceChildren(...rows);
  $(emptyId).hidden = rows.length > 0;
}

/** Jobs and cells running on agents plus model calls (a run's turns and sub-calls) open. */
export function workInFlight(status) {
  const onDevices = status.devices.reduce((sum, d) => sum + d.in_flight.length, 0);
  const onModels = status.endpoints.reduce((sum, e) => sum + e.in_flight, 0);
  return {onDevices, onModels, total: onDevices + onModels};
}

export function renderSummary(snapshot, runs) {
  const {devices, endpoints, jobs, cache} = snapshot.status;
  const healthy = devices.filter((d) => d.health === "healthy").length;
  const work = workInFlight(snapshot.status);
  const running = runs.filter((r) => r.status === "running").length;
  const up = endpoints.filter((e) => e.healthy).length;
  const lookups = cache.hits + cache.misses;
  const card = (label, value, detail, tone) => h("div", {class: `card ${tone ?? ""}`},
    h("div", {class: "card-label"}, label),
    h("div", {class: "card-value"}, value),
    h("div", {class: "card-detail"}, detail));
  $("summary").replaceChildren(
    card("Devices healthy", `${healthy} / ${devices.length}`,
      devices.length === healthy ? "all answering heartbeats" : `${devices.length - healthy} not healthy`,
      devices.length && healthy < devices.length ? "warn" : ""),
    card("Work in flight", String(work.total),
      `${work.onDevices} on agents, ${work.onModels} model calls · ` +
      `${formatCount(jobs.submitted)} jobs submitted`),
    card("RLM runs running", String(running), `${runs.length - running} finished or stopped`,
      running ? "info" : ""),
    card("exo endpoints up", `${up} / ${endpoints.length}`,
      `${endpoints.reduce((n, e) => n + e.ready_models.length, 0)} models ready`,
      endpoints.length && up < endpoints.length ? "warn" : ""),
    card("Cache hit rate", lookups ? `${Math.round((100 * cache.hits) / lookups)} %` : "–",
      `${formatCount(cache.entries)} entries`),
  );
  const span = formatSpan(snapshot.history_window_s);
  $("history-hint").textContent = `Charts: CPU and memory used over the last ${span} (0–100 %).`;
  $("meta").textContent =
    `Controller ${snapshot.status.version} · updated ${formatClock(snapshot.status.time)}`;
}

export function renderDevices(snapshot) {
  const {clock: now, history_window_s: windowS} = snapshot;
  const rows = snapshot.status.devices.map((device) => {
    const metrics = device.metrics;
    const score = device.scores.code_execution ?? 0;
    const memoryUsed = metrics ? metrics.memory_total_bytes - metrics.memory_available_bytes : null;
    return h("tr", {dataset: {device: device.device_id}, class: device.health},
      h("td", {},
        h("div", {class: "strong"}, device.name || device.device_id),
        h("div", {class: "sub mono"}, device.device_id),
        h("div", {class: "sub"}, `${device.url} · ${device.source}`,
          device.sandbox_mode ? ` · sandbox ${device.sandbox_mode}` : "")),
      h("td", {},
        h("span", {class: "health"}, badge(device.lost ? "lost" : device.health)),
        device.excluded ? h("div", {class: "sub"}, `no jobs: ${device.excluded}`) : null),
      h("td", {class: "circuit"}, badge(device.circuit)),
      h("td", {class: "score"},
        h("div", {class: "mono"}, score.toFixed(3)), bar(score, `code execution score ${score}`)),
      h("td", {class: "chart"},
        sparkline(device.history, 1, {now, windowS, label: "CPU"}),
        h("span", {class: "chart-value"}, metrics ? `${Math.round(metrics.cpu_percent)} %` : "–",
          metrics ? h("span", {class: "sub"}, ` of ${metrics.cpu_count} cores`) : null)),
      h("td", {class: "chart"},
        sparkline(device.history, 2, {now, windowS, label: "Memory used"}),
        h("span", {class: "chart-value"},
          metrics ? `${formatBytes(memoryUsed)} / ${formatBytes(metrics.memory_total_bytes)}` : "–")),
      h("td", {class: "num mono"}, formatMs(device.latency_ms)),
      h("td", {class: "num mono", title: device.in_flight.join("\n")},
        String(device.in_flight.length)),
      h("td", {},
        h("div", {}, formatAgo(device.seconds_since_heartbeat)),
        device.last_error ? h("div", {class: "sub error-text", title: device.last_error},
          clip(device.last_error, 80)) : null));
  });
  fill("devices", "devices-empty", rows);
}

export function renderJobs(snapshot) {
  const {jobs, devices} = snapshot.status;
  const unfinished = Math.max(0, jobs.submitted - jobs.succeeded - jobs.failed);
  const counter = (label, value, title) => h("div", {class: "counter", title, dataset: {counter: label}},
    h("span", {class: "counter-value"}, formatCount(value)), h("span", {class: "counter-label"}, label));
  $("job-counters").replaceChildren(
    counter("submitted", jobs.submitted),
    counter("unfinished", unfinished, "Running on a device, or waiting to be retried on another"),
    counter("succeeded", jobs.succeeded),
    counter("failed", jobs.failed),
    counter("rerouted", jobs.rerouted, "Attempts moved to another device after a device fault"));
  const rows = [];
  for (const device of devices) {
    for (const work of device.in_flight) {
      rows.push(h("tr", {dataset: {job: work}},
        h("td", {class: "mono"}, work),
        h("td", {}, device.name || device.device_id),
        h("td", {}, badge(device.circuit))));
    }
  }
  fill("jobs", "jobs-empty", rows);
}

function instanceList(endpoint, instances) {
  const models = new Set(endpoint.ready_models);
  const items = [];
  for (const instance of instances ?? []) {
    models.delete(instance.model_id);
    items.push(h("li", {},
      h("span", {class: "mono"}, instance.model_id), " ",
      badge(instance.ready ? "ready" : "loading"),
      h("div", {class: "sub"},
        `${instance.kind || "instance"} · ${instance.nodes} node${instance.nodes === 1 ? "" : "s"} · `,
        h("span", {class: "mono", title: instance.instance_id}, clip(instance.instance_id, 12)))));
  }
  for (const model of models) {
    items.push(h("li", {}, h("span", {class: "mono"}, model), " ", badge("ready")));
  }
  return items.length ? h("ul", {class: "plain"}, items) : h("span", {class: "sub"}, "no model ready");
}

export function renderEndpoints(snapshot) {
  const rows = snapshot.status.endpoints.map((endpoint) => h("tr", {dataset: {endpoint: endpoint.url}},
    h("td", {},
      h("div", {class: "strong mono"}, endpoint.url),
      h("div", {class: "sub"}, endpoint.flavour ? `exo ${endpoint.flavour}` : "not detected yet",
        ` · ${formatMs(endpoint.latency_ms)}`)),
    h("td", {},
      badge(endpoint.state),
      endpoint.last_error ? h("div", {class: "sub error-text", title: endpoint.last_error},
        clip(endpoint.last_error, 60)) : null),
    h("td", {}, badge(endpoint.circuit)),
    h("td", {}, instanceList(endpoint, snapshot.instances[endpoint.url])),
    h("td", {class: "num mono"}, String(endpoint.nodes)),
    h("td", {class: "num mono", title: `${endpoint.in_flight} in flight, ${endpoint.errors} errors`},
      formatCount(endpoint.requests),
      endpoint.errors ? h("div", {class: "sub error-text"}, `${endpoint.errors} errors`) : null),
    h("td", {class: "num mono", title: `${endpoint.prompt_tokens} prompt + ` +
      `${endpoint.completion_tokens} completion`},
    formatCount(endpoint.prompt_tokens + endpoint.completion_tokens))));
  fill("endpoints", "endpoints-empty", rows);
}

/** Live runs of this controller first, then older root runs from the trajectory directory. */
export function mergeRuns(snapshot) {
  // Child runs are not rows of their own: a root run counts them (from the stored files).
  const childRuns = new Map(snapshot.stored_runs.map((run) => [run.run_id, run.child_runs]));
  const live = snapshot.status.runs.map((run) => ({
    ...run, live: true, status: run.status === "running" ? "running" : runOutcome(run.stop_reason),
    child_runs: childRuns.get(run.run_id) ?? 0,
  }));
  const known = new Set(live.map((run) => run.run_id));
  const stored = snapshot.stored_runs.filter((run) => !known.has(run.run_id)).map((run) => ({
    run_id: run.run_id, query: run.query, started_at: run.started_at,
    status: runOutcome(run.stop_reason),
    stop_reason: run.stop_reason ?? "", iterations: run.iterations, sub_calls: run.sub_calls,
    tokens: null, devices: [], live: false, child_runs: run.child_runs,
  }));
  return [...live, ...stored];
}

export function renderRuns(runs, selected, onSelect) {
  // Rows are rebuilt on every snapshot: keep keyboard focus on the same run's button.
  const focused = document.activeElement?.closest?.("#runs tr")?.dataset.run;
  const rows = runs.map((run) => h("tr", {
    dataset: {run: run.run_id}, class: run.run_id === selected ? "selected" : null,
    onclick: () => onSelect(run.run_id),
  },
  h("td", {}, h("button", {
    type: "button", class: "link mono", "aria-pressed": run.run_id === selected ? "true" : "false",
    title: "Show this run's trajectory",
  }, run.run_id),
  run.child_runs ? h("div", {class: "sub child-runs"},
    `${run.child_runs} child run${run.child_runs === 1 ? "" : "s"}`) : null),
  h("td", {class: "query", title: run.query}, clip(run.query, 90)),
  h("td", {class: "run-status", dataset: {outcome: run.status}}, badge(run.status),
    run.stop_reason && run.status !== "finished" ? h("span", {class: "sub"}, ` ${run.stop_reason}`) : null),
  h("td", {class: "num mono"}, formatCount(run.iterations)),
  h("td", {class: "num mono"}, formatCount(run.sub_calls)),
  h("td", {class: "num mono"}, formatCount(run.tokens)),
  h("td", {}, formatClock(run.started_at)),
  h("td", {class: "sub"}, run.live ? run.devices.join(", ") || "–" : "earlier controller")));
  fill("runs", "runs-empty", rows);
  rows.find((row) => row.dataset.run === focused)?.querySelector("button").focus();
}
