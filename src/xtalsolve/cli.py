"""Command-line interface: parse, call the library, print. No science lives here."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from xtalsolve.errors import XtalsolveError

app = typer.Typer(
    name="xtalsolve",
    help="Crystal structures from nanocrystal powder patterns; local coordination from near-edge spectra.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class XUnit(str, Enum):
    two_theta = "2theta"
    q = "q"
    r = "r"


# Options shared by every command that reads a pattern.
WavelengthOpt = Annotated[
    Optional[float], typer.Option("--wavelength", help="Wavelength in angstrom (when the file does not state it).")
]
RadiationOpt = Annotated[
    Optional[str], typer.Option("--radiation", help="CuKa, CuKa1, MoKa, CoKa, AgKa, CrKa or FeKa.")
]
XUnitOpt = Annotated[Optional[XUnit], typer.Option("--x-unit", help="x column unit for files that do not say.")]


def load_pattern_option(path: Path, wavelength, radiation, x_unit):
    """Read a pattern file with the three shared options applied."""
    from xtalsolve.io import read_pattern

    return read_pattern(
        path, wavelength=wavelength, radiation=radiation, x_unit=None if x_unit is None else x_unit.value
    )


@app.command()
def info(
    pattern: Annotated[Path, typer.Argument(help="Pattern file (.xy .xye .dat .csv .xrdml .fxye .gsa .cif .gr).")],
    wavelength: WavelengthOpt = None,
    radiation: RadiationOpt = None,
    x_unit: XUnitOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Print what was read from a pattern file; exit 0 when it is good, 2 when it is not."""
    summary = load_pattern_option(pattern, wavelength, radiation, x_unit).summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=str(pattern))
    for key, value in summary.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)


spectra_app = typer.Typer(help="Near-edge spectra: training data generation.", no_args_is_help=True)
app.add_typer(spectra_app, name="spectra")


@spectra_app.command("generate")
def spectra_generate(
    out: Annotated[Path, typer.Option("--out", help="Cache directory (one .npz + .json per spectrum).")],
    absorber: Annotated[str, typer.Option("--absorber", help="Absorbing element.")] = "Si",
    ligand: Annotated[str, typer.Option("--ligand", help="First-shell element.")] = "O",
    sources: Annotated[str, typer.Option("--sources", help="Comma list of zeolites, mp, amcsd.")] = "zeolites,mp,amcsd",
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most this many clusters.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Parallel FEFF runs.")] = 1,
    perturbed: Annotated[int, typer.Option("--perturbed", help="Perturbed copies per site.")] = 3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (for logs).")] = False,
):
    """Compute FEFF10 XANES of absorber-centred clusters (cached by input hash, resumable)."""
    from xtalsolve.local.dataset import check_absorber, generate

    result = generate(out, check_absorber(absorber), check_absorber(ligand), tuple(sources.split(",")), limit,
                      workers, perturbed, seed, progress=not no_progress)
    typer.echo(json.dumps(result))


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit status 2."""
    try:
        app()
    except XtalsolveError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
