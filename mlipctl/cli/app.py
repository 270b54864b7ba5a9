"""The `mlipctl` command line: a thin layer over :mod:`mlipctl.commands`.

Exit codes: 0 success; 1 a criterion failed or an internal error (traceback in a log file);
2 bad input (config, files, structures); 3 the command's engine is not available yet;
130 interrupted (rerun with --resume where supported).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer

from mlipctl import __version__

app = typer.Typer(
    name="mlipctl",
    help="Build, validate and use machine-learned interatomic potentials.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

EXIT_OK, EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

ConfigArg = Annotated[
    Path | None, typer.Argument(help="YAML config file (optional where flags suffice).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: KEY.PATH=VALUE (YAML value)."),
]
OutputOpt = Annotated[str | None, typer.Option("--output", "-o", help="Output directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print only the report JSON on stdout.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]error:[/bold red] {message}", markup=True
    )


def _crash_log(exc: BaseException) -> Path:
    base = Path(os.environ.get("MLIPCTL_LOG_DIR", Path(tempfile.gettempdir()) / "mlipctl-logs"))
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    path.write_text(f"mlipctl {__version__}\nargv: {sys.argv}\n\n{text}", encoding="utf-8")
    return path


def _guarded(fn: Any) -> int:
    """Run ``fn`` and map exceptions to one message and an exit code (never a traceback)."""
    from mlipctl.errors import UserInputError

    try:
        return fn()
    except UserInputError as exc:
        _err(str(exc))
        return EXIT_INPUT
    except KeyboardInterrupt:
        _err("interrupted; rerun with --resume to continue where supported")
        return EXIT_INTERRUPTED
    except typer.Exit:
        raise
    except Exception as exc:  # noqa: BLE001 - the user gets a log file, not a traceback
        log = _crash_log(exc)
        _err(f"internal error ({type(exc).__name__}: {exc}); traceback written to {log}")
        return EXIT_FAILED


def _overrides(sets: list[str] | None, **flags: Any) -> dict[str, Any]:
    from mlipctl.config.loader import parse_override

    out: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    for item in sets or []:
        key, value = parse_override(item)
        out[key] = value
    return out


def _calculator(model: Path | None, reference: str | None) -> dict[str, Any] | None:
    from mlipctl.errors import UserInputError

    if model is not None and reference is not None:
        raise UserInputError("give either --model or --reference, not both")
    if model is not None:
        return {"kind": "mlip", "path": str(model)}
    if reference is not None:
        return {"kind": reference}
    return None


def _execute(
    name: str,
    config: Path | None,
    overrides: dict[str, Any],
    *,
    as_json: bool,
    resume: bool = False,
    progress: bool = True,
) -> None:
    def body() -> int:
        from mlipctl import commands
        from mlipctl.reports.render import print_rich

        cfg = commands.load(name, config, overrides)
        report = commands.run(name, cfg, resume=resume, progress=progress and not as_json)
        out = getattr(cfg, "output", None)
        if out is not None:
            report.write(out)
        if as_json:
            sys.stdout.write(report.to_json() + "\n")
        else:
            print_rich(report)
        return EXIT_OK if report.passed else EXIT_FAILED

    raise typer.Exit(_guarded(body))


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        typer.echo(f"mlipctl {__version__}")
        raise typer.Exit(0)


@app.command()
def quickstart(
    config: ConfigArg = None,
    element: Annotated[str | None, typer.Option(help="Element (default Cu).")] = None,
    scale: Annotated[
        str | None,
        typer.Option(help="full (default) or ci (reduced smoke run); env MLIPCTL_QUICKSTART."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Last step: generate, label, fit or validate (default).")
    ] = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """The main job on EMT: generate and label structures, fit an ensemble, validate the vacancy."""
    scale = scale or os.environ.get("MLIPCTL_QUICKSTART") or None
    ov = _overrides(set_, element=element, scale=scale, until=until, output=output)
    _execute("quickstart", config, ov, as_json=as_json, progress=progress)


@app.command()
def generate(
    config: ConfigArg = None,
    element: Annotated[
        str | None, typer.Option(help="Element of a single crystal system (e.g. Cu).")
    ] = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Build candidate structures (strained, rattled, defects, surfaces, MD, amorphous)."""
    systems = [{"kind": "crystal", "element": element}] if element else None
    ov = _overrides(set_, systems=systems, output=output)
    _execute("generate", config, ov, as_json=as_json, progress=progress)


@app.command()
def label(
    config: ConfigArg = None,
    input_: Annotated[
        Path | None, typer.Option("--input", "-i", help="Structure file to label.")
    ] = None,
    reference: Annotated[str | None, typer.Option(help="Reference kind (default emt).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Label on a local process pool of this many workers.")
    ] = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Label structures with a reference (serial, process pool or Dask); resumes by itself."""
    parallel = {"backend": "processes", "workers": workers} if workers else None
    ov = _overrides(
        set_,
        input=str(input_) if input_ else None,
        reference={"kind": reference} if reference else None,
        parallel=parallel,
        output=output,
    )
    _execute("label", config, ov, as_json=as_json, progress=progress)


@app.command()
def fit(
    config: ConfigArg = None,
    data: Annotated[Path | None, typer.Option(help="Training data file (data.path).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted fit.")] = False,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Train a potential (or an ensemble) on labelled structures."""
    ov = _overrides(set_, **{"data.path": str(data) if data else None, "output": output})
    _execute("fit", config, ov, as_json=as_json, resume=resume, progress=progress)


@app.command()
def validate(
    config: ConfigArg = None,
    model: Annotated[Path | None, typer.Option(help="Model file to validate.")] = None,
    defect: Annotated[
        list[str] | None,
        typer.Option(help="Check to run (vacancy, interstitial, divacancy, surface, bulk)."),
    ] = None,
    reference: Annotated[str | None, typer.Option(help="Reference kind (default emt).")] = None,
    element: Annotated[str | None, typer.Option(help="Element (default: the model's).")] = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Check a model against a reference on defect energetics (exit 1 if a criterion fails)."""
    ov = _overrides(
        set_,
        model=str(model) if model else None,
        checks=list(defect) if defect else None,
        reference={"kind": reference} if reference else None,
        output=output,
        **{"crystal.element": element},
    )
    _execute("validate", config, ov, as_json=as_json, progress=progress)


@app.command()
def relax(
    config: ConfigArg = None,
    model: Annotated[Path | None, typer.Option(help="Model file as calculator.")] = None,
    reference: Annotated[str | None, typer.Option(help="Reference calculator kind.")] = None,
    structure: Annotated[Path | None, typer.Option(help="Structure file.")] = None,
    fmax: Annotated[float | None, typer.Option(help="Force tolerance, eV/Å.")] = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Relax a structure (positions, optionally the cell)."""
    ov = _overrides(
        set_,
        calculator=_calculator(model, reference),
        structure={"kind": "file", "path": str(structure)} if structure else None,
        fmax=fmax,
        output=output,
    )
    _execute("relax", config, ov, as_json=as_json, progress=progress)


@app.command()
def neb(
    config: ConfigArg = None,
    model: Annotated[Path | None, typer.Option(help="Model file as calculator.")] = None,
    reference: Annotated[str | None, typer.Option(help="Reference calculator kind.")] = None,
    defect: Annotated[str | None, typer.Option(help="Generate end points: 'vacancy'.")] = None,
    element: Annotated[str | None, typer.Option(help="Element of the generated crystal.")] = None,
    initial: Annotated[Path | None, typer.Option(help="Initial state file.")] = None,
    final: Annotated[Path | None, typer.Option(help="Final state file.")] = None,
    fmax: Annotated[float | None, typer.Option(help="NEB force tolerance, eV/Å.")] = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Climbing-image NEB between two states or for a defect hop."""
    from mlipctl.errors import UserInputError

    endpoints = None
    if defect is not None or element is not None:
        if element is None:
            raise UserInputError("--defect needs --element (e.g. --element Cu)")
        endpoints = {
            "kind": "defect",
            "defect": defect or "vacancy",
            "crystal": {"element": element},
        }
    elif initial is not None or final is not None:
        endpoints = {"kind": "files", "initial": str(initial), "final": str(final)}
    ov = _overrides(
        set_,
        calculator=_calculator(model, reference),
        endpoints=endpoints,
        fmax=fmax,
        output=output,
    )
    _execute("neb", config, ov, as_json=as_json, progress=progress)


@app.command()
def md(
    config: ConfigArg = None,
    model: Annotated[Path | None, typer.Option(help="Model file as calculator.")] = None,
    reference: Annotated[str | None, typer.Option(help="Reference calculator kind.")] = None,
    structure: Annotated[Path | None, typer.Option(help="Starting structure file.")] = None,
    steps: Annotated[int | None, typer.Option(help="Number of steps.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the last checkpoint.")] = False,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Molecular dynamics with on-the-fly monitors."""
    ov = _overrides(
        set_,
        calculator=_calculator(model, reference),
        structure={"kind": "file", "path": str(structure)} if structure else None,
        steps=steps,
        output=output,
    )
    _execute("md", config, ov, as_json=as_json, resume=resume, progress=progress)


@app.command()
def uncertainty(
    config: ConfigArg = None,
    model: Annotated[Path | None, typer.Option(help="Model file.")] = None,
    data: Annotated[Path | None, typer.Option(help="Calibration data file.")] = None,
    output: OutputOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
    progress: ProgressOpt = True,
) -> None:
    """Calibrate ensemble uncertainty and check the domain of applicability."""
    ov = _overrides(
        set_,
        model=str(model) if model else None,
        calibration_data=str(data) if data else None,
        output=output,
    )
    _execute("uncertainty", config, ov, as_json=as_json, progress=progress)


CommandArg = Annotated[str, typer.Argument(help="Subcommand name, e.g. validate.")]


@app.command()
def schema(command: CommandArg) -> None:
    """Print the JSON Schema of a command's config."""

    def body() -> int:
        import json

        from mlipctl.commands import get_command

        model = get_command(command).config_class()
        sys.stdout.write(json.dumps(model.model_json_schema(), indent=2) + "\n")
        return EXIT_OK

    raise typer.Exit(_guarded(body))


@app.command()
def template(command: CommandArg) -> None:
    """Print an annotated example config for a command (it validates)."""

    def body() -> int:
        from mlipctl.commands import get_command
        from mlipctl.config.template import render_template

        cmd = get_command(command)
        sys.stdout.write(render_template(cmd.config_class(), cmd.example))
        return EXIT_OK

    raise typer.Exit(_guarded(body))


def main() -> None:
    """Console-script entry point.

    Flags are turned into config overrides before a command's own guard runs (a bad ``--set``,
    ``--model`` with ``--reference``), so the whole app runs under the same guard.
    """
    raise SystemExit(_guarded(app))


if __name__ == "__main__":  # pragma: no cover
    main()
