// Forgeline's web UI: hash routing over four pages (login, dashboard, request, submit).
// Live data: the dashboard and the request page poll the API every 2 s; run logs stream over
// server-sent events read with fetch() (so that the Authorization header can be sent).
import { api, ApiError, eventStream, onUnauthorized, session } from "./api.js";
import { h, clear, when, short, statusBadge } from "./dom.js";
import { renderDiff } from "./diff.js";

const POLL_MS = 2000;
const PAGE_SIZE = 20;
const STATUSES = ["queued", "provisioning", "running", "patch_ready", "failed", "cancelled"];
const ACTIVE = new Set(["queued", "provisioning", "running"]);
const TERMINAL_RUN = new Set(["succeeded", "failed", "cancelled"]);

const view = document.getElementById("view");
let teardown = []; // what the current page stops when the route changes
let loginNotice = "";

onUnauthorized((error) => {
  session.clear();
  loginNotice = `Signed out: ${error.message}`;
  location.hash = "#/login";
});

document.getElementById("logout").addEventListener("click", () => {
  session.clear();
  loginNotice = "Signed out.";
  location.hash = "#/login";
});

// A loop that runs fn now and every POLL_MS after it finished, until the page changes.
function poll(fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    if (stopped) return;
    try { await fn(); } catch (e) { if (e.name !== "AbortError") console.warn("poll:", e.message); }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  };
  teardown.push(() => { stopped = true; clearTimeout(timer); });
  tick();
}

function errorText(e) {
  return e instanceof ApiError ? e.message : `Unexpected error: ${e.message}`;
}

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, query = ""] = raw.split("?");
  return { path, params: new URLSearchParams(query) };
}

function route() {
  for (const stop of teardown.splice(0)) stop();
  const { path, params } = parseHash();
  const signedIn = Boolean(session.key);
  document.getElementById("nav").hidden = !signedIn;
  const who = session.who;
  document.getElementById("whoami").textContent = who ? `${who.name || who.id} · ${who.role}` : "";
  if (!signedIn && path !== "/login") { location.hash = "#/login"; return; }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.remove("active");
  let m;
  if (path === "/login") loginPage();
  else if (path === "/" || path === "") { markNav("dashboard"); dashboardPage(params); }
  else if (path === "/submit") { markNav("submit"); submitPage(); }
  else if ((m = /^\/requests\/([^/]+)$/.exec(path))) requestPage(decodeURIComponent(m[1]));
  else clear(view, h("section", { class: "card" }, h("h1", {}, "Not found"),
    h("p", {}, h("a", { href: "#/" }, "Back to the dashboard"))));
  window.scrollTo(0, 0);
}

function markNav(name) {
  document.querySelector(`[data-nav="${name}"]`)?.classList.add("active");
}

// ---- login -------------------------------------------------------------------------------

function loginPage() {
  document.title = "Log in · Forgeline";
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off",
    spellcheck: "false", placeholder: "fl_…", required: true });
  const error = h("p", { class: "error", id: "login-error", role: "alert" }, loginNotice);
  loginNotice = "";
  const button = h("button", { type: "submit", class: "primary" }, "Log in");
  const form = h("form", { class: "card narrow", id: "login-form", novalidate: true },
    h("h1", {}, "Log in"),
    h("p", { class: "muted" }, "Use the API key that `forgeline up` printed, or one made with ",
      h("code", {}, "forgeline keys create"), ". It is kept in this tab only."),
    h("label", { for: "api-key" }, "API key"), input, error, button);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    error.textContent = "";
    if (!key) { error.textContent = "Enter an API key."; input.focus(); return; }
    button.disabled = true;
    try {
      const who = await api("/v1/whoami", { key });
      session.set(key, who);
      location.hash = "#/";
    } catch (e) {
      error.textContent = e.status === 401
        ? `This key was refused: ${e.message}.`
        : errorText(e);
      input.select();
    } finally {
      button.disabled = false;
    }
  });
  clear(view, form);
  input.focus();
}

// ---- dashboard ---------------------------------------------------------------------------

function dashboardPage(params) {
  document.title = "Dashboard · Forgeline";
  const status = STATUSES.includes(params.get("status")) ? params.get("status") : "";
  const cursors = [null]; // cursors[i] = the cursor of page i; null = newest
  let page = 0;

  const select = h("select", { id: "status-filter", "aria-label": "Filter by status" },
    h("option", { value: "" }, "All statuses"),
    STATUSES.map((s) => h("option", { value: s, selected: s === status }, s.replace("_", " "))));
  select.addEventListener("change", () => {
    location.hash = select.value ? `#/?status=${select.value}` : "#/";
  });
  const depth = h("strong", { id: "queue-depth" }, "…");
  const live = h("span", { class: "live", id: "live" }, "Live · every 2 s");
  const rows = h("tbody", { id: "request-rows" });
  const empty = h("p", { class: "muted", hidden: true }, "No requests here yet. ",
    h("a", { href: "#/submit" }, "Submit one."));
  const problem = h("p", { class: "error", role: "alert" });
  const newer = h("button", { type: "button", id: "page-newer", disabled: true }, "← Newer");
  const older = h("button", { type: "button", id: "page-older", disabled: true }, "Older →");
  const pageLabel = h("span", { class: "muted" }, "Page 1");

  newer.addEventListener("click", () => { if (page > 0) { page -= 1; refresh(); } });
  older.addEventListener("click", () => { if (cursors[page + 1]) { page += 1; refresh(); } });

  clear(view,
    h("section", { class: "toolbar" },
      h("h1", {}, "Requests"),
      h("div", { class: "stat" }, "Queue depth ", depth, h("span", { class: "muted" }, " queued")),
      h("label", { class: "filter" }, "Status ", select),
      live,
      h("a", { class: "button primary", href: "#/submit" }, "New request")),
    problem,
    h("div", { class: "table-wrap" },
      h("table", { class: "requests" },
        h("thead", {}, h("tr", {},
          ["Request", "Status", "Repository", "Prompt", "Prio", "Created", "Updated"].map((t) => h("th", {}, t)))),
        rows)),
    empty,
    h("nav", { class: "pager" }, newer, pageLabel, older));

  let inFlight = null;
  async function refresh() {
    inFlight?.abort();
    const ctl = new AbortController();
    inFlight = ctl;
    const q = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (status) q.set("status", status);
    if (cursors[page]) q.set("cursor", cursors[page]);
    const [list, queued] = await Promise.all([
      api(`/v1/requests?${q}`, { signal: ctl.signal }),
      api("/v1/requests?status=queued&limit=200", { signal: ctl.signal }),
    ]).catch((e) => {
      if (e.name !== "AbortError") { problem.textContent = errorText(e); live.classList.add("stale"); }
      throw e;
    });
    problem.textContent = "";
    live.classList.remove("stale");
    live.title = `Updated ${new Date().toLocaleTimeString()}`;
    depth.textContent = `${queued.items.length}${queued.next_cursor ? "+" : ""}`;
    cursors[page + 1] = list.next_cursor;
    cursors.length = page + 2;
    newer.disabled = page === 0;
    older.disabled = !list.next_cursor;
    pageLabel.textContent = `Page ${page + 1}`;
    empty.hidden = list.items.length > 0;
    clear(rows, list.items.map(requestRow));
  }
  poll(refresh);
  teardown.push(() => inFlight?.abort());
}

function requestRow(r) {
  const link = `#/requests/${encodeURIComponent(r.id)}`;
  const firstLine = String(r.prompt || "").split("\n").find((l) => l.trim()) || "";
  const cell = (label, attrs, ...children) =>
    h("td", { "data-label": label, ...attrs }, h("span", { class: "v" }, ...children));
  return h("tr", { dataset: { id: r.id, status: r.status } },
    cell("Request", {}, h("a", { href: link, class: "mono" }, short(r.id))),
    cell("Status", {}, statusBadge(r.status)),
    cell("Repository", { class: "mono clip", title: r.repo },
      tail(r.repo, 30), r.ref ? h("span", { class: "muted" }, ` @ ${r.ref}`) : null),
    cell("Prompt", { class: "clip", title: r.prompt }, firstLine),
    cell("Priority", {}, r.priority),
    cell("Created", { class: "nowrap" }, when(r.created_at)),
    cell("Updated", { class: "nowrap" }, when(r.updated_at)));
}

// The end of a long path or URL is the telling part: "…/repos/app".
function tail(text, max) {
  const s = String(text || "");
  return s.length > max ? `…${s.slice(s.length - max + 1)}` : s;
}

// ---- submit ------------------------------------------------------------------------------

const FIELDS = [
  { name: "repo", label: "Repository", hint: "a git URL, a file:// URL or an absolute path", kind: "input",
    attrs: { placeholder: "https://github.com/org/repo.git or /srv/repos/app" } },
  { name: "ref", label: "Ref", hint: "branch, tag or commit (default: the repository's HEAD)", kind: "input",
    attrs: { placeholder: "main" } },
  { name: "agent", label: "Agent", hint: "shell: the prompt is a bash script run in the repository", kind: "input",
    attrs: { value: "shell" } },
  { name: "prompt", label: "Prompt", hint: "what the agent should do", kind: "textarea",
    attrs: { rows: 6 } },
  { name: "priority", label: "Priority", hint: "1 is the highest", kind: "select" },
  { name: "timeout_s", label: "Timeout (seconds)", hint: "default 3600", kind: "input",
    attrs: { type: "number", min: 1, inputmode: "numeric", placeholder: "3600" } },
  { name: "labels", label: "Labels", hint: "key=value, one per line (e.g. project=web)", kind: "textarea",
    attrs: { rows: 3, placeholder: "project=web" } },
];

function submitPage() {
  document.title = "Submit · Forgeline";
  const controls = {};
  const errors = {};
  const formError = h("div", { class: "error", id: "form-error", role: "alert" });
  const button = h("button", { type: "submit", class: "primary", id: "submit-button" }, "Submit request");
  const form = h("form", { class: "card form", id: "submit-form", novalidate: true },
    h("h1", {}, "New request"),
    formError,
    FIELDS.map((f) => {
      const id = `f-${f.name}`;
      let control;
      if (f.kind === "select") {
        control = h("select", { id, name: f.name },
          [1, 2, 3, 4, 5].map((p) => h("option", { value: p, selected: p === 3 }, String(p))));
      } else {
        control = h(f.kind, { id, name: f.name, spellcheck: "false", "aria-describedby": `${id}-error`, ...f.attrs });
      }
      controls[f.name] = control;
      errors[f.name] = h("div", { class: "field-error", id: `${id}-error`, dataset: { field: f.name } });
      return h("div", { class: `field field-${f.name}` },
        h("label", { for: id }, f.label), control,
        h("small", { class: "muted" }, f.hint), errors[f.name]);
    }),
    h("div", { class: "actions" }, button));

  function showErrors(map, general) {
    for (const [name, node] of Object.entries(errors)) {
      const list = map[name] || [];
      node.textContent = list.join("; ");
      controls[name].classList.toggle("invalid", list.length > 0);
      controls[name].setAttribute("aria-invalid", list.length ? "true" : "false");
    }
    clear(formError, general.length ? h("ul", {}, general.map((g) => h("li", {}, g))) : null);
    const first = FIELDS.find((f) => (map[f.name] || []).length);
    if (first) controls[first.name].focus();
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const fieldErrors = {};
    const body = { repo: controls.repo.value.trim(), prompt: controls.prompt.value };
    const ref = controls.ref.value.trim();
    if (ref) body.ref = ref;
    const agent = controls.agent.value.trim();
    if (agent) body.agent = agent;
    body.priority = Number(controls.priority.value);
    const timeout = controls.timeout_s.value.trim();
    if (timeout) body.timeout_s = Number(timeout);
    if (timeout && !Number.isFinite(body.timeout_s)) fieldErrors.timeout_s = ["must be a number of seconds"];
    const labels = {};
    controls.labels.value.split("\n").map((l) => l.trim()).filter(Boolean).forEach((line) => {
      const eq = line.indexOf("=");
      if (eq <= 0) (fieldErrors.labels ||= []).push(`"${line}" is not key=value`);
      else labels[line.slice(0, eq).trim()] = line.slice(eq + 1).trim();
    });
    if (Object.keys(labels).length) body.labels = labels;
    if (Object.keys(fieldErrors).length) { showErrors(fieldErrors, []); return; }

    button.disabled = true;
    button.textContent = "Submitting…";
    try {
      const accepted = await api("/v1/requests", { method: "POST", body });
      location.hash = `#/requests/${encodeURIComponent(accepted.request_id)}`;
    } catch (e) {
      const map = {};
      const general = [];
      if (e instanceof ApiError && e.status === 422) {
        for (const d of e.details) {
          const top = String(d.field || "").split(".")[0];
          const msg = String(d.message || "invalid").replace(/^Value error, /, "");
          if (top in controls) {
            const sub = String(d.field).split(".").slice(1).join(".");
            (map[top] ||= []).push(sub ? `${sub}: ${msg}` : msg);
          } else {
            general.push(d.field ? `${d.field}: ${msg}` : msg);
          }
        }
        general.unshift(e.message);
      } else {
        general.push(errorText(e));
      }
      showErrors(map, general);
    } finally {
      button.disabled = false;
      button.textContent = "Submit request";
    }
  });
  clear(view, form);
  controls.repo.focus();
}

// ---- request -----------------------------------------------------------------------------

function requestPage(requestId) {
  document.title = `Request ${short(requestId)} · Forgeline`;
  const state = { request: null, selectedRun: null, followLatest: true, logsFor: null, diffFor: null, patch: "" };

  const title = h("h1", {}, "Request ", h("span", { class: "mono" }, short(requestId)));
  const badge = h("span", { id: "request-status" });
  const summary = h("dl", { class: "summary" });
  const prompt = h("pre", { class: "prompt", id: "request-prompt" });
  const notice = h("p", { class: "muted", id: "request-notice" }, "Loading…");
  const actionMsg = h("p", { class: "message", id: "action-message", role: "status" });
  const cancelBtn = h("button", { type: "button", id: "cancel-button", class: "danger", disabled: true }, "Cancel run");
  const followUp = h("textarea", { id: "followup-prompt", rows: 2, placeholder: "Follow-up prompt (optional): what to do on top of the latest patch" });
  const rerunBtn = h("button", { type: "button", id: "rerun-button", class: "primary", disabled: true }, "Rerun");
  const runsList = h("ol", { class: "runs", id: "runs" });
  const timeline = h("ol", { class: "timeline", id: "timeline" });
  const logStatus = h("span", { class: "muted", id: "log-status" });
  const logs = h("pre", { class: "logs", id: "logs", tabindex: 0 });
  const diffStatus = h("span", { class: "muted", id: "diff-status" });
  const diffBox = h("div", { id: "diff" });
  const copyBtn = h("button", { type: "button", id: "copy-patch", disabled: true }, "Copy patch");
  const collapseBtn = h("button", { type: "button", id: "collapse-all", disabled: true }, "Collapse all");
  const expandBtn = h("button", { type: "button", id: "expand-all", disabled: true }, "Expand all");
  const runLabel = h("span", { class: "mono", id: "selected-run" });

  clear(view,
    h("p", { class: "crumbs" }, h("a", { href: "#/" }, "← Requests")),
    h("section", { class: "card head" },
      h("div", { class: "title-row" }, title, badge),
      notice, summary, prompt,
      h("div", { class: "actions wrap" },
        h("div", { class: "rerun" }, h("label", { for: "followup-prompt" }, "Rerun on top of the latest patch"),
          followUp, h("div", { class: "row" }, rerunBtn, cancelBtn))),
      actionMsg),
    h("div", { class: "grid" },
      h("div", { class: "col" },
        h("section", { class: "card" }, h("h2", {}, "Runs"), runsList),
        h("section", { class: "card" }, h("h2", {}, "Timeline ", h("small", { class: "muted" }, "events from the store")), timeline)),
      h("div", { class: "col wide" },
        h("section", { class: "card" },
          h("div", { class: "title-row" }, h("h2", {}, "Logs ", runLabel), logStatus), logs),
        h("section", { class: "card" },
          h("div", { class: "title-row" }, h("h2", {}, "Patch"), diffStatus,
            h("div", { class: "row" }, collapseBtn, expandBtn, copyBtn)),
          diffBox))));

  // -- actions
  cancelBtn.addEventListener("click", async () => {
    cancelBtn.disabled = true;
    actionMsg.classList.remove("error");
    actionMsg.textContent = "Cancelling…";
    try {
      await api(`/v1/requests/${encodeURIComponent(requestId)}/cancel`, { method: "POST" });
      state.cancelling = true;
      actionMsg.textContent = "Cancel requested: the agent is being stopped…";
    } catch (e) {
      actionMsg.textContent = errorText(e);
      actionMsg.classList.add("error");
    }
  });
  rerunBtn.addEventListener("click", async () => {
    rerunBtn.disabled = true;
    actionMsg.classList.remove("error");
    actionMsg.textContent = "Starting a new run…";
    const body = followUp.value.trim() ? { prompt: followUp.value } : {};
    try {
      const accepted = await api(`/v1/requests/${encodeURIComponent(requestId)}/rerun`, { method: "POST", body });
      followUp.value = "";
      actionMsg.textContent = `Run ${short(accepted.run_id)} queued.`;
      state.followLatest = true;
      state.pendingRun = accepted.run_id;
      selectRun(accepted.run_id);
    } catch (e) {
      actionMsg.textContent = errorText(e);
      actionMsg.classList.add("error");
      rerunBtn.disabled = false;
    }
  });
  copyBtn.addEventListener("click", async () => {
    const ok = await copyText(state.patch);
    copyBtn.textContent = ok ? "Copied ✓" : "Copy failed";
    setTimeout(() => { copyBtn.textContent = "Copy patch"; }, 2000);
  });
  collapseBtn.addEventListener("click", () => diffBox.querySelectorAll("details").forEach((d) => { d.open = false; }));
  expandBtn.addEventListener("click", () => diffBox.querySelectorAll("details").forEach((d) => { d.open = true; }));

  // -- polling the request and its events
  poll(async () => {
    let req;
    try {
      req = await api(`/v1/requests/${encodeURIComponent(requestId)}`);
    } catch (e) {
      if (e.status === 404 && !state.request) {
        notice.textContent = "Waiting for the request to appear (it was just accepted, or does not exist)…";
        return;
      }
      notice.textContent = errorText(e);
      return;
    }
    state.request = req;
    notice.textContent = "";
    renderRequest(req);
    const history = await api(`/v1/requests/${encodeURIComponent(requestId)}/events`);
    renderTimeline(history.events);
  });

  function renderRequest(req) {
    clear(badge, statusBadge(req.status));
    const labels = Object.entries(req.labels || {}).map(([k, v]) => h("span", { class: "chip" }, `${k}=${v}`));
    clear(summary,
      h("dt", {}, "Repository"), h("dd", { class: "mono" }, req.repo),
      h("dt", {}, "Ref"), h("dd", { class: "mono" }, req.ref || "HEAD"),
      h("dt", {}, "Agent"), h("dd", {}, req.agent),
      h("dt", {}, "Priority"), h("dd", {}, req.priority),
      h("dt", {}, "Labels"), h("dd", {}, labels.length ? labels : "—"),
      h("dt", {}, "Created"), h("dd", {}, when(req.created_at)),
      h("dt", {}, "Updated"), h("dd", {}, when(req.updated_at)));
    prompt.textContent = req.prompt;
    const active = ACTIVE.has(req.status);
    if (state.cancelling && !active) {
      state.cancelling = false;
      actionMsg.textContent = `The run was ${req.status === "cancelled" ? "cancelled" : `already ${req.status.replace("_", " ")}`}.`;
    }
    cancelBtn.disabled = !active;
    rerunBtn.disabled = active || Boolean(state.pendingRun && !req.runs.some((r) => r.id === state.pendingRun));
    if (state.pendingRun && req.runs.some((r) => r.id === state.pendingRun)) state.pendingRun = null;
    if (state.followLatest && req.latest_run_id && !state.pendingRun) selectRun(req.latest_run_id);
    clear(runsList, req.runs.map((run) => h("li", {
      class: run.id === state.selectedRun ? "selected" : "", dataset: { run: run.id, status: run.status } },
    h("button", { type: "button", class: "run-pick", onclick: () => {
      state.followLatest = run.id === req.latest_run_id;
      selectRun(run.id);
      renderRequest(state.request);
    } },
    h("strong", {}, `#${run.number}`), " ", statusBadge(run.status),
    h("span", { class: "muted" }, ` ${short(run.id)}`)),
    h("div", { class: "run-meta muted" },
      `queued ${when(run.queued_at)}`,
      run.finished_at ? ` · finished ${when(run.finished_at)}` : "",
      run.exit_code !== null && run.exit_code !== undefined ? ` · exit ${run.exit_code}` : "",
      run.patch ? ` · ${run.patch.files_changed} file(s) +${run.patch.insertions} −${run.patch.deletions}` : "",
      run.usage ? ` · ${usageText(run.usage)}` : ""),
    run.error ? h("div", { class: "error" }, `${run.error.code}: ${run.error.message}`) : null)));
    const selected = req.runs.find((r) => r.id === state.selectedRun);
    if (selected) loadDiff(selected);
  }

  function renderTimeline(events) {
    clear(timeline, events.map((ev) => {
      const runIdx = state.request?.runs.find((r) => r.id === ev.aggregate_id);
      const who = runIdx ? `run #${runIdx.number}` : ev.aggregate_id === requestId ? "request" : short(ev.aggregate_id);
      return h("li", { class: `ev ev-${ev.type}`, dataset: { type: ev.type } },
        h("span", { class: "ev-time" }, when(ev.timestamp)),
        h("span", { class: "ev-type" }, ev.type),
        h("span", { class: "muted" }, ` ${who}`),
        eventDetail(ev));
    }));
  }

  // -- the selected run: logs (SSE) and patch
  function selectRun(runId) {
    if (state.selectedRun === runId) return;
    state.selectedRun = runId;
    runLabel.textContent = short(runId);
    startLogs(runId);
    state.diffFor = null;
    state.patch = "";
    clear(diffBox);
    diffStatus.textContent = "No patch yet.";
    copyBtn.disabled = collapseBtn.disabled = expandBtn.disabled = true;
  }

  let logCtl = null;
  teardown.push(() => logCtl?.abort());

  function startLogs(runId) {
    logCtl?.abort();
    const ctl = new AbortController();
    logCtl = ctl;
    clear(logs);
    let lastSeq = 0;
    logStatus.textContent = "connecting…";
    (async () => {
      for (let attempt = 0; !ctl.signal.aborted; attempt += 1) {
        try {
          logStatus.textContent = "live";
          logStatus.className = "live";
          for await (const { event, data } of eventStream(`/v1/runs/${encodeURIComponent(runId)}/logs`, { signal: ctl.signal })) {
            if (event === "log") {
              if (data.seq <= lastSeq) continue; // a reconnect replays from the first line
              lastSeq = data.seq;
              appendLog(data);
            } else if (event === "end") {
              logStatus.className = "muted";
              logStatus.textContent = `ended: ${data.status}`;
              return;
            }
          }
        } catch (e) {
          if (e.name === "AbortError" || ctl.signal.aborted) return;
          logStatus.className = "muted";
          logStatus.textContent = e.status === 404 ? "waiting for the run…" : `reconnecting (${errorText(e)})`;
        }
        await new Promise((r) => setTimeout(r, Math.min(500 * (attempt + 1), 3000)));
      }
    })();
  }

  function appendLog(line) {
    const atBottom = logs.scrollHeight - logs.scrollTop - logs.clientHeight < 40;
    logs.append(h("span", { class: `log log-${line.stream}`, dataset: { seq: line.seq } },
      h("span", { class: "log-seq" }, String(line.seq).padStart(4, " ")), " ", line.line, "\n"));
    if (atBottom) logs.scrollTop = logs.scrollHeight;
  }

  async function loadDiff(run) {
    if (state.diffFor === run.id) return;
    if (!run.patch) {
      diffStatus.textContent = TERMINAL_RUN.has(run.status) ? "This run produced no patch." : "No patch yet (the run is not finished).";
      return;
    }
    state.diffFor = run.id;
    diffStatus.textContent = "Loading…";
    try {
      const text = await api(`/v1/runs/${encodeURIComponent(run.id)}/patch`, { text: true });
      if (state.selectedRun !== run.id) return;
      state.patch = text;
      clear(diffBox, renderDiff(text));
      diffStatus.textContent = `${run.patch.files_changed} file(s), +${run.patch.insertions} −${run.patch.deletions}, cumulative`;
      copyBtn.disabled = collapseBtn.disabled = expandBtn.disabled = false;
    } catch (e) {
      state.diffFor = null;
      diffStatus.textContent = errorText(e);
    }
  }
}

function eventDetail(ev) {
  const d = ev.data || {};
  const bits = [];
  if (d.prompt && ev.type === "RerunRequested") bits.push(`follow-up: ${firstLine(d.prompt)}`);
  if (d.exit_code !== undefined && d.exit_code !== null) bits.push(`exit ${d.exit_code}`);
  if (d.error && typeof d.error === "object") bits.push(`${d.error.code || ""} ${d.error.message || ""}`.trim());
  else if (typeof d.reason === "string") bits.push(d.reason);
  if (d.files_changed !== undefined) bits.push(`${d.files_changed} file(s)`);
  for (const by of ["submitted_by", "cancelled_by", "requested_by"]) if (d[by]) bits.push(`by ${d[by]}`);
  return bits.length ? h("div", { class: "ev-detail muted" }, bits.join(" · ")) : null;
}

function usageText(u) {
  const bits = [];
  if (u.input_tokens != null) bits.push(`${u.input_tokens} in`);
  if (u.output_tokens != null) bits.push(`${u.output_tokens} out tokens`);
  if (u.cost_usd != null) bits.push(`$${Number(u.cost_usd).toFixed(4)}`);
  return bits.join(", ");
}

function firstLine(text) { return String(text).split("\n").find((l) => l.trim()) || ""; }

async function copyText(text) {
  if (!text) return false;
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    // Not a secure context (plain http on another host): the old way.
    const area = h("textarea", { class: "offscreen", readonly: true });
    area.value = text;
    document.body.append(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch { ok = false; }
    area.remove();
    return ok;
  }
}

window.addEventListener("hashchange", route);
route();
