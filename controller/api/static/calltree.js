// A run as a call tree: iterations ▸ code cells ▸ sub-calls and child runs ▸ their iterations…
// Built from one read of GET /v1/runs/{id}?descendants=1 (the run's events and its child
// runs'), so a running cell shows as soon as a sub-call or child run names it.

import {badge, formatMs, h, runOutcome} from "./dom.js";

// A cell with more sub-calls than this shows them as one summary row until it is opened.
export const FOLD_SUB_CALLS = 20;

function runNode(runId, runs, ms) {
  const events = runs.get(runId);
  const start = events[0];
  const end = events[events.length - 1];
  const result = end.kind === "run_finished" ? end.result : null;
  // The run's own rows in order: its iterations, and the seams where it was resumed.
  const top = [];
  // One go of the run after another (a resume starts the next): the iterations and the
  // cells (by "iteration/block") each go names. An iteration done again after a resume is
  // a node, and a key, of its own.
  const eras = [{iterations: [], cells: new Map()}];
  // When each resume happened: a child run belongs to the go it started in.
  const resumedAt = [];
  const last = () => eras.length - 1;
  const eraAt = (when) => resumedAt.filter((at) => at <= when).length;
  const iterationOf = (number, era = last()) => {
    const {iterations} = eras[era];
    let node = iterations.find((candidate) => candidate.number === number);
    if (!node) {
      node = {key: `${runId}${era ? `/r${era}` : ""}/i${number}`, kind: "iteration", number,
        title: `Iteration ${number}`, status: "running", children: []};
      iterations.push(node);
      top.push(node);
    }
    return node;
  };
  const cellOf = (number, block, era = last()) => {
    const {cells} = eras[era];
    let node = cells.get(`${number}/${block}`);
    if (!node) {
      const iteration = iterationOf(number, era);
      node = {key: `${iteration.key}/b${block}`, kind: "cell", title: `Cell ${block}`,
        status: "running", children: []};
      cells.set(`${number}/${block}`, node);
      iteration.children.push(node);
    }
    return node;
  };
  // Child runs (ids in start order) and what their sub-call events say about them.
  const children = [...runs.keys()].filter((id) => runs.get(id)[0].parent_run_id === runId);
  const answered = new Map();
  for (const event of events) {
    if (event.kind === "iteration_started") {
      iterationOf(event.iteration).title =
        {final_request: "Final request"}[event.phase] ?? `Iteration ${event.iteration}`;
    } else if (event.kind === "model_replied") {
      const node = iterationOf(event.iteration);
      if (event.phase === "direct") node.title = "Direct call";
      Object.assign(node, {where: event.endpoint || (event.cached ? "cache" : ""), ms: event.model_ms});
    } else if (event.kind === "code_executed") {
      Object.assign(cellOf(event.iteration, event.block), {
        title: `Cell ${event.block} (${event.language || "python"})`, where: event.device_id,
        ms: event.wall_time_ms, status: event.status === "ok" ? "ok" : event.status || "unknown"});
    } else if (event.kind === "iteration_finished") {
      Object.assign(iterationOf(event.iteration), {status: "ok", codeMs: event.code_ms});
    } else if (event.kind === "resumed") {
      // Iterations from here on start afresh: those recorded before were cut off.
      const before = eras[last()];
      eras.push({iterations: before.iterations.filter((node) => node.number < event.iteration),
        cells: new Map([...before.cells].filter(([key]) =>
          Number(key.split("/")[0]) < event.iteration))});
      resumedAt.push(event.resumed_at);
      top.push({key: `${runId}/r${last()}`, kind: "resumed",
        title: `Resumed at iteration ${event.iteration}`, status: event.reason,
        where: `replayed ${event.replayed_cells} cell(s) and ${event.replayed_sub_calls} ` +
          "sub-call answer(s)", children: []});
    } else if (event.kind === "sub_call" && event.child_run_id) {
      answered.set(event.child_run_id, {call: event, era: last()});
    } else if (event.kind === "sub_call") {
      const parent = event.block ? cellOf(event.iteration, event.block) : iterationOf(event.iteration);
      parent.children.push({key: `${parent.key}/q${parent.children.length}`, kind: "sub_call",
        title: "llm_query", where: event.endpoint, ms: event.latency_ms,
        status: event.error ? "error" : "ok", error: event.error, children: []});
    }
  }
  // A child run shows under its cell from its first line, long before its answer; files
  // older than that link show it where its sub-call was answered.
  const parentOf = (iteration, block, era = last()) => {
    const {iterations} = eras[era];
    if (!iteration) return iterations[iterations.length - 1] ?? iterationOf(1, era);
    return block ? cellOf(iteration, block, era) : iterationOf(iteration, era);
  };
  for (const childId of children) {
    const start = runs.get(childId)[0];
    const {call, era} = answered.get(childId) ?? {};
    const parent = start.parent_iteration
      ? parentOf(start.parent_iteration, start.parent_block, eraAt(start.started_at))
      : parentOf(call?.iteration, call?.block, era);
    parent.children.push(runNode(childId, runs, call?.latency_ms));
  }
  for (const [childId, {call, era}] of answered) {
    if (runs.has(childId)) continue;
    parentOf(call.iteration, call.block, era).children.push({key: `${runId}/${childId}`, kind: "run",
      title: `Child run ${childId}`, status: call.error ? "error" : "unknown",
      ms: call.latency_ms, children: []});
  }
  const status = result ? (result.error ? "failed" : runOutcome(result.stop_reason)) : "running";
  return {key: runId, kind: "run", runId, depth: start.depth,
    title: start.depth ? `Child run ${runId}` : `Run ${runId}`,
    where: result ? `${result.iterations} iterations, ${result.sub_calls} sub-calls` : "",
    ms: result ? result.latency_ms : ms, status, children: top};
}

/** The tree of a trajectory read with its descendants. */
export function buildTree(trajectory) {
  const runs = new Map();
  for (const run of [trajectory, ...(trajectory.descendants ?? [])]) {
    if (run.events?.[0]?.kind === "run_started") runs.set(run.events[0].run_id, run.events);
  }
  const root = trajectory.events?.[0];
  return root?.kind === "run_started" ? runNode(root.run_id, runs) : null;
}

function row(node) {
  const timing = node.kind === "iteration"
    ? [node.ms !== undefined ? `model ${formatMs(node.ms)}` : "model replying…",
      node.codeMs !== undefined ? `code ${formatMs(node.codeMs)}` : ""].filter(Boolean).join(" · ")
    : node.ms === undefined ? "" : formatMs(node.ms);
  return [
    h("span", {class: "node-title"}, node.title), " ",
    badge(node.status),
    node.where ? h("span", {class: "node-where mono", title: node.where}, node.where) : null,
    h("span", {class: "node-ms mono"}, timing),
    node.error ? h("div", {class: "sub error-text"}, node.error) : null,
  ];
}

function summaryOf(calls) {
  const endpoints = new Set(calls.map((call) => call.where).filter(Boolean));
  const errors = calls.filter((call) => call.status === "error").length;
  const total = calls.reduce((sum, call) => sum + (call.ms ?? 0), 0);
  return `${calls.length} sub-calls · ${endpoints.size} endpoint${endpoints.size === 1 ? "" : "s"}` +
    ` · ${errors} error${errors === 1 ? "" : "s"} · ${formatMs(total / calls.length)} each on average`;
}

export class CallTree {
  constructor() {
    // Node key -> open or closed, as the reader left it: kept across redraws.
    this.open = new Map();
  }

  reset() {
    this.open.clear();
  }

  render(tree) {
    if (!tree) return null;
    return h("section", {class: "call-tree", "aria-label": "Call tree"},
      h("h3", {}, "Call tree"), h("ul", {class: "tree"}, this.node(tree)));
  }

  node(node) {
    const attributes = {class: `tree-node kind-${node.kind}`,
      dataset: {kind: node.kind, key: node.key, status: node.status, ...(node.where ? {where: node.where} : {})}};
    if (node.kind === "run" && node.runId) attributes.dataset.run = node.runId;
    if (!node.children.length) {
      return h("li", attributes, h("div", {class: "node-row leaf"}, row(node)));
    }
    return h("li", attributes, this.collapsible(node.key, true, row(node), () => this.list(node)));
  }

  list(node) {
    const calls = node.children.filter((child) => child.kind === "sub_call");
    const others = node.children.filter((child) => child.kind !== "sub_call");
    const items = others.map((child) => this.node(child));
    if (calls.length > FOLD_SUB_CALLS) {
      const key = `${node.key}/sub-calls`;
      items.push(h("li", {class: "tree-node kind-sub_calls", dataset: {kind: "sub_calls", key}},
        this.collapsible(key, false, h("span", {class: "node-title"}, summaryOf(calls)),
          () => h("ul", {class: "tree"}, calls.map((call) => this.node(call))))));
    } else {
      items.push(...calls.map((call) => this.node(call)));
    }
    return h("ul", {class: "tree"}, items);
  }

  /** A <details> whose body is drawn only while open, so folded lists cost nothing. */
  collapsible(key, openByDefault, head, body) {
    const details = h("details", {open: this.open.get(key) ?? openByDefault},
      h("summary", {class: "node-row"}, head));
    if (details.open) details.append(body());
    details.addEventListener("toggle", () => {
      this.open.set(key, details.open);
      if (details.open && details.children.length === 1) details.append(body());
    });
    return details;
  }
}
