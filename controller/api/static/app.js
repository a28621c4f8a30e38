// The dashboard: one EventSource on /v1/events; every `snapshot` event redraws the page.
// No polling: the server pushes on change and every few seconds. A silent stream is
// treated as a dropped one, and a stream the browser gave up on is opened again.

import {TrajectoryView} from "./trajectory.js";
import {
  mergeRuns, renderDevices, renderEndpoints, renderJobs, renderRuns, renderSummary,
} from "./views.js";

const banner = document.getElementById("banner");
const connection = document.getElementById("connection");
const connectionText = document.getElementById("connection-text");
const main = document.getElementById("main");

let source = null;
let watchdog = 0;
let reopenDelayMs = 1000;
let lastSnapshot = null;
let runs = [];
const trajectory = new TrajectoryView(document.getElementById("trajectory"), () => select(null));

function setConnection(state) {
  connection.dataset.state = state;
  connectionText.textContent = {
    live: "Live", connecting: "Connecting…", reconnecting: "Reconnecting…",
  }[state];
  banner.hidden = state !== "reconnecting";
  main.classList.toggle("stale", state === "reconnecting");
}

function select(runId) {
  if (runId === null || runId === trajectory.runId) {
    trajectory.close();
  } else {
    trajectory.open(runId, runs.find((run) => run.run_id === runId));
  }
  renderRuns(runs, trajectory.runId, select);
}

function render(snapshot) {
  lastSnapshot = snapshot;
  runs = mergeRuns(snapshot);
  renderSummary(snapshot, runs);
  renderDevices(snapshot);
  renderJobs(snapshot);
  renderEndpoints(snapshot);
  renderRuns(runs, trajectory.runId, select);
  trajectory.update(runs);
}

/** Reconnect when nothing arrived for a few snapshot intervals (a half-open connection). */
function armWatchdog() {
  clearTimeout(watchdog);
  const intervalS = lastSnapshot?.snapshot_interval_s ?? 5;
  watchdog = setTimeout(() => {
    setConnection("reconnecting");
    source.close();
    connect();
  }, (3 * intervalS + 2) * 1000);
}

function connect() {
  source = new EventSource("/v1/events");
  source.addEventListener("open", () => {
    reopenDelayMs = 1000;
    armWatchdog();
  });
  source.addEventListener("snapshot", (event) => {
    armWatchdog();
    let snapshot;
    try {
      snapshot = JSON.parse(event.data);
    } catch {
      return;
    }
    render(snapshot);
    setConnection("live");
  });
  source.addEventListener("error", () => {
    setConnection("reconnecting");
    // The browser retries by itself unless it gave up (for example on an HTTP error status).
    if (source.readyState === EventSource.CLOSED) {
      clearTimeout(watchdog);
      setTimeout(connect, reopenDelayMs);
      reopenDelayMs = Math.min(reopenDelayMs * 2, 15000);
    }
  });
}

setConnection("connecting");
connect();
