// One run's trajectory (GET /v1/runs/{id}): its call tree, then its events per iteration.
// Fetched when a run is selected, and again when the stream says that run (or a child run
// below it) moved on; one read at a time, the last change read once the one in flight ends.

import {CallTree, buildTree} from "./calltree.js";
import {badge, formatClock, formatCount, formatMs, h, runOutcome} from "./dom.js";

const MAX_CHARS = 20000;

function cut(text) {
  const value = text ?? "";
  if (value.length <= MAX_CHARS) return value;
  return `${value.slice(0, MAX_CHARS)}\n[… ${value.length - MAX_CHARS} more characters]`;
}

function block(label, text, kind) {
  return h("div", {class: `text-block ${kind}`},
    h("div", {class: "text-label"}, label),
    h("pre", {class: kind}, cut(text) || "(empty)"));
}

function tokens(count) {
  return count ? `${formatCount(count.total_tokens)} tokens` : "";
}

function codeBlock(code) {
  if (code.kind === "code_skipped") {
    return h("div", {class: "code-cell skipped"},
      h("div", {class: "cell-head"}, `Block ${code.block}: ${code.language || "untagged"} — not run`));
  }
  const where = code.device_id ? ` on ${code.device_id}` : "";
  return h("div", {class: "code-cell"},
    h("div", {class: "cell-head"},
      h("span", {class: "mono"}, code.language || "python"), " ",
      badge(code.status === "ok" ? "ok" : code.status || "unknown"),
      h("span", {class: "sub"}, ` ${formatMs(code.wall_time_ms)}${where}`)),
    block("Code", code.code, "code"),
    block("Output", code.output, "output"));
}

function subCalls(calls) {
  if (!calls || calls.length === 0) return null;
  return h("details", {class: "sub-calls"},
    h("summary", {}, `${calls.length} sub-call${calls.length === 1 ? "" : "s"} (llm_query)`),
    calls.map((call, index) => h("div", {class: "sub-call"},
      h("div", {class: "cell-head"}, `Sub-call ${index + 1} · ${formatMs(call.latency_ms)} · ` +
        `${tokens(call.tokens)}${call.child_run_id ? ` · child run ${call.child_run_id}` : ""}`),
      call.error ? h("div", {class: "error-text"}, call.error) : null,
      block("Prompt", call.prompt, "sub-prompt"),
      block("Answer", call.answer, "sub-answer"))));
}

/** The events between run_started and run_finished, one group per iteration or resume. */
function byIteration(events) {
  const groups = [];
  for (const event of events) {
    if (event.kind === "run_started" || event.kind === "run_finished") continue;
    if (event.kind === "iteration_started" || event.kind === "resumed" || groups.length === 0) groups.push([]);
    groups[groups.length - 1].push(event);
  }
  return groups;
}

function iteration(events) {
  const seam = events[0];
  if (seam.kind === "resumed") {
    return h("div", {class: "note"}, `Resumed at iteration ${seam.iteration} (${seam.reason}, ` +
      `${formatClock(seam.resumed_at)}): replayed ${seam.replayed_cells} cell(s) and ` +
      `${seam.replayed_sub_calls} sub-call answer(s) from the record`);
  }
  const find = (kind) => events.find((event) => event.kind === kind);
  const reply = find("model_replied") ?? {};
  const finished = find("iteration_finished") ?? {};
  const number = events[0].iteration;
  const phase = reply.phase ?? finished.phase;
  const title = {final_request: "Final request", direct: "Direct call"}[phase] ?? `Iteration ${number}`;
  const facts = [`model ${formatMs(reply.model_ms)}`, `code ${formatMs(finished.code_ms)}`,
    tokens(reply.tokens), reply.endpoint].filter(Boolean).join(" · ");
  const fold = find("context_folded");
  return h("article", {class: "iteration", dataset: {iteration: number}},
    h("header", {class: "iteration-head"}, h("h3", {}, title), h("span", {class: "sub"}, facts)),
    fold ? h("div", {class: "note"}, `Context folded by ${fold.method}: ${fold.folded_turns} turns, ` +
      `~${fold.tokens_before} → ~${fold.tokens_after} tokens${fold.error ? ` (${fold.error})` : ""}`) : null,
    reply.reasoning ? block("Reasoning (not read for code or FINAL)", reply.reasoning, "reasoning") : null,
    block("Model reply", reply.text, "reply"),
    events.filter((event) => event.kind === "code_executed" || event.kind === "code_skipped").map(codeBlock),
    subCalls(events.filter((event) => event.kind === "sub_call")),
    finished.final_kind ? h("div", {class: "note"},
      finished.final_note || `${finished.final_kind.toUpperCase()}(${finished.final_value})`) : null);
}

// Stop reasons that mean the model gave its answer (the others stop without one).
const ANSWERED = new Set(["final", "final_var", "answer_dict", "direct"]);

function finalPart(final) {
  if (!final) {
    return h("article", {class: "final pending"},
      h("h3", {}, "Not finished"), h("p", {class: "sub"}, "Running, or stopped without a final record."));
  }
  const outcome = final.error ? "failed" : runOutcome(final.stop_reason);
  const answered = Boolean(final.answer) || ANSWERED.has(final.stop_reason);
  // A run stopped at a limit, failed or cancelled has no answer: say why, and show what
  // the model said last instead of an empty box.
  const body = answered ? [h("pre", {class: "final-answer"}, cut(final.answer) || "(empty)")] : [
    h("p", {class: "no-answer"}, `No answer (${final.stop_reason}); the model's last reply was:`),
    h("pre", {class: "last-reply"}, cut(final.last_reply) || "(the model never replied)")];
  return h("article", {class: "final", dataset: {answered: answered ? "yes" : "no"}},
    h("header", {class: "iteration-head"},
      h("h3", {}, answered ? "Answer" : "No answer"), badge(outcome),
      h("span", {class: "sub"}, ` ${final.stop_reason} after ${final.iterations} iterations, ` +
        `${final.sub_calls} sub-calls, ${formatMs(final.latency_ms)}, ${tokens(final.tokens)}`)),
    final.detail ? h("p", {class: "sub stop-detail"}, final.detail) : null,
    final.error ? h("p", {class: "error-text"}, final.error.message) : null,
    body);
}

export class TrajectoryView {
  constructor(root, onClose) {
    this.root = root;
    this.onClose = onClose;
    this.runId = null;
    this.signature = null;
    this.sequence = 0;
    this.tree = new CallTree();
    this.loading = false;
    this.again = false;
  }

  open(runId, run) {
    if (runId === this.runId) return;
    this.runId = runId;
    this.signature = signatureOf(run);
    this.replying = run ?? null;
    this.sequence += 1;
    this.tree.reset();
    this.root.hidden = false;
    this.show(h("p", {class: "sub"}, "Loading…"));
    this.load();
  }

  /** The reply the model is writing now, below the iterations already stored. */
  showReplying(run) {
    this.replying = run ?? null;
    let live = this.root.querySelector(".live-reply");
    if (!run?.reply_so_far) {
      live?.remove();
      return;
    }
    if (!live) {
      live = h("div", {class: "text-block reply live-reply"},
        h("div", {class: "text-label"}), h("pre", {class: "reply"}));
      this.root.append(live);
    }
    live.querySelector(".text-label").textContent =
      `Iteration ${run.reply_iteration}: the model is replying…`;
    live.querySelector("pre").textContent = run.reply_so_far;
  }

  close() {
    this.runId = null;
    this.sequence += 1;
    this.root.hidden = true;
    this.root.replaceChildren();
  }

  /** Fetch again when the selected run's numbers changed in a snapshot. */
  update(runs) {
    if (this.runId === null) return;
    const run = runs.find((candidate) => candidate.run_id === this.runId);
    const signature = signatureOf(run);
    if (run && signature !== this.signature) {
      this.signature = signature;
      this.load();
    }
    this.showReplying(run);
  }

  show(...body) {
    this.root.replaceChildren(
      h("div", {class: "panel-head"},
        h("h2", {}, "Trajectory ", h("span", {class: "mono run-id"}, this.runId)),
        h("button", {type: "button", class: "close", onclick: () => this.onClose()}, "Close")),
      ...body.flat(Infinity).filter((node) => node !== null && node !== undefined));
  }

  async load() {
    if (this.loading) {
      this.again = true;
      return;
    }
    this.loading = true;
    try {
      await this.read();
    } finally {
      this.loading = false;
    }
    if (this.again && this.runId !== null) {
      this.again = false;
      this.load();
    }
  }

  async read() {
    const runId = this.runId;
    const sequence = this.sequence;
    let body;
    try {
      const response = await fetch(`/v1/runs/${encodeURIComponent(runId)}?descendants=1`,
        {headers: {Accept: "application/json"}});
      const data = await response.json().catch(() => null);
      if (!response.ok) {
        const reason = data?.error?.message ?? `HTTP ${response.status}`;
        body = [h("p", {class: "sub"}, response.status === 404
          ? "No trajectory file for this run yet." : `Could not load the trajectory: ${reason}`)];
      } else {
        body = render(data, this.tree);
      }
    } catch (error) {
      body = [h("p", {class: "error-text"}, `Could not load the trajectory: ${error}`)];
    }
    // A newer request (or a close) went out meanwhile: its answer wins.
    if (sequence !== this.sequence) return;
    this.show(...body);
    this.showReplying(this.replying);
  }
}

function signatureOf(run) {
  return run ? `${run.status}/${run.events}/${run.iterations}/${run.sub_calls}/${run.tokens}` : null;
}

function render(trajectory, tree) {
  const events = trajectory.events ?? [];
  const meta = events[0]?.kind === "run_started" ? events[0] : {};
  const last = events[events.length - 1];
  const facts = [
    ["Model", meta.model || "default"],
    ["Context", `${meta.context_type ?? "?"}, ${formatCount(meta.context_chars)} characters in ` +
      `${formatCount(meta.context_chunks)} chunk(s)`],
    ["Started", meta.started_at ? formatClock(meta.started_at) : "–"],
    ["Depth", meta.parent_run_id ? `${meta.depth}, sub-call of ${meta.parent_run_id}` : String(meta.depth ?? 0)],
  ];
  return [
    h("dl", {class: "facts"}, facts.map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)])),
    tree.render(buildTree(trajectory)),
    block("Query", meta.query, "query"),
    byIteration(events).map(iteration),
    finalPart(last?.kind === "run_finished" ? last.result : null),
  ];
}
