// Shared by every page: local times, the rater's name kept across pages, JSON requests.

const RATER_KEY = "llm-compare.rater";

export function raterName() {
  return (localStorage.getItem(RATER_KEY) || "").trim();
}

/** Keep every "your name" field in step with the name saved in this browser. */
function bindRaterFields() {
  for (const input of document.querySelectorAll("input[data-rater]")) {
    input.value = raterName();
    input.addEventListener("change", () => {
      localStorage.setItem(RATER_KEY, input.value.trim());
      document.dispatchEvent(new CustomEvent("rater-changed"));
    });
  }
}

/** Server-rendered times are UTC; show them in the reader's own time zone. */
export function localiseTimes(root = document) {
  const format = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  for (const el of root.querySelectorAll("time[datetime]")) {
    const date = new Date(el.getAttribute("datetime"));
    if (!Number.isNaN(date.getTime())) {
      el.title = el.textContent;
      el.textContent = format.format(date);
    }
  }
}

export class ApiError extends Error {
  constructor(status, body) {
    super(body && body.message ? body.message : `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

export async function api(method, url, body) {
  const options = { method, headers: { accept: "application/json" } };
  if (body !== undefined) {
    options.headers["content-type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** The API's error body as one readable line: "field: message; ...". */
export function describeError(error) {
  if (error instanceof ApiError && error.body && Array.isArray(error.body.fields) && error.body.fields.length) {
    return error.body.fields.map((f) => `${f.field}: ${f.message}`).join("; ");
  }
  return error.message || String(error);
}

export function fmt(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1000) return Math.round(value).toLocaleString("en-US");
  if (magnitude >= 100) return value.toFixed(1);
  if (magnitude >= 0.001) return String(Number(value.toPrecision(3)));
  return value.toExponential(2);
}

bindRaterFields();
localiseTimes();
