// The comparison page: live progress over Server-Sent Events, then the side-by-side table's
// controls (search, disagreement filter, sorting, baseline deltas, word diff) and cell ratings.
import { api, describeError, fmt, raterName } from "./common.js";
import { diffWords, renderDiff } from "./diff.js";

// ------------------------------------------------------------------------------ live progress
const progress = document.getElementById("progress");

function setBadge(el, status) {
  el.textContent = status.replaceAll("_", " ");
  el.className = `badge status-${status}`;
}

function eta(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  return `${Math.floor(seconds / 60)} min ${String(Math.floor(seconds % 60)).padStart(2, "0")} s`;
}

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

function showProgress(state) {
  setBadge(document.getElementById("status-badge"), state.status);
  const finishedNow = [];
  for (const cand of state.candidates) {
    const card = progress.querySelector(`.cand[data-label="${CSS.escape(cand.label)}"]`);
    if (!card) continue;
    const p = cand.progress;
    const pct = p.total ? (100 * p.done) / p.total : 0;
    if (!FINAL.has(card.dataset.status) && FINAL.has(cand.status)) finishedNow.push(cand);
    card.dataset.status = cand.status;
    setBadge(card.querySelector('[data-role="status"]'), cand.status);
    const bar = card.querySelector('[data-role="bar"]');
    bar.style.width = `${pct.toFixed(1)}%`;
    bar.className = `bar-fill status-${cand.status}`;
    const track = card.querySelector('[data-role="track"]');
    track.setAttribute("aria-valuenow", String(p.done));
    track.setAttribute("aria-valuemax", String(p.total));
    card.querySelector('[data-role="rows"]').textContent = `${p.done} / ${p.total} rows`;
    card.querySelector('[data-role="tps"]').textContent = p.tokens_per_second
      ? ` · ${fmt(p.tokens_per_second)} tokens/s`
      : "";
    card.querySelector('[data-role="eta"]').textContent =
      cand.status === "running" && p.eta_s !== null ? ` · about ${eta(p.eta_s)} left` : "";
    card.querySelector('[data-role="cache"]').textContent = p.cache_hits ? ` · ${p.cache_hits} from cache` : "";
    const error = card.querySelector('[data-role="error"]');
    error.textContent = cand.error || "";
    error.hidden = !cand.error;
  }
  if (finishedNow.length && !FINAL.has(state.status) && state.status !== "partially_failed") {
    const banner = document.getElementById("partial-banner");
    const names = finishedNow.map((c) => `${c.label} ${c.status}`).join(", ");
    banner.replaceChildren(`${names}. `);
    const reload = document.createElement("button");
    reload.type = "button";
    reload.className = "button subtle";
    reload.textContent = "Show outputs so far";
    reload.addEventListener("click", () => location.reload());
    banner.append(reload);
    banner.hidden = false;
  }
}

function followLive() {
  const id = progress.dataset.comparison;
  const note = document.getElementById("live-note");
  let polling = null;
  const finish = () => {
    note.textContent = "Finished; loading the results…";
    location.reload();
  };
  const poll = async () => {
    try {
      const state = await api("GET", `/v1/comparisons/${id}`);
      showProgress(state);
      if (["succeeded", "partially_failed", "failed", "cancelled"].includes(state.status)) {
        clearInterval(polling);
        finish();
      }
    } catch {
      note.textContent = "Lost contact with the server; retrying…";
    }
  };
  const source = new EventSource(`/v1/comparisons/${id}/events`);
  let failures = 0;
  source.addEventListener("comparison", (event) => {
    failures = 0;
    note.textContent = "Updating live…";
    showProgress(JSON.parse(event.data));
  });
  source.addEventListener("end", (event) => {
    source.close();
    showProgress(JSON.parse(event.data));
    finish();
  });
  source.onerror = () => {
    failures += 1;
    // The browser reconnects by itself; after a few failed tries, poll instead.
    if (failures >= 3 && polling === null) {
      source.close();
      polling = setInterval(poll, 2000);
    }
  };
}

if (progress && progress.dataset.active === "true") followLive();

document.getElementById("cancel-form")?.addEventListener("submit", (event) => {
  if (!confirm("Cancel this comparison? Candidates that are running stop within a few seconds.")) {
    event.preventDefault();
  }
});

// ------------------------------------------------------------------------------ side by side
const gridTable = document.getElementById("grid");
const gridData = gridTable ? JSON.parse(document.getElementById("grid-data").textContent) : null;

function readRows() {
  const hasReference = gridTable.querySelector("thead .col-ref") !== null;
  return [...gridTable.tBodies[0].rows].map((tr) => {
    const cells = {};
    for (const td of tr.querySelectorAll("td.cell")) {
      const outputEl = td.querySelector('[data-role="output"]');
      const scores = {};
      for (const li of td.querySelectorAll(".scores li[data-value]")) scores[li.dataset.metric] = Number(li.dataset.value);
      cells[td.dataset.label] = { td, outputEl, output: outputEl ? outputEl.textContent : null, scores };
    }
    return {
      tr,
      index: Number(tr.dataset.row),
      input: tr.querySelector(".col-input .text").textContent,
      reference: hasReference ? tr.querySelector(".col-ref .text").textContent : null,
      cells,
    };
  });
}

const norm = (text) => (text || "").replace(/\s+/g, " ").trim();

function betterSign(metric) {
  const info = gridData.metrics[metric];
  return info && info.greater_is_better === false ? -1 : 1;
}

function controlState() {
  const value = (id) => document.getElementById(id).value;
  return {
    search: value("g-search").trim().toLowerCase(),
    metric: value("g-metric"),
    show: value("g-show"),
    sort: value("g-sort"),
    sortA: value("g-sort-a"),
    sortB: value("g-sort-b"),
    scores: value("g-scores"),
    baseline: value("g-baseline"),
    diff: value("g-diff"),
  };
}

function rowVisible(row, s) {
  const outputs = Object.values(row.cells).filter((c) => c.output !== null);
  if (s.search) {
    const haystack = [row.input, row.reference || "", ...outputs.map((c) => c.output)].join("\n").toLowerCase();
    if (!haystack.includes(s.search)) return false;
  }
  if (s.show === "disagree-output") {
    return new Set(outputs.map((c) => norm(c.output))).size > 1;
  }
  if (s.show === "disagree-metric") {
    const values = outputs.map((c) => c.scores[s.metric]).filter((v) => v !== undefined);
    return new Set(values).size > 1;
  }
  return true;
}

function sortKey(row, s) {
  const sign = betterSign(s.metric);
  const a = row.cells[s.sortA]?.scores[s.metric];
  if (s.sort === "value") return a === undefined ? -Infinity : sign * a;
  if (s.sort === "diff") {
    const b = row.cells[s.sortB]?.scores[s.metric];
    return a === undefined || b === undefined ? -Infinity : sign * (a - b);
  }
  return -row.index;
}

const diffCache = new Map();

function showOutput(row, label, cell, s) {
  if (!cell.outputEl) return;
  let against = null;
  if (s.diff === "reference") against = row.reference;
  else if (s.diff === "baseline" && s.baseline && s.baseline !== label) against = row.cells[s.baseline]?.output ?? null;
  if (against === null) {
    if (cell.outputEl.dataset.diffed) {
      cell.outputEl.textContent = cell.output;
      delete cell.outputEl.dataset.diffed;
    }
    return;
  }
  const key = `${s.diff}|${s.baseline}|${row.index}|${label}`;
  if (!diffCache.has(key)) diffCache.set(key, diffWords(against, cell.output));
  renderDiff(cell.outputEl, diffCache.get(key));
  cell.outputEl.dataset.diffed = "true";
}

function decorate(row, s) {
  const labels = Object.keys(row.cells);
  const sign = betterSign(s.metric);
  const values = labels.map((l) => row.cells[l].scores[s.metric]).filter((v) => v !== undefined);
  const best = values.length > 1 && new Set(values).size > 1 ? Math.max(...values.map((v) => sign * v)) : null;
  for (const label of labels) {
    const cell = row.cells[label];
    const value = cell.scores[s.metric];
    const isBest = best !== null && value !== undefined && sign * value === best;
    cell.td.classList.toggle("best", isBest);
    if (isBest) cell.td.dataset.bestMetric = s.metric;
    else delete cell.td.dataset.bestMetric;
    cell.td.classList.toggle("baseline", Boolean(s.baseline) && label === s.baseline);
    const base = s.baseline && label !== s.baseline ? row.cells[s.baseline] : null;
    for (const li of cell.td.querySelectorAll(".scores li")) {
      const metric = li.dataset.metric;
      li.classList.toggle("selected", metric === s.metric);
      const delta = li.querySelector(".delta");
      const own = cell.scores[metric];
      const other = base ? base.scores[metric] : undefined;
      if (!base || own === undefined || other === undefined) {
        delta.hidden = true;
        continue;
      }
      const d = own - other;
      // Only differences are marked: a "±0" on every equal score would drown the ones that matter.
      delta.hidden = d === 0;
      if (d === 0) continue;
      const good = betterSign(metric) * d;
      delta.textContent = `${d > 0 ? "+" : "−"}${fmt(Math.abs(d))}`;
      delta.className = `delta num ${good > 0 ? "up" : "down"}`;
      delta.title = `${good > 0 ? "better" : "worse"} than ${s.baseline} by ${fmt(Math.abs(d))}`;
    }
    showOutput(row, label, cell, s);
  }
}

const CONTROL_IDS = ["g-search", "g-metric", "g-show", "g-sort", "g-sort-a", "g-sort-b", "g-scores", "g-baseline", "g-diff"];

function saveToHash(s) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(s)) if (value && !(key === "sort" && value === "row") && !(key === "show" && value === "all")) params.set(key, value);
  history.replaceState(null, "", `${location.pathname}${location.search}${params.size ? `#${params}` : ""}`);
}

function loadFromHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  const ids = {
    search: "g-search",
    metric: "g-metric",
    show: "g-show",
    sort: "g-sort",
    sortA: "g-sort-a",
    sortB: "g-sort-b",
    scores: "g-scores",
    baseline: "g-baseline",
    diff: "g-diff",
  };
  for (const [key, id] of Object.entries(ids)) {
    const value = params.get(key);
    const el = document.getElementById(id);
    if (value === null || !el) continue;
    if (el.tagName === "SELECT" && ![...el.options].some((o) => o.value === value)) continue;
    el.value = value;
  }
}

function setupGrid() {
  const rows = readRows();
  const count = document.getElementById("grid-count");
  const apply = () => {
    const s = controlState();
    document.getElementById("g-sort-a-field").hidden = s.sort === "row";
    document.getElementById("g-sort-b-field").hidden = s.sort !== "diff";
    gridTable.classList.toggle("scores-selected", s.scores === "selected");
    const shown = [];
    for (const row of rows) {
      const visible = rowVisible(row, s);
      row.tr.hidden = !visible;
      if (visible) shown.push(row);
      decorate(row, s);
    }
    const ordered = [...rows].sort((x, y) => sortKey(y, s) - sortKey(x, s) || x.index - y.index);
    const body = gridTable.tBodies[0];
    ordered.forEach((row) => body.append(row.tr));
    let text = `Showing ${shown.length} of ${rows.length} rows`;
    if (s.sort === "value") text += `, ${s.sortA}'s best ${s.metric} first`;
    if (s.sort === "diff") text += `, where ${s.sortA} beats ${s.sortB} on ${s.metric} most first`;
    count.textContent = text;
    saveToHash(s);
  };
  for (const id of CONTROL_IDS) {
    const el = document.getElementById(id);
    el.addEventListener(el.type === "search" ? "input" : "change", apply);
  }
  loadFromHash();
  apply();
}

// ------------------------------------------------------------------------------ ratings
let ratings = gridData ? gridData.ratings : [];

const sameRater = (entry, rater) => (entry.rater || "") === (rater || "");

function mine(row, label) {
  const rater = raterName();
  return ratings.find((r) => r.row === row && r.label === label && sameRater(r, rater)) || null;
}

function renderRating(box) {
  const row = Number(box.dataset.row);
  const label = box.dataset.label;
  const here = ratings.filter((r) => r.row === row && r.label === label);
  const own = mine(row, label);
  for (const button of box.querySelectorAll("button.thumb")) {
    const kind = button.dataset.rating;
    const n = here.filter((r) => r.rating === kind).length;
    button.querySelector(".count").textContent = n ? String(n) : "";
    button.setAttribute("aria-pressed", String(Boolean(own && own.rating === kind)));
  }
  const list = box.querySelector(".comments");
  list.replaceChildren();
  for (const r of here.filter((entry) => entry.comment)) {
    const li = document.createElement("li");
    const who = document.createElement("b");
    who.textContent = r.rater || "anonymous";
    li.append(who);
    if (r.rating) {
      const kind = document.createElement("span");
      kind.className = "muted";
      kind.textContent = ` (thumbs ${r.rating})`;
      li.append(kind);
    }
    li.append(`: ${r.comment}`);
    list.append(li);
  }
}

async function saveRating(box, rating, comment) {
  const row = Number(box.dataset.row);
  const label = box.dataset.label;
  const rater = raterName() || null;
  box.querySelector(".rating-error")?.remove();
  try {
    const saved = await api("POST", `/v1/comparisons/${gridData.comparison}/ratings`, {
      row,
      label,
      rating,
      comment: comment || null,
      rater,
    });
    ratings = ratings.filter((r) => !(r.row === row && r.label === label && sameRater(r, rater)));
    if (saved.rating || saved.comment) ratings.push(saved);
  } catch (error) {
    const p = document.createElement("p");
    p.className = "field-error rating-error";
    p.textContent = describeError(error);
    box.append(p);
  }
  renderRating(box);
}

function openCommentForm(box, toggle) {
  const existing = box.querySelector(".comment-form");
  if (existing) {
    existing.remove();
    toggle.setAttribute("aria-expanded", "false");
    return;
  }
  const own = mine(Number(box.dataset.row), box.dataset.label);
  const form = document.createElement("form");
  form.className = "comment-form";
  const id = `comment-${box.dataset.row}-${box.dataset.label}`;
  const label = document.createElement("label");
  label.htmlFor = id;
  label.className = "small";
  label.textContent = `Comment on ${box.dataset.label}, row ${box.dataset.row}`;
  const text = document.createElement("textarea");
  text.id = id;
  text.rows = 2;
  text.maxLength = 2000;
  text.value = own?.comment || "";
  const buttons = document.createElement("div");
  buttons.className = "row";
  const save = document.createElement("button");
  save.type = "submit";
  save.className = "button primary";
  save.textContent = "Save comment";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "button subtle";
  cancel.textContent = "Cancel";
  buttons.append(save, cancel);
  form.append(label, text, buttons);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const current = mine(Number(box.dataset.row), box.dataset.label);
    await saveRating(box, current?.rating || null, text.value.trim());
    form.remove();
    toggle.setAttribute("aria-expanded", "false");
    toggle.focus();
  });
  cancel.addEventListener("click", () => {
    form.remove();
    toggle.setAttribute("aria-expanded", "false");
    toggle.focus();
  });
  text.addEventListener("keydown", (event) => {
    if (event.key === "Escape") cancel.click();
  });
  box.append(form);
  toggle.setAttribute("aria-expanded", "true");
  text.focus();
}

function setupRatings() {
  const boxes = gridTable.querySelectorAll(".rating");
  boxes.forEach(renderRating);
  gridTable.addEventListener("click", (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    const box = button.closest(".rating");
    if (!box) return;
    if (button.classList.contains("thumb")) {
      const own = mine(Number(box.dataset.row), box.dataset.label);
      const kind = button.dataset.rating;
      // Pressing your current thumb again takes it back; your comment stays.
      saveRating(box, own && own.rating === kind ? null : kind, own?.comment || null);
    } else if (button.classList.contains("comment-toggle")) {
      openCommentForm(box, button);
    }
  });
  document.addEventListener("rater-changed", () => boxes.forEach(renderRating));
}

if (gridTable) {
  setupGrid();
  setupRatings();
}
