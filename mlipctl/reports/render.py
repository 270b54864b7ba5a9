"""Render reports as Markdown and on the terminal with rich."""

from __future__ import annotations

import json
from typing import Any

from mlipctl.reports.base import Report


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, dict | list):
        text = json.dumps(v, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return str(v)


def _scalars(results: dict[str, Any], prefix: str = "", depth: int = 0) -> list[tuple[str, str]]:
    """Flatten nested results to (dotted key, value) rows, two levels deep."""
    rows: list[tuple[str, str]] = []
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth < 2:
            rows.extend(_scalars(v, key + ".", depth + 1))
        else:
            rows.append((key, _fmt(v)))
    return rows


def _terminal_rows(
    results: dict[str, Any], prefix: str = "", depth: int = 0
) -> list[tuple[str, str]]:
    """Numbers, strings and short lists only, three levels deep: a summary fits one screen."""
    rows: list[tuple[str, str]] = []
    for k, v in results.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            if depth < 2:
                rows.extend(_terminal_rows(v, key + ".", depth + 1))
        elif isinstance(v, list | tuple):
            if len(v) <= 4 and all(not isinstance(x, dict | list) for x in v):
                rows.append((key, _fmt(list(v))))
        elif v is not None:
            rows.append((key, _fmt(v)))
    return rows


def verdict(report: Report) -> str:
    if not report.criteria:
        return "done"
    return "PASSED" if report.passed else "FAILED"


def to_markdown(report: Report) -> str:
    lines = [f"# mlipctl {report.command} report", ""]
    lines += [f"- created: {report.created}", f"- verdict: **{verdict(report)}**"]
    if report.environment is not None:
        env = report.environment
        pk = ", ".join(f"{k} {v}" for k, v in env.packages.items())
        lines.append(f"- mlipctl {env.mlipctl}, Python {env.python}, {env.platform}; {pk}")
        if env.devices:
            lines.append(f"- devices: {', '.join(env.devices)}")
    lines.append("")
    if report.criteria:
        lines += ["## Criteria", "", "| criterion | value | threshold | unit | passed |"]
        lines.append("|---|---|---|---|---|")
        for c in report.criteria:
            mark = "yes" if c.passed else "**NO**"
            lines.append(
                f"| {c.name} | {_fmt(c.value)} | {_fmt(c.threshold)} | {c.unit} | {mark} |"
            )
        lines.append("")
    if report.results:
        lines += ["## Results", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in _scalars(report.results)]
        lines.append("")
    if report.timings:
        lines += ["## Timings (s)", "", "| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in report.timings.items()]
        lines.append("")
    if report.messages:
        lines += ["## Messages", ""] + [f"- {m}" for m in report.messages] + [""]
    if report.artifacts:
        lines += ["## Files", ""] + [f"- {k}: `{v}`" for k, v in report.artifacts.items()] + [""]
    lines += [
        "## Config",
        "",
        "```json",
        json.dumps(report.config, indent=2, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)


def print_rich(report: Report, console: Any = None) -> None:
    """A compact terminal summary; the full record is in report.json/report.md."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(stderr=True)
    v = verdict(report)
    style = {"PASSED": "bold green", "FAILED": "bold red"}.get(v, "bold")
    console.print(f"[bold]mlipctl {report.command}[/bold]: [{style}]{v}[/{style}]")
    if report.criteria:
        table = Table(title="Criteria", show_lines=False)
        for col in ("criterion", "value", "threshold", "unit", ""):
            table.add_column(col)
        for c in report.criteria:
            table.add_row(
                c.name,
                _fmt(c.value),
                _fmt(c.threshold),
                c.unit,
                "[green]pass[/green]" if c.passed else "[red]FAIL[/red]",
            )
        console.print(table)
    rows = _terminal_rows(report.results)
    if rows:
        table = Table(title="Results (all of them in report.md)")
        table.add_column("key")
        table.add_column("value")
        for k, val in rows[:30]:
            table.add_row(k, val)
        console.print(table)
    for m in report.messages:
        console.print(f"[yellow]note:[/yellow] {m}")
    if "report_md" in report.artifacts:
        console.print(f"report: {report.artifacts['report_md']}")
