// Word-level diff: what an output adds to (ins) and leaves out of (del) another text.

const MAX_CELLS = 400_000; // longest-common-subsequence table size before falling back

export function tokenize(text) {
  return (text || "").match(/\s+|[^\s]+/g) || [];
}

function lcsOps(a, b) {
  const n = a.length;
  const m = b.length;
  // lengths[i][j]: LCS of a[i:] and b[j:], in one flat array.
  const lengths = new Uint32Array((n + 1) * (m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lengths[i * (m + 1) + j] =
        a[i] === b[j]
          ? lengths[(i + 1) * (m + 1) + j + 1] + 1
          : Math.max(lengths[(i + 1) * (m + 1) + j], lengths[i * (m + 1) + j + 1]);
    }
  }
  const ops = [];
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) {
      ops.push(["eq", b[j]]);
      i++;
      j++;
    } else if (lengths[(i + 1) * (m + 1) + j] >= lengths[i * (m + 1) + j + 1]) {
      ops.push(["del", a[i++]]);
    } else {
      ops.push(["ins", b[j++]]);
    }
  }
  while (i < n) ops.push(["del", a[i++]]);
  while (j < m) ops.push(["ins", b[j++]]);
  return ops;
}

/** Operations turning `before` into `after`, merged into runs: [["eq"|"ins"|"del", text], ...]. */
export function diffWords(before, after) {
  const a = tokenize(before);
  const b = tokenize(after);
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) start++;
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) {
    endA--;
    endB--;
  }
  const midA = a.slice(start, endA);
  const midB = b.slice(start, endB);
  const middle =
    midA.length * midB.length > MAX_CELLS
      ? [...midA.map((t) => ["del", t]), ...midB.map((t) => ["ins", t])]
      : lcsOps(midA, midB);
  const ops = [...a.slice(0, start).map((t) => ["eq", t]), ...middle, ...a.slice(endA).map((t) => ["eq", t])];
  return groupChanges(ops);
}

const isSpace = (text) => /^\s+$/.test(text);

/** Runs of changes separated only by spaces read as one replaced phrase, "old words" then
 * "new words", instead of alternating single words; spaces inside a run go to both sides so
 * either text can still be read back whole. */
function groupChanges(ops) {
  const out = [];
  let removed = "";
  let added = "";
  const flush = () => {
    if (removed) out.push(["del", removed]);
    if (added) out.push(["ins", added]);
    removed = "";
    added = "";
  };
  for (let i = 0; i < ops.length; i++) {
    const [kind, text] = ops[i];
    const inRun = removed || added;
    if (kind === "del") removed += text;
    else if (kind === "ins") added += text;
    else if (inRun && isSpace(text) && ops.slice(i + 1).find(([, t]) => !isSpace(t))?.[0] !== "eq" && i + 1 < ops.length) {
      removed += text;
      added += text;
    } else {
      flush();
      const last = out[out.length - 1];
      if (last && last[0] === "eq") last[1] += text;
      else out.push(["eq", text]);
    }
  }
  flush();
  return out;
}

/** Render a diff into `element` with text nodes only (outputs are untrusted text). */
export function renderDiff(element, ops) {
  element.replaceChildren();
  for (const [kind, text] of ops) {
    if (kind === "eq") {
      element.append(document.createTextNode(text));
    } else {
      const mark = document.createElement(kind);
      mark.className = "diff";
      mark.textContent = text;
      mark.title = kind === "ins" ? "only in this output" : "missing from this output";
      element.append(mark);
    }
  }
}
