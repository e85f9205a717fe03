// The comparisons list refreshes its table every two seconds while something is queued or running.
import { localiseTimes } from "./common.js";

const holder = document.getElementById("comparison-table");
const REFRESH_MS = 2000;

async function refresh() {
  const active = holder.querySelector("[data-active]")?.dataset.active === "true";
  if (!active || document.hidden) return;
  try {
    const response = await fetch(holder.dataset.src, { headers: { accept: "text/html" } });
    if (response.redirected) {
      location.reload(); // signed out meanwhile: the page itself goes to sign in
      return;
    }
    if (response.ok) {
      // Keep keyboard focus where it was when the table is swapped.
      const focused = document.activeElement?.getAttribute("href");
      holder.innerHTML = await response.text();
      localiseTimes(holder);
      if (focused) holder.querySelector(`a[href="${CSS.escape(focused)}"]`)?.focus();
    }
  } catch {
    // The next tick tries again; a reload shows the server's state anyway.
  }
}

if (holder) setInterval(refresh, REFRESH_MS);
