"""The comparison summary logged on the parent run: JSON for machines, HTML for people."""

from __future__ import annotations

import html
from typing import Any

from shared.metrics import MetricInfo
from shared.records import CandidateRecord, ComparisonSpec
from shared.results import side_by_side


def build_summary(
    *,
    comparison_id: str,
    spec: ComparisonSpec,
    rows: list[dict[str, Any]],
    candidates: list[CandidateRecord],
    outputs: dict[str, list[dict[str, Any]] | None],
    registry: dict[str, MetricInfo],
    pairwise: list[dict[str, Any]] | None = None,
    judge_ranking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``registry`` holds every metric the workers know, custom ones included: each metric's
    direction and scale are recorded here, so the summary reads the same without it."""
    named = dict.fromkeys([*spec.metrics, *(m for c in candidates for m in c.metrics)])
    return {
        "id": comparison_id,
        "name": spec.name,
        "experiment": spec.experiment,
        "model_type": spec.model_type,
        "metrics": list(spec.metrics),
        # MLflow built-ins outside the registry (e.g. toxicity) have no entry: no direction known.
        "metric_info": {
            name: {
                "greater_is_better": registry[name].greater_is_better,
                "scale": registry[name].scale,
                "min_value": registry[name].min_value,
                "max_value": registry[name].max_value,
                "custom": registry[name].custom,
            }
            for name in named
            if name in registry
        },
        "candidates": [
            {
                "label": c.label,
                "model": c.model,
                "status": c.status.value,
                "error": c.error,
                # Endpoint candidates: rows whose request still failed after retries, and usage,
                # cost and speed over the candidate.
                "rows_failed": c.rows_failed,
                "totals": dict(c.totals),
                "mlflow_run_id": c.run_id,
                "metrics": dict(c.metrics),
                "aggregates": dict(c.aggregates),
            }
            for c in candidates
        ],
        "pairwise": pairwise or [],
        "judge_ranking": judge_ranking,
        "rows": side_by_side(rows, spec.labels, outputs),
    }


def _best(summary: dict[str, Any], metric: str) -> str | None:
    info = summary.get("metric_info", {}).get(metric)
    values = {c["label"]: c["metrics"].get(metric) for c in summary["candidates"]}
    values = {k: v for k, v in values.items() if v is not None}
    if not values or info is None or len(set(values.values())) == 1:
        return None
    pick = max if info["greater_is_better"] else min
    return pick(values, key=lambda label: values[label])


def _arrow(summary: dict[str, Any], metric: str) -> str:
    info = summary.get("metric_info", {}).get(metric)
    if info is None:
        return ""
    return " ↑" if info["greater_is_better"] else " ↓"


def render_html(summary: dict[str, Any]) -> str:
    e = html.escape
    labels = [c["label"] for c in summary["candidates"]]
    metric_names = list(dict.fromkeys(m for c in summary["candidates"] for m in c["metrics"]))
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{e(summary['name'])}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:1.5rem}table{border-collapse:collapse;"
        "margin-bottom:1.5rem}td,th{border:1px solid #ccc;padding:.35rem .6rem;vertical-align:top;"
        "text-align:left}th{background:#f3f3f3}.best{background:#e3f6e3;font-weight:600}"
        ".failed{color:#a00}.out{white-space:pre-wrap;max-width:32rem}</style></head><body>",
        f"<h1>{e(summary['name'])}</h1>",
        f"<p>Comparison <code>{e(summary['id'])}</code> · experiment <b>{e(summary['experiment'])}</b>"
        f" · {len(summary['rows'])} rows</p>",
        "<h2>Metrics</h2><table><tr><th>candidate</th><th>model</th><th>status</th>",
    ]
    for name in metric_names:
        parts.append(f"<th>{e(name)}{_arrow(summary, name)}</th>")
    parts.append("</tr>")
    best = {name: _best(summary, name) for name in metric_names}
    for c in summary["candidates"]:
        status = e(c["status"]) + (
            f"<div class='failed'>{e(c['error'] or '')}</div>" if c.get("error") else ""
        )
        if c.get("rows_failed"):
            failed = c["rows_failed"]
            status += f"<div class='failed'>{failed} {'row' if failed == 1 else 'rows'} failed</div>"
        parts.append(f"<tr><td>{e(c['label'])}</td><td>{e(c['model'])}</td><td>{status}</td>")
        for name in metric_names:
            value = c["metrics"].get(name)
            agg = (c.get("aggregates") or {}).get(name) or {}
            cls = " class='best'" if best[name] == c["label"] else ""
            interval = ""
            if "ci_low" in agg and agg.get("n", 0) > 1:
                interval = f"<br><small>[{agg['ci_low']:.3g}, {agg['ci_high']:.3g}]</small>"
            parts.append(f"<td{cls}>{'' if value is None else f'{value:.4g}'}{interval}</td>")
        parts.append("</tr>")
    parts.append(
        "</table><p><small>Mean per candidate (for a 0/1 metric, the share of rows scoring 1), 95% "
        "confidence interval below: a Wilson score interval for 0/1 metrics, a seeded percentile "
        "bootstrap of the mean (2,000 resamples) for the others, within the metric's range. "
        "↑ higher is better, ↓ lower is better.</small></p>"
    )
    if summary.get("pairwise"):
        parts.append("<h2>Paired verdicts</h2><ul>")
        for pair in summary["pairwise"]:
            cls = "" if pair["better"] is None else " class='best'"
            parts.append(
                f"<li{cls}>{e(pair['verdict'])} · wins/ties/losses for {e(pair['a'])}: "
                f"{pair['wins']}/{pair['ties']}/{pair['losses']}</li>"
            )
        parts.append(
            "</ul><p><small>Mean paired difference with a seeded paired-bootstrap 95% interval "
            "(2,000 resamples) and a two-sided sign-flip permutation p-value. A metric whose "
            "difference is the same on every row gets no verdict: it does not vary by row (a 0/1 "
            "metric that one candidate wins on every row is judged).</small></p>"
        )
    ranking = summary.get("judge_ranking")
    if ranking:
        parts.append(
            f"<h2>Judge ranking</h2><p>Bradley-Terry over {ranking['verdicts']} pairwise verdicts by "
            f"{e(ranking['judge'])} (each row judged twice with the order swapped; "
            "disagreements are ties).</p>"
            "<table><tr><th>rank</th><th>candidate</th><th>strength</th><th>wins</th><th>ties</th>"
            "<th>losses</th></tr>"
        )
        for r in ranking["ranking"]:
            parts.append(
                f"<tr><td>{r['rank']}</td><td>{e(r['label'])}</td><td>{r['strength']:.3g}</td>"
                f"<td>{r['wins']}</td><td>{r['ties']}</td><td>{r['losses']}</td></tr>"
            )
        parts.append("</table>")
    parts.append("<h2>Outputs side by side</h2><table><tr><th>#</th><th>input</th><th>reference</th>")
    parts += [f"<th>{e(label)}</th>" for label in labels]
    parts.append("</tr>")
    for row in summary["rows"]:
        parts.append(
            f"<tr><td>{row['index']}</td><td class='out'>{e(row['input'])}</td>"
            f"<td class='out'>{e(row['reference'] or '')}</td>"
        )
        for label in labels:
            out = row["outputs"][label]
            scores = ", ".join(f"{k}={v:.3g}" for k, v in out["scores"].items() if v is not None)
            parts.append(f"<td class='out'>{e(out['output'] or '')}<br><small>{e(scores)}</small></td>")
        parts.append("</tr>")
    parts.append("</table></body></html>")
    return "".join(parts)
