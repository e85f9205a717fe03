"""``llm-compare``: submit comparisons, follow them and read their results from a terminal.

    llm-compare run demo/comparison.json --wait
    llm-compare run spec.yaml --data rows.csv
    llm-compare ls --status running
    llm-compare show ID
    llm-compare results ID --format csv > results.csv

Everything goes through the HTTP API (``--url``, or ``LLM_COMPARE_URL``); ``--json`` prints the
API's JSON instead of tables. Exit codes, the same with ``--json``:

    0  the comparison succeeded (or the command did what it was asked)
    1  the comparison failed, partially failed or was cancelled; waiting timed out; the API
       answered no (unknown id, nothing left to cancel)
    2  the spec file could not be read, or the API refused the spec
    3  the API cannot be reached
    130  Ctrl-C while waiting (the comparison keeps running)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import IntEnum, StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import redis
import typer
import yaml
from pydantic import BaseModel
from rich import box
from rich.console import Console, Group, RenderableType
from rich.padding import Padding
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from rich.text import Text

from shared.apikeys import KeyRecord, Quotas, Role, issue_key
from shared.client import FINAL_STATUSES, ApiError, ComparisonClient
from shared.display import readable_number
from shared.schemas import ComparisonRead, ComparisonStatus
from shared.settings import get_settings
from shared.store import ComparisonStore

DEFAULT_URL = "http://127.0.0.1:8000"

State = dict[str, Any]


class ExitCode(IntEnum):
    ok = 0
    not_succeeded = 1
    invalid = 2
    unreachable = 3
    # No key, a wrong or revoked one, or a role too low for the command.
    not_authorised = 4
    # What a shell reports for a command stopped by SIGINT.
    interrupted = 130


STATUS_STYLES = {
    "queued": "dim",
    "running": "cyan",
    "succeeded": "green",
    "partially_failed": "yellow",
    "failed": "red",
    "cancelled": "yellow",
}


class SpecFileError(ValueError):
    """The spec or data file cannot be read or parsed; the message says where."""


@dataclass
class Cli:
    url: str
    json: bool
    api_key: str | None
    # --url given on the command line: the commands suggested to the user repeat it.
    url_given: bool
    console: Console
    err: Console

    def command(self, args: str) -> str:
        return f"llm-compare --url {self.url} {args}" if self.url_given else f"llm-compare {args}"

    def emit(self, data: Any) -> None:
        # Plain stdout rather than Rich: machine output must never be wrapped or styled.
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))

    def fail(
        self,
        code: ExitCode,
        error: str,
        message: str,
        *,
        lines: list[str] | None = None,
        hint: str | None = None,
        verbatim: list[str] | None = None,
        body: Any = None,
    ) -> NoReturn:
        """Say what went wrong (as JSON under --json) and end with ``code``. ``verbatim`` lines
        (commands, URLs) are never wrapped, so they can be copied whole."""
        if self.json:
            self.emit(body if body is not None else {"error": error, "message": message, "fields": []})
        else:
            self.err.print(Text(message, style="bold red"))
            for line in lines or []:
                # Indented as a block, so that a wrapped message stays under its field.
                self.err.print(Padding(Text(line, style="red"), (0, 0, 0, 2)))
            if hint:
                self.err.print(Text(hint))
            for line in verbatim or []:
                self.err.print(Text(line), soft_wrap=True)
        raise typer.Exit(code)

    @contextmanager
    def session(self, *, what: str = "request") -> Iterator[ComparisonClient]:
        """A client whose transport and API errors end the command with the matching exit code."""
        client = ComparisonClient(self.url, api_key=self.api_key)
        try:
            yield client
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            self.fail(
                ExitCode.unreachable,
                "unreachable",
                f"Cannot reach the llm-compare API at {self.url}: {exc or type(exc).__name__}",
                hint=_START_HINT,
            )
        except ApiError as exc:
            self._refused(exc, what=what)
        finally:
            client.close()

    def _refused(self, exc: ApiError, *, what: str) -> NoReturn:
        # The API's own error JSON is parsed by ApiError; anything else (a proxy's page) is not.
        parsed = exc.code != "http_error"
        message = exc.message if parsed else str(exc)
        json_body = exc.body if parsed else {"error": "http_error", "message": str(exc), "fields": []}
        fields = [f"{f.field}: {f.message}" for f in exc.fields]
        if exc.status_code in (413, 422):
            nothing = "; nothing was queued" if what == "comparison" else ""
            header = f"The API refused the {what} (HTTP {exc.status_code}){nothing}"
            self.fail(
                ExitCode.invalid,
                "invalid_request",
                f"{header}:" if fields else f"{header}: {message}",
                lines=fields,
                body=json_body,
            )
        if exc.status_code in (401, 403):
            self.fail(
                ExitCode.not_authorised,
                exc.code if parsed else "unauthorized",
                f"The llm-compare API at {self.url} refused the key (HTTP {exc.status_code}): {message}",
                hint="Pass an API key with --key or LLM_COMPARE_KEY; an operator creates one with "
                "`llm-compare keys create --name <team> --role submitter`.",
                body=json_body,
            )
        if exc.status_code == 503:
            self.fail(
                ExitCode.unreachable,
                "unavailable",
                f"The llm-compare API at {self.url} is not ready: {message}",
                hint=_START_HINT,
                body=json_body,
            )
        self.fail(ExitCode.not_succeeded, exc.code, message, body=json_body)


_START_HINT = (
    "Start the local stack with `make dev` in the llm-compare repository (the API then listens on "
    f"{DEFAULT_URL}), or point --url or LLM_COMPARE_URL at a running API."
)

app = typer.Typer(
    name="llm-compare",
    help="Compare large language models side by side through the llm-compare API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _global_options(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option("--url", envvar="LLM_COMPARE_URL", help="Base URL of the llm-compare API.")
    ] = DEFAULT_URL,
    json_output: Annotated[
        bool,
        typer.Option("--json", help="Print the API's JSON instead of tables; no progress bars."),
    ] = False,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--key",
            envvar="LLM_COMPARE_KEY",
            help="API key (sent as a Bearer token). Prefer the environment variable: a command line "
            "is visible to other users of the machine.",
            show_default=False,
        ),
    ] = None,
) -> None:
    given = ctx.get_parameter_source("url")
    ctx.obj = Cli(
        url=url.rstrip("/"),
        json=json_output,
        api_key=api_key or None,
        url_given=given is not None and given.name == "COMMANDLINE",
        console=Console(),
        err=Console(stderr=True),
    )


def _json(model: BaseModel) -> State:
    """A typed answer of the client as the API's JSON, which --json prints and the tables read."""
    return model.model_dump(mode="json")


def _cli(ctx: typer.Context) -> Cli:
    cli: Cli = ctx.obj  # set by _global_options, which runs before every command
    return cli


# ---------------------------------------------------------------- run


def load_spec(path: Path) -> dict[str, Any]:
    """A comparison spec from a .json, .yaml or .yml file."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise SpecFileError(f"{path}: the spec must be a .json, .yaml or .yml file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecFileError(f"Cannot read the spec file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SpecFileError(f"Cannot read the spec file {path}: not UTF-8 text ({exc.reason})") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SpecFileError(f"{path} line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise SpecFileError(f"{path}{where}: {getattr(exc, 'problem', None) or exc}") from None
        # YAML reads unquoted dates and times as Python objects; the API wants them as text.
        data = json.loads(json.dumps(data, default=str))
    if not isinstance(data, dict):
        raise SpecFileError(f"{path}: the spec must be a mapping of fields (name, candidates, ...)")
    return data


def _read_data(path: Path, spec: dict[str, Any]) -> bytes:
    if "dataset" in spec:
        raise SpecFileError("The spec has a 'dataset' and --data gives another one: remove one of the two")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SpecFileError(f"Cannot read the data file {path}: {exc.strerror or exc}") from None


@app.command()
def run(
    ctx: typer.Context,
    spec: Annotated[
        Path, typer.Argument(metavar="SPEC", help="The comparison: a .json, .yaml or .yml file.")
    ],
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Dataset as .jsonl or .csv, when the spec has no 'dataset'."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Show progress until it ends, then the results.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=0,
            help="With --wait: stop waiting after this many seconds (the comparison keeps running).",
        ),
    ] = None,
) -> None:
    """Submit a comparison; with --wait, follow it and print the side-by-side results."""
    cli = _cli(ctx)
    try:
        body = load_spec(spec)
        content = _read_data(data, body) if data is not None else None
    except SpecFileError as exc:
        cli.fail(ExitCode.invalid, "invalid_spec_file", str(exc))
    with cli.session(what="comparison") as client:
        if data is not None and content is not None:
            created = _json(client.submit_file(body, data.name, content))
        else:
            created = _json(client.submit(body))
        if not wait:
            if cli.json:
                cli.emit(created)
            else:
                _print_submitted(cli, created)
            return
        final = _follow(cli, client, created, timeout=timeout)
        if cli.json:
            cli.emit(final)
        else:
            results = _json(client.results(final["id"]))
            catalog = _metric_catalog(client)
            cli.console.print()
            if any(
                out.get("output") is not None for row in results["rows"] for out in row["outputs"].values()
            ):
                cli.console.print(results_table(results, score_metric=_reference_metric(final, catalog)))
            else:
                cli.console.print(Text("No candidate produced outputs.", style="yellow"))
            _print_summary(cli, final, catalog)
    raise typer.Exit(_exit_code(final))


def _print_submitted(cli: Cli, created: State) -> None:
    cid = created["id"]
    candidates = len(created["candidates"])
    cli.console.print(
        Text.assemble(
            "Submitted ",
            (created["name"], "bold"),
            f" ({candidates} candidates × {created['rows']} rows), ",
            _status_text(created["status"]),
        )
    )
    cli.console.print(Text.assemble(("  id        ", "bold"), cid), soft_wrap=True)
    _print_links(cli, created, indent="  ")
    cli.console.print(f"Follow it with: {cli.command(f'show {cid}')}", soft_wrap=True)


def _follow(cli: Cli, client: ComparisonClient, created: State, *, timeout: float | None) -> State:
    """Progress bars (none under --json) until the comparison ends; its final state. States come
    from the event stream, or from polling once a second when it fails (``ComparisonClient.wait``)."""
    cid = created["id"]
    last = created
    bars: CandidateBars | None = None

    def on_update(state: ComparisonRead) -> None:
        nonlocal last
        last = _json(state)
        if bars is not None:
            bars.update(last)

    def on_fallback(reason: str) -> None:
        if not cli.json:
            cli.console.print(Text(f"Live updates stopped ({reason}); polling every second.", style="dim"))

    try:
        with ExitStack() as stack:
            if not cli.json:
                cli.console.print(
                    Text.assemble(
                        "Waiting for ",
                        (created["name"], "bold"),
                        f" ({cid}); Ctrl-C stops waiting, the comparison keeps running.",
                    )
                )
                bars = CandidateBars(stack.enter_context(_progress_bars(cli.console)))
                bars.update(created)
            final = client.wait(
                cid, timeout=timeout, poll_s=1.0, on_update=on_update, on_fallback=on_fallback
            )
    except KeyboardInterrupt:
        cli.fail(
            ExitCode.interrupted,
            "interrupted",
            f"Stopped waiting; comparison {cid} keeps running.",
            verbatim=[f"Follow it with: {cli.command(f'show {cid}')}", f"Web page: {_web_url(cli, cid)}"],
        )
    except TimeoutError:
        cli.fail(
            ExitCode.not_succeeded,
            "timeout",
            f"Stopped waiting after {timeout:g} s; comparison {cid} is still {last['status']} "
            "and keeps running.",
            verbatim=[f"Follow it with: {cli.command(f'show {cid}')}"],
        )
    return _json(final)


def _progress_bars(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TextColumn("{task.fields[speed]}"),
        TextColumn("{task.fields[eta]}"),
        TextColumn("{task.fields[status]}"),
        console=console,
    )


class CandidateBars:
    """One progress bar per candidate, from the API's ``progress`` fields."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def update(self, state: State) -> None:
        for candidate in state["candidates"]:
            p = candidate["progress"]
            status = candidate["status"]
            speed = _speed(p.get("tokens_per_second"))
            eta = f"ETA {_duration(p['eta_s'])}" if status == "running" and p.get("eta_s") else ""
            styled = f"[{STATUS_STYLES.get(status, '')}]{status}[/]"
            label = candidate["label"]
            total = p["total"] or None
            if label in self.tasks:
                self.progress.update(
                    self.tasks[label], total=total, completed=p["done"], speed=speed, eta=eta, status=styled
                )
            else:
                self.tasks[label] = self.progress.add_task(
                    label, total=total, completed=p["done"], speed=speed, eta=eta, status=styled
                )


def _exit_code(state: State) -> ExitCode:
    return ExitCode.ok if state["status"] == ComparisonStatus.succeeded else ExitCode.not_succeeded


# ---------------------------------------------------------------- ls, show, results, cancel


@app.command("ls")
def list_comparisons(
    ctx: typer.Context,
    status: Annotated[
        ComparisonStatus | None, typer.Option("--status", help="Only comparisons in this state.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=200, help="How many, newest first.")] = 20,
) -> None:
    """List comparisons, newest first."""
    cli = _cli(ctx)
    with cli.session() as client:
        page = _json(client.list(status=status.value if status else None, limit=limit))
    if cli.json:
        cli.emit(page)
        return
    if not page["items"]:
        cli.console.print("No comparisons" + (f" with status {status.value}." if status else " yet."))
        return
    table = _plain_table()
    table.leading = 1
    # Two lines per comparison keep the full id (for copying) within 80 columns.
    table.add_column("name / id", min_width=32)
    table.add_column("status")
    table.add_column("done/total")
    table.add_column("created / finished")
    for item in page["items"]:
        progress = Text("\n").join(
            Text.assemble(
                f"{c['label']} ",
                (f"{c['progress']['done']}/{c['progress']['total']}", STATUS_STYLES.get(c["status"], "")),
            )
            for c in item["candidates"]
        )
        table.add_row(
            Text.assemble((item["name"], "bold"), "\n", (item["id"], "dim")),
            _status_text(item["status"]),
            progress,
            Text("\n").join(
                [_when(item["created_at"], compact=True), _when(item.get("finished_at"), compact=True)]
            ),
        )
    cli.console.print(table)
    shown = len(page["items"])
    if page["total"] > shown:
        cli.console.print(Text(f"{shown} of {page['total']}; --limit shows more.", style="dim"))


@app.command()
def show(ctx: typer.Context, comparison_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Status, candidates with progress and metrics, paired verdicts and links."""
    cli = _cli(ctx)
    with cli.session() as client:
        state = _json(client.get(comparison_id))
        if cli.json:
            cli.emit(state)
            return
        catalog = _metric_catalog(client)
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    header.add_row("comparison", Text.assemble((state["name"], "bold"), f"  {state['id']}"))
    header.add_row("status", _status_text(state["status"]))
    header.add_row("experiment", Text(state["experiment"]))
    header.add_row("rows", str(state["rows"]))
    header.add_row("metrics", Text(", ".join(state["metrics"]) or "—"))
    header.add_row("created", _when(state["created_at"]))
    if state.get("finished_at"):
        header.add_row("finished", _when(state["finished_at"]))
    cli.console.print(header)
    cli.console.print()
    cli.console.print(candidates_table(state))
    _print_summary(cli, state, catalog)


class ResultsFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


@app.command()
def results(
    ctx: typer.Context,
    comparison_id: Annotated[str, typer.Argument(metavar="ID")],
    output_format: Annotated[
        ResultsFormat, typer.Option("--format", help="table (side by side), csv or json.")
    ] = ResultsFormat.table,
) -> None:
    """The outputs side by side, one row per dataset row, with per-row scores."""
    cli = _cli(ctx)
    with cli.session() as client:
        if output_format is ResultsFormat.csv:
            typer.echo(client.results_csv(comparison_id), nl=False)
            return
        table = _json(client.results(comparison_id))
        if cli.json or output_format is ResultsFormat.json:
            cli.emit(table)
            return
        state = _json(client.get(comparison_id))
        catalog = _metric_catalog(client)
    cli.console.print(results_table(table, score_metric=_reference_metric(state, catalog)))


@app.command()
def cancel(ctx: typer.Context, comparison_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Cancel a queued or running comparison."""
    cli = _cli(ctx)
    with cli.session() as client:
        state = _json(client.cancel(comparison_id))
    if cli.json:
        cli.emit(state)
        return
    cli.console.print(
        Text.assemble(
            "Cancelled ", (state["name"], "bold"), f" ({comparison_id}): ", _status_text(state["status"])
        )
    )


@app.command()
def models(ctx: typer.Context) -> None:
    """The model catalog: names a candidate's 'model' can take."""
    cli = _cli(ctx)
    with cli.session() as client:
        catalog = [_json(model) for model in client.models()]
    if cli.json:
        cli.emit(catalog)
        return
    table = _plain_table()
    table.add_column("name", no_wrap=True)
    table.add_column("offline")
    table.add_column("description (source)", ratio=1)
    for model in catalog:
        description = Text(model["description"])
        description.append(f"\n{model.get('hub_id') or model['source']}", style="dim")
        table.add_row(
            Text(model["name"]),
            Text("yes", style="green") if model.get("available_offline") else Text("no", style="dim"),
            description,
        )
    cli.console.print(table)
    cli.console.print(
        Text(
            "A candidate's model may also be a Hugging Face id, a local directory or .gguf file, "
            "or models:/<name>/<version> for a registered model the operator allowlisted.",
            style="dim",
        )
    )


@app.command()
def metrics(ctx: typer.Context) -> None:
    """The metrics a comparison can ask for, with their direction and what they need."""
    cli = _cli(ctx)
    with cli.session() as client:
        catalog = [_json(metric) for metric in client.metrics()]
    if cli.json:
        cli.emit(catalog)
        return
    table = _plain_table()
    table.add_column("name", no_wrap=True)
    table.add_column("dir", no_wrap=True)
    table.add_column("needs")
    table.add_column("description", ratio=1)
    for metric in catalog:
        name = Text(metric["name"], style="bold" if metric.get("default") else "")
        if metric.get("custom"):
            name.append(" (custom)", style="dim")
        table.add_row(name, _arrow(metric), Text(_needs(metric)), Text(metric["description"]))
    cli.console.print(table)
    cli.console.print(Text("↑ higher is better, ↓ lower is better; bold: run by default.", style="dim"))


def _needs(metric: dict[str, Any]) -> str:
    needs = []
    if metric.get("needs_reference"):
        needs.append("reference")
    if metric.get("needs_option"):
        needs.append(f"{metric['needs_option']} field")
    if metric.get("needs_judge"):
        needs.append("judge")
    return "\n".join(needs)


def _plain_table() -> Table:
    """Columns without vertical rules, for listings that must fit 80 columns."""
    return Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")


def _arrow(metric: dict[str, Any] | None) -> str:
    if metric is None:
        return ""
    return "↑" if metric.get("greater_is_better") else "↓"


def _when(value: str | None, *, compact: bool = False) -> Text:
    """A timestamp from the API in local time; ``compact`` leaves out the current year."""
    if not value:
        return Text("—", style="dim")
    try:
        moment = datetime.fromisoformat(value).astimezone()
    except ValueError:
        return Text(value)
    if compact:
        same_year = moment.year == datetime.now().astimezone().year
        return Text(moment.strftime("%m-%d %H:%M" if same_year else "%Y-%m-%d"))
    return Text(moment.strftime("%Y-%m-%d %H:%M"))


# ---------------------------------------------------------------- rendering


def _status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def _web_url(cli: Cli, comparison_id: str) -> str:
    return f"{cli.url}/ui/comparisons/{comparison_id}"


def _speed(tokens_per_second: float | None) -> str:
    return f"{tokens_per_second:,.0f} tok/s" if tokens_per_second else ""


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _number(value: float | None) -> str:
    return readable_number(value, missing="—")


def _metric_catalog(client: ComparisonClient) -> dict[str, dict[str, Any]]:
    return {m.name: _json(m) for m in client.metrics()}


def _reference_metric(state: State, catalog: dict[str, dict[str, Any]]) -> str | None:
    """The comparison's first metric scored against the reference: the per-row score shown."""
    return next((m for m in state["metrics"] if catalog.get(m, {}).get("needs_reference")), None)


def results_table(results: State, *, score_metric: str | None) -> Table:
    """Rows × candidates: input, reference and each output (wrapped), with its per-row score."""
    labels = results["candidates"]
    rows = results["rows"]
    with_reference = any(r.get("reference") not in (None, "") for r in rows)
    title = f"Outputs, {len(rows)} rows" + (f" (per-row {score_metric})" if score_metric else "")
    table = Table(title=title, title_justify="left", title_style="bold", header_style="bold", show_lines=True)
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("input", overflow="fold")
    if with_reference:
        table.add_column("reference", overflow="fold")
    for label in labels:
        table.add_column(label, overflow="fold")
    for row in rows:
        cells: list[RenderableType] = [str(row["index"]), Text(row["input"])]
        if with_reference:
            reference = row.get("reference")
            cells.append(Text(reference) if reference else Text("—", style="dim"))
        for label in labels:
            cells.append(_output_cell(row["outputs"].get(label) or {}, score_metric))
        table.add_row(*cells)
    return table


def _output_cell(out: dict[str, Any], score_metric: str | None) -> Text:
    if out.get("output") is not None:
        text = Text(out["output"])
    elif out.get("error"):
        text = Text(f"no output: {out['error']}", style="red")
    else:
        text = Text("—", style="dim")
    scores = out.get("scores") or {}
    if score_metric and score_metric in scores:
        text.append(f"\n{score_metric} {_number(scores[score_metric])}", style="dim")
    return text


def metrics_table(state: State, catalog: dict[str, dict[str, Any]]) -> Table | None:
    """Metric × candidate: mean [95% interval] from the candidates' aggregates, best in bold."""
    candidates = state["candidates"]
    seen = [name for c in candidates for name in [*(c.get("aggregates") or {}), *(c.get("metrics") or {})]]
    names = [m for m in state["metrics"] if m in seen] + [
        m for m in dict.fromkeys(seen) if m not in state["metrics"]
    ]
    if not names:
        return None
    table = Table(
        title="Metrics",
        title_justify="left",
        title_style="bold",
        header_style="bold",
        # The interval's method (wilson, bootstrap), when the API gives it, follows the metric name.
        caption="mean [95% interval]; best in bold",
        caption_justify="left",
    )
    table.add_column("metric", no_wrap=True)
    for c in candidates:
        table.add_column(c["label"], justify="right")
    for name in names:
        means = [_mean(c, name) for c in candidates]
        present = [m for m in means if m is not None]
        best = None
        if len(present) > 1 and len(set(present)) > 1 and name in catalog:
            best = max(present) if catalog[name].get("greater_is_better") else min(present)
        cells = [Text(f"{name} {_arrow(catalog.get(name))}".rstrip())]
        methods = {str((c.get("aggregates") or {}).get(name, {}).get("ci_method") or "") for c in candidates}
        if len(methods) == 1 and "" not in methods:
            cells[0].append(f" {methods.pop()}", style="dim")
        for c, mean in zip(candidates, means, strict=True):
            cells.append(_aggregate_text(c, name, bold=mean is not None and mean == best))
        table.add_row(*cells)
    return table


def _mean(candidate: State, name: str) -> float | None:
    agg = (candidate.get("aggregates") or {}).get(name) or {}
    if agg.get("mean") is not None:
        return float(agg["mean"])
    value = (candidate.get("metrics") or {}).get(name)
    return None if value is None else float(value)


def _aggregate_text(candidate: State, name: str, *, bold: bool) -> Text:
    agg = (candidate.get("aggregates") or {}).get(name) or {}
    mean = _mean(candidate, name)
    if mean is None:
        return Text("—", style="dim")
    text = Text(_number(mean), style="bold" if bold else "")
    if agg.get("n", 0) > 1 and agg.get("ci_low") is not None and agg.get("ci_high") is not None:
        text.append(f" [{_number(agg['ci_low'])}, {_number(agg['ci_high'])}]", style="dim")
    return text


def candidates_table(state: State) -> Table:
    table = Table(title="Candidates", title_justify="left", title_style="bold", header_style="bold")
    table.add_column("candidate", no_wrap=True)
    table.add_column("model", overflow="fold")
    table.add_column("status")
    table.add_column("rows", justify="right", no_wrap=True)
    table.add_column("speed", justify="right")
    for c in state["candidates"]:
        p = c["progress"]
        speed = _speed(p.get("tokens_per_second"))
        if c["status"] == "running" and p.get("eta_s"):
            speed = f"{speed}\nETA {_duration(p['eta_s'])}".strip()
        if p.get("cache_hits"):
            speed = f"{speed}\n{p['cache_hits']} cached".strip()
        rows = Text(f"{p['done']}/{p['total']}")
        if c.get("rows_failed"):
            rows.append(f"\n{c['rows_failed']} failed", style="red")
        table.add_row(
            Text(c["label"]),
            Text(c["model"]),
            _status_text(c["status"]),
            rows,
            speed,
        )
    return table


def _print_summary(cli: Cli, state: State, catalog: dict[str, dict[str, Any]]) -> None:
    """Metrics, errors, paired verdicts, the judge ranking, the status and the links."""
    console = cli.console
    table = metrics_table(state, catalog)
    if table is not None:
        console.print()
        console.print(table)
    if state.get("error"):
        console.print(Text(f"Error: {state['error']}", style="red"))
    for c in state["candidates"]:
        if c.get("error"):
            console.print(Text(f"{c['label']} failed: {c['error']}", style="red"))
    console.print()
    console.print(verdicts(state))
    ranking = state.get("judge_ranking")
    if ranking:
        console.print()
        console.print(judge_ranking_table(ranking))
    console.print()
    console.print(Text.assemble(("Status ", "bold"), _status_text(state["status"])))
    _print_links(cli, state)


def verdicts(state: State) -> RenderableType:
    pairwise = state.get("pairwise") or []
    decided = [p for p in pairwise if p.get("better")]
    if decided:
        return Group(
            Text("Paired verdicts (95% paired-bootstrap interval, permutation p-value):", style="bold"),
            *(Text(f"  {p['verdict']}") for p in decided),
        )
    if not pairwise and state["status"] not in FINAL_STATUSES:
        return Text("Paired verdicts come when every candidate has finished.", style="dim")
    if not pairwise:
        return Text("No paired verdicts: fewer than two candidates have scores to compare.")
    return Text(
        "No paired verdict: no metric separates the candidates beyond noise on these rows "
        "(paired tests, 5% level)."
    )


def judge_ranking_table(ranking: State) -> Table:
    table = Table(
        title=f"Judge ranking (Bradley-Terry over {ranking['verdicts']} verdicts by {ranking['judge']})",
        title_justify="left",
        title_style="bold",
        header_style="bold",
    )
    table.add_column("rank", justify="right")
    table.add_column("candidate")
    table.add_column("strength", justify="right")
    table.add_column("wins / ties / losses", justify="right")
    for entry in ranking["ranking"]:
        table.add_row(
            str(entry["rank"]),
            Text(entry["label"]),
            f"{entry['strength']:.2f}",
            f"{entry['wins']} / {entry['ties']} / {entry['losses']}",
        )
    return table


def _print_links(cli: Cli, state: State, *, indent: str = "") -> None:
    cid = state["id"]
    links = []
    mlflow_url = (state.get("mlflow") or {}).get("url")
    if mlflow_url:
        links.append(("MLflow", mlflow_url))
    links += [
        ("web page", _web_url(cli, cid)),
        ("API", f"{cli.url}/v1/comparisons/{cid}"),
    ]
    for name, url in links:
        # Not wrapped by Rich, so that a long URL stays one piece to copy or click.
        cli.console.print(Text.assemble((f"{indent}{name:<10}", "bold"), url), soft_wrap=True)


# ---------------------------------------------------------------- keys (operators)
keys_app = typer.Typer(
    help="API keys, for operators: they talk to the service's Redis (REDIS_URL, KEY_PREFIX), not "
    "to the API, so run them where the service runs (e.g. `docker compose exec api llm-compare keys …`).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@contextmanager
def _key_store(cli: Cli) -> Iterator[ComparisonStore]:
    """The store the keys live in (Redis at REDIS_URL); exit 3 when it cannot be reached."""
    settings = get_settings()
    try:
        yield ComparisonStore.from_url(settings.redis_url, prefix=settings.key_prefix)
    except redis.RedisError as exc:
        cli.fail(ExitCode.unreachable, "unavailable", f"Cannot reach Redis at REDIS_URL: {exc}")


def _key_row(record: KeyRecord) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "role": record.role.value,
        "created_at": record.created_at,
        "last_used_at": record.last_used_at,
        "revoked_at": record.revoked_at,
        "quotas": {k: v for k, v in asdict(record.quotas).items() if v is not None},
    }


@keys_app.command("create")
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option("--name", help="Who owns what the key submits, usually a team.")],
    role: Annotated[Role, typer.Option("--role", help="reader, submitter or admin.")] = Role.submitter,
    submissions_per_minute: Annotated[
        int | None, typer.Option(min=1, help="Instead of RATE_LIMIT_SUBMISSIONS_PER_MINUTE for this key.")
    ] = None,
    max_running: Annotated[
        int | None, typer.Option(min=1, help="Instead of MAX_RUNNING_COMPARISONS for this key.")
    ] = None,
) -> None:
    """Create a key and print it, once: only its hash is stored."""
    cli = _cli(ctx)
    with _key_store(cli) as store:
        try:
            record, key = issue_key(
                store,
                name=name,
                role=role,
                quotas=Quotas(submissions_per_minute=submissions_per_minute, max_running=max_running),
            )
        except ValueError as exc:
            cli.fail(ExitCode.invalid, "invalid_request", str(exc))
    if cli.json:
        cli.emit({**_key_row(record), "key": key})
        return
    cli.console.print(
        Text.assemble("Created key ", (record.id, "bold"), f" for {record.name} ({record.role.value}):")
    )
    cli.console.print(Text(key, style="bold green"), soft_wrap=True)
    cli.console.print(
        Text("It is shown this once; store it now (LLM_COMPARE_KEY for the command line).", style="dim")
    )


@keys_app.command("list")
def keys_list(ctx: typer.Context) -> None:
    """Every key: id, name, role, when created and last used, revoked or not. Never the keys."""
    cli = _cli(ctx)
    with _key_store(cli) as store:
        records = store.api_keys()
    if cli.json:
        cli.emit([_key_row(r) for r in records])
        return
    table = _plain_table()
    for column in ("id", "name", "role", "created", "last used", "state"):
        table.add_column(column)
    for record in records:
        table.add_row(
            record.id,
            Text(record.name),
            record.role.value,
            _when(record.created_at, compact=True),
            _when(record.last_used_at, compact=True) if record.last_used_at else Text("never", style="dim"),
            Text("revoked", style="red") if record.revoked_at else Text("active", style="green"),
        )
    cli.console.print(table)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(metavar="KEY_ID")]) -> None:
    """Revoke a key at once: its next request gets a 401."""
    cli = _cli(ctx)
    with _key_store(cli) as store:
        revoked = store.revoke_api_key(key_id)
    if not revoked:
        cli.fail(
            ExitCode.not_succeeded,
            "not_found",
            f"No active key with id {key_id!r} (see `llm-compare keys list`)",
        )
    if cli.json:
        cli.emit({"id": key_id, "revoked": True})
    else:
        cli.console.print(Text.assemble("Revoked key ", (key_id, "bold")))


def main() -> None:
    app(prog_name="llm-compare")
