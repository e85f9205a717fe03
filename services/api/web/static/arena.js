// Blind pairwise voting: the server draws a pair and hides its labels; they show after the vote.
import { api, describeError, fmt, raterName } from "./common.js";

const root = document.getElementById("arena");
const id = root?.dataset.comparison;
const answers = { a: document.getElementById("answer-a"), b: document.getElementById("answer-b") };
const result = document.getElementById("arena-result");
const next = document.getElementById("arena-next");
const skip = document.getElementById("arena-skip");
const voteButtons = [...document.querySelectorAll("#vote-buttons .vote")];
const WORDS = { a: "A is better", b: "B is better", tie: "Tie", both_bad: "Both are bad" };

let matchup = null;
let voted = false;
let busy = false;

function setVoting(enabled) {
  for (const button of voteButtons) button.disabled = !enabled;
  skip.disabled = !enabled;
}

async function loadPair() {
  busy = true;
  setVoting(false);
  result.textContent = "";
  next.hidden = true;
  voted = false;
  for (const side of Object.values(answers)) {
    side.classList.remove("winner");
    side.querySelector('[data-role="reveal"]').textContent = "";
  }
  try {
    matchup = await api("POST", `/v1/comparisons/${id}/arena/matchups`, { voter: raterName() || null });
  } catch (error) {
    document.getElementById("arena-input").textContent = "";
    result.textContent = `No pair to vote on: ${describeError(error)}`;
    busy = false;
    return;
  }
  document.getElementById("arena-row").textContent = `row ${matchup.row}`;
  document.getElementById("arena-input").textContent = matchup.input;
  const referenceBox = document.getElementById("arena-reference-box");
  referenceBox.hidden = matchup.reference === null || matchup.reference === undefined;
  referenceBox.open = false;
  document.getElementById("arena-reference").textContent = matchup.reference ?? "";
  answers.a.querySelector('[data-role="output"]').textContent = matchup.outputs.a;
  answers.b.querySelector('[data-role="output"]').textContent = matchup.outputs.b;
  setVoting(true);
  busy = false;
}

async function vote(winner) {
  if (!matchup || voted || busy) return;
  busy = true;
  setVoting(false);
  try {
    const saved = await api("POST", `/v1/comparisons/${id}/votes`, {
      matchup: matchup.matchup,
      winner,
      voter: raterName() || null,
    });
    voted = true;
    answers.a.querySelector('[data-role="reveal"]').textContent = `· ${saved.a}`;
    answers.b.querySelector('[data-role="reveal"]').textContent = `· ${saved.b}`;
    if (winner === "a" || winner === "b") answers[winner].classList.add("winner");
    const verdict =
      winner === "a" ? `${saved.a} over ${saved.b}` : winner === "b" ? `${saved.b} over ${saved.a}` : `${saved.a} and ${saved.b}`;
    result.textContent = `You voted “${WORDS[winner]}”: ${verdict}.`;
    next.hidden = false;
    next.focus();
    await loadRanking();
  } catch (error) {
    result.textContent = `The vote was not recorded: ${describeError(error)}`;
    setVoting(true);
  }
  busy = false;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

async function loadRanking() {
  let data;
  try {
    data = await api("GET", `/v1/comparisons/${id}/votes`);
  } catch (error) {
    document.getElementById("ranking-method").textContent = describeError(error);
    return;
  }
  const body = document.getElementById("ranking-body");
  body.replaceChildren();
  for (const r of data.ranking) {
    const tr = document.createElement("tr");
    const score = cell(String(Math.round(r.score)), "num");
    if (r.ci_low !== null && r.ci_high !== null) {
      const interval = document.createElement("span");
      interval.className = "interval muted small nowrap";
      interval.textContent = `[${Math.round(r.ci_low)}, ${Math.round(r.ci_high)}]`;
      score.append(interval);
    }
    tr.append(
      cell(String(r.rank)),
      cell(r.label, "label-cell"),
      score,
      cell(`${r.wins}/${r.ties}/${r.losses}`, "num nowrap"),
      cell(String(r.votes), "num"),
    );
    body.append(tr);
  }
  const total = data.votes.length;
  document.getElementById("ranking-count").textContent = `${total} vote${total === 1 ? "" : "s"} so far.`;
  document.getElementById("ranking-method").textContent = data.method || "";
  const agreement = document.getElementById("agreement");
  agreement.replaceChildren();
  const lines = [];
  if (data.agreement?.judge && data.agreement.judge.compared) lines.push(["the judge", data.agreement.judge]);
  for (const [metric, a] of Object.entries(data.agreement?.metrics || {})) if (a.compared) lines.push([metric, a]);
  if (lines.length) {
    const box = document.createElement("details");
    box.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "How often votes agree with…";
    const table = document.createElement("table");
    table.className = "compact agreement";
    for (const [name, a] of lines) {
      const tr = document.createElement("tr");
      tr.append(
        cell(name, "label-cell"),
        cell(`${a.agree} of ${a.compared}`, "num nowrap"),
        cell(a.rate === null ? "–" : `${Math.round(100 * a.rate)} %`, "num nowrap"),
      );
      table.append(tr);
    }
    box.append(summary, table);
    agreement.append(box);
  }
}

function onKey(event) {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target.closest("input, textarea, select")) return;
  const key = event.key.toLowerCase();
  const winner = { a: "a", b: "b", t: "tie", x: "both_bad" }[key];
  if (winner && !voted) {
    event.preventDefault();
    vote(winner);
  } else if (key === "s" && !voted && !busy) {
    event.preventDefault();
    loadPair();
  } else if (key === "n" && voted) {
    event.preventDefault();
    loadPair();
  }
}

if (root) {
  for (const button of voteButtons) button.addEventListener("click", () => vote(button.dataset.winner));
  skip.addEventListener("click", loadPair);
  next.addEventListener("click", loadPair);
  document.addEventListener("keydown", onKey);
  loadPair();
  loadRanking();
}
