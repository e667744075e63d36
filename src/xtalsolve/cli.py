"""Command-line interface: parse, call the library, print. No science lives here."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
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


def load_pattern_option(path: Path, wavelength, radiation, x_unit, require_wavelength: bool = False):
    """Read a pattern file with the three shared options applied.

    require_wavelength: for commands that work in Q; 2theta data with no wavelength are then an error.
    """
    from xtalsolve.io import read_pattern

    return read_pattern(
        path,
        wavelength=wavelength,
        radiation=radiation,
        x_unit=None if x_unit is None else x_unit.value,
        require_wavelength=require_wavelength,
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
    data = load_pattern_option(pattern, wavelength, radiation, x_unit)
    summary = data.summary()
    summary["format"] = data.meta.get("format")
    summary["wavelength_source"] = data.meta.get("wavelength_source")
    if "wavelengths_A" in data.meta:
        summary["wavelengths_A"] = data.meta["wavelengths_A"]  # Kalpha1, Kalpha2
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=str(pattern))
    for key, value in summary.items():
        if key == "wavelength_A" and value is None:
            value = "unknown" if data.unit == "2theta" else "not needed"
        table.add_row(key, f"{value:.7g}" if isinstance(value, float) else str(value))
    Console().print(table)


spectra_app = typer.Typer(help="Near-edge spectra: FEFF training data, libraries, model training and evaluation.",
                          no_args_is_help=True)
app.add_typer(spectra_app, name="spectra")


@spectra_app.command("generate")
def spectra_generate(
    out: Annotated[Path, typer.Option("--out", help="Cache directory (one .npz + .json per spectrum).")],
    absorber: Annotated[str, typer.Option("--absorber", help="Absorbing element.")] = "Si",
    ligand: Annotated[str, typer.Option("--ligand", help="First-shell element.")] = "O",
    sources: Annotated[str, typer.Option("--sources", help="Comma list of zeolites, mp, amcsd.")] = "zeolites,mp,amcsd",
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most this many clusters.")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Parallel FEFF runs.")] = 1,
    perturbed: Annotated[int, typer.Option("--perturbed", help="Perturbed copies per site.")] = 4,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    max_z: Annotated[Optional[int], typer.Option("--max-z", help="Skip crystals with heavier elements.")] = None,
    min_cn: Annotated[int, typer.Option("--min-cn", help="Only sites with at least this many first-shell ligands "
                                                         "(5: five- and six-fold Si).")] = 0,
    max_cn: Annotated[Optional[int], typer.Option("--max-cn", help="Only sites with at most this many first-shell "
                                                                   "ligands (4: tetrahedral Fe).")] = None,
    splits: Annotated[str, typer.Option("--splits", help="Comma list of the material splits to compute (train: "
                                                         "more training data, held-out sets unchanged).")]
    = "train,val,test",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar (for logs).")] = False,
):
    """Compute FEFF10 XANES of absorber-centred clusters (cached by input hash, resumable)."""
    from xtalsolve.local.dataset import check_absorber, generate

    result = generate(out, check_absorber(absorber), check_absorber(ligand), tuple(sources.split(",")), limit,
                      workers, perturbed, seed, max_z=max_z, progress=not no_progress, min_cn=min_cn,
                      max_cn=max_cn, splits=tuple(x for x in splits.split(",") if x))
    typer.echo(json.dumps(result))


@app.command("local")
def local(
    spectrum: Annotated[Path, typer.Argument(help="Near-edge spectrum: two-column energy (eV) / mu text, XDI, or "
                                             "EELS (.dm3, .dm4, .msa; ELNES).")],
    absorber: Annotated[str, typer.Option("--absorber", help="Absorbing element, e.g. Si or Fe.")] = "Si",
    edge: Annotated[str, typer.Option("--edge", help="Absorption edge (K, L3, ...).")] = "K",
    samples: Annotated[int, typer.Option("--samples", help="Clusters to sample.")] = 8,
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("local_out"),
    ligand: Annotated[str, typer.Option("--ligand", help="First-shell element.")] = "O",
    library: Annotated[Optional[Path], typer.Option("--library", help="Template library (.npz or cache dir).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Diffusion checkpoint (.pt).")] = None,
    method: Annotated[str, typer.Option("--method", help="auto (the diffusion model where one is packaged for "
                                        "the absorber and edge, e.g. Si K; else template matching), diffusion or "
                                        "template.")] = "auto",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    broaden: Annotated[float, typer.Option("--broaden", help="Gaussian FWHM (eV) applied to the computed "
                                           "templates, for measured spectra.")] = 0.0,
    align: Annotated[Optional[bool], typer.Option("--align/--no-align", help="Fit one energy shift, "
                                                  "energy-scale stretch and broadening (--broaden fixes it) of the "
                                                  "computed templates to the spectrum; template matching then "
                                                  "matches the aligned templates (on by default), the diffusion "
                                                  "model gets the spectrum on the computed energy axis (off by "
                                                  "default; measured spectra need it).")
                     ] = None,
    kind: Annotated[Optional[str], typer.Option("--kind", help="xas or eels (ELNES: a power-law background is "
                                                "subtracted first); default eels for .dm3/.dm4/.msa files, else "
                                                "xas.")] = None,
    simulate: Annotated[bool, typer.Option("--simulate", help="Also compute the FEFF10 spectrum of the predicted "
                                           "first shell and compare it with the input (one FEFF run, seconds).")
                        ] = False,
):
    """3D local coordination around the absorber from a near-edge spectrum (summary.json, .xyz, plot)."""
    from xtalsolve.io.spectra import read_spectrum
    from xtalsolve.local.dataset import check_absorber
    from xtalsolve.local.predict import predict_local, write_outputs

    if samples < 1:
        raise XtalsolveError("must be at least 1", "--samples")
    if method != "template":
        import torch

        torch.set_num_threads(1)  # the diffusion graphs are tiny: one thread is much faster on a shared machine
    absorber = check_absorber(absorber)
    spec = read_spectrum(spectrum, absorber, edge, kind)
    if broaden < 0:
        raise XtalsolveError("must be >= 0 eV", "--broaden")
    pred = predict_local(spec, absorber, edge, samples, check_absorber(ligand), library, checkpoint, method, seed,
                         broaden, align)
    if simulate:
        from xtalsolve.local.predict import simulate_prediction

        pred.summary["simulated"] = simulate_prediction(pred)
    write_outputs(pred, spec, out)
    s = pred.summary
    typer.echo(f"{out}: CN {s['coordination_number']} ({s['spread']['coordination_number_agreement']:.0%} of "
               f"{s['samples']} samples), mean {absorber}-{ligand} {s['mean_bond_length_A']} A [{s['method']}]"
               + _mixture_text(s.get("mixture"))
               + (f"; predicted first shell's FEFF10 spectrum: r = {s['simulated']['pearson_r']}" if simulate else ""))


def _mixture_text(mixture: dict | None) -> str:
    """'; linear-combination fit: 33% CN 4, 67% CN 6' when the prediction has such a fit, else ''."""
    if not mixture or not mixture["coordination_number_fractions"]:
        return ""
    parts = [f"{f:.0%} CN {cn}" for cn, f in mixture["coordination_number_fractions"].items()]
    return "; linear-combination fit: " + ", ".join(parts)


@spectra_app.command("library")
def spectra_library(
    cache: Annotated[Path, typer.Option("--cache", help="Cache directory written by `spectra generate`.")],
    out: Annotated[Path, typer.Option("--out", help="Library file (.npz).")],
    absorber: Annotated[str, typer.Option("--absorber")] = "Si",
    edge: Annotated[str, typer.Option("--edge")] = "K",
    ligand: Annotated[str, typer.Option("--ligand", help="First-shell element counted by --min-cn.")] = "O",
    min_cn: Annotated[int, typer.Option("--min-cn", help="Leave out entries with fewer first-shell ligands (4 for "
                                                         "Fe-O: two-fold sites of mixed-anion crystals are not "
                                                         "oxide environments).")] = 0,
    exclude_formula: Annotated[Optional[list[str]], typer.Option(
        "--exclude-formula", help="Leave out every entry of this reduced formula (repeatable), e.g. the materials "
                                  "a measured check is run on.")] = None,
):
    """Collect cached spectra into an edge-aligned feature library (templates and training data)."""
    from xtalsolve.local.dataset import check_absorber
    from xtalsolve.local.library import build_library

    lib = build_library(cache, check_absorber(absorber), edge=edge)
    if min_cn:
        ligand = check_absorber(ligand)
        lib = lib.subset(lib.coordination_numbers(ligand) >= min_cn)
        if len(lib) == 0:
            raise XtalsolveError(f"no entry has {min_cn} or more {ligand} neighbours", cache)
    if exclude_formula:
        lib = lib.without_formulas(exclude_formula)
        if len(lib) == 0:
            raise XtalsolveError("every entry has an excluded formula", cache)
    lib.save(out)
    splits = {k: sum(m.get("split") == k for m in lib.meta) for k in ("train", "val", "test")}
    typer.echo(json.dumps({"spectra": len(lib), **splits, "out": str(out)}))


@spectra_app.command("train")
def spectra_train(
    library: Annotated[Path, typer.Option("--library", help="Library .npz from `spectra library`.")],
    out: Annotated[Path, typer.Option("--out", help="Checkpoint (.pt); resumed when it exists.")],
    epochs: Annotated[int, typer.Option("--epochs")] = 300,
    batch: Annotated[int, typer.Option("--batch")] = 64,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    hidden: Annotated[int, typer.Option("--hidden")] = 96,
    layers: Annotated[int, typer.Option("--layers")] = 4,
    steps: Annotated[int, typer.Option("--steps", help="Diffusion steps.")] = 500,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="torch CPU threads (small graphs: 1 is fastest).")] = 1,
    lr_final: Annotated[Optional[float], typer.Option("--lr-final", help="Cosine decay of the learning rate to this "
                                                                         "value over the epochs.")] = None,
    ema: Annotated[float, typer.Option("--ema", help="EMA decay of the weights (0: none).")] = 0.999,
    init: Annotated[Optional[Path], typer.Option("--init", help="Start from this checkpoint's weights (fine-tuning "
                                                                "on a grown library).")] = None,
    broaden_max: Annotated[float, typer.Option("--broaden-max", help="Resolution augmentation: each spectrum of each "
                                               "batch broadened by a Gaussian of FWHM 0..X eV.")] = 0.0,
):
    """Train the spectrum-conditioned equivariant diffusion model on the library's training split."""
    import torch

    from xtalsolve.local.library import SpectrumLibrary
    from xtalsolve.local.model import EDMConfig, train

    torch.set_num_threads(max(1, threads))

    lib = SpectrumLibrary.load(library)
    train_lib = lib.split("train")
    if len(train_lib) == 0:
        raise XtalsolveError("no training-split spectra", library)
    absorber = train_lib.meta[0].get("absorber", "Si")
    cfg = EDMConfig(hidden=hidden, layers=layers, steps=steps, absorber=absorber)
    if init is not None and not init.exists():
        raise XtalsolveError("no such checkpoint", init)
    if not 0.0 <= ema < 1.0:
        raise XtalsolveError(f"the EMA decay must be in [0, 1), not {ema}", "--ema")
    train(train_lib, cfg, epochs=epochs, batch=batch, lr=lr, seed=seed, checkpoint=out, log=typer.echo, ema=ema,
          lr_final=lr_final, init=init, broaden_eV=broaden_max)
    typer.echo(f"saved {out}")


@spectra_app.command("evaluate")
def spectra_evaluate(
    library: Annotated[Path, typer.Option("--library", help="Library .npz from `spectra library`.")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Diffusion checkpoint.")] = None,
    split: Annotated[str, typer.Option("--split", help="Held-out split to score: val, test, or lomo "
                                       "(leave-one-material-out over the whole library; template matching only).")
                     ] = "test",
    test_library: Annotated[Optional[Path], typer.Option("--test-library", help="Score this library instead "
                                                          "(e.g. the amorphous set).")] = None,
    samples: Annotated[int, typer.Option("--samples")] = 8,
    exafs: Annotated[int, typer.Option("--exafs", help="Also run the EXAFS-style fit, ideal and "
                                       "realistic, on this many held-out entries (one FEFF run each).")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Write the table and JSON here (.md).")] = None,
):
    """Score template matching (and the diffusion model) on held-out spectra; print a Markdown table."""
    from xtalsolve.local.evaluate import evaluate_model, evaluate_template, markdown_table
    from xtalsolve.local.library import SpectrumLibrary

    if checkpoint:
        import torch

        torch.set_num_threads(1)  # tiny graphs: one thread is much faster on a shared machine
    lib = SpectrumLibrary.load(library)
    if split == "lomo":
        from xtalsolve.local.evaluate import evaluate_template_lomo

        absorber = lib.meta[0].get("absorber", "Si")
        table = markdown_table({"template matching, leave-one-material-out (k=5)": evaluate_template_lomo(lib,
                                                                                                          absorber)})
        typer.echo(table)
        if out:
            out.write_text(table + "\n")
        return
    train_lib = lib.split("train")
    test = SpectrumLibrary.load(test_library) if test_library else lib.split(split)
    if len(train_lib) == 0 or len(test) == 0:
        raise XtalsolveError(f"need train and {split} spectra (have {len(train_lib)} and {len(test)})", library)
    absorber = train_lib.meta[0].get("absorber", "Si")
    rows = {"template matching (k=5)": evaluate_template(train_lib, test, absorber)}
    if checkpoint:
        from xtalsolve.local.model import load_model

        model, cfg = load_model(checkpoint)
        rows[f"diffusion ({samples} samples)"] = evaluate_model(model, cfg, test, absorber, samples=samples)
    if exafs > 0:
        from xtalsolve.local.baselines import IDEAL_EXAFS, REALISTIC_EXAFS
        from xtalsolve.local.evaluate import evaluate_exafs, exafs_chis, exafs_reference

        ref = exafs_reference(train_lib, absorber)
        chis = exafs_chis(test, absorber, exafs)
        for name, cond in (("ideal", IDEAL_EXAFS), ("realistic", REALISTIC_EXAFS)):
            rows[f"EXAFS-style fit, {name} ({len(chis)})"] = evaluate_exafs(test, absorber, ref, conditions=cond,
                                                                           chis=chis)
    table = markdown_table(rows)
    typer.echo(table)
    if out:
        out.write_text(table + "\n\n```json\n" + json.dumps(rows, indent=2) + "\n```\n")


ShapeOpt = Annotated[str, typer.Option("--crystallite-shape", help="Size-broadening profile: lorentzian (Scherrer "
                                       "width, Rietveld practice; stands in for a spread of sizes), sphere or cube "
                                       "(the exact profile of spheres (diameter) or cubes (edge) of the "
                                       "crystallite size).")]


@app.command()
def simulate(
    structures: Annotated[list[Path], typer.Argument(help="Structure files (CIF, POSCAR, ...).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory for <name>.xy files.")],
    wavelength: WavelengthOpt = None,
    radiation: RadiationOpt = None,
    two_theta: Annotated[
        Optional[tuple[float, float, float]], typer.Option("--two-theta", help="MIN MAX STEP in degrees.")
    ] = None,
    q: Annotated[Optional[tuple[float, float, float]], typer.Option("--q", help="MIN MAX STEP in 1/angstrom.")] = None,
    r: Annotated[
        Optional[tuple[float, float, float]], typer.Option("--r", help="MIN MAX STEP in angstrom: write the PDF G(r).")
    ] = None,
    size: Annotated[
        Optional[float], typer.Option("--size", help="Crystallite size (Scherrer) or particle diameter, angstrom.")
    ] = None,
    debye: Annotated[
        bool, typer.Option("--debye", help="Finite spherical particle of diameter --size by the Debye equation.")
    ] = False,
    biso: Annotated[
        Optional[float], typer.Option("--biso", help="Isotropic B in angstrom^2 (default 0; 0.5 for a PDF).")
    ] = None,
    neutron: Annotated[bool, typer.Option("--neutron", help="Neutron instead of X-ray scattering.")] = False,
    shape: ShapeOpt = "lorentzian",
):
    """Simulate powder patterns (Bragg or Debye) or PDFs of crystal structures; one <name>.xy per structure."""
    from xtalsolve.io import write_xy
    from xtalsolve.io.structures import read_structure
    from xtalsolve.pattern import Pattern

    if sum(x is not None for x in (two_theta, q, r)) > 1:
        raise XtalsolveError("give one of --two-theta, --q and --r, not both", "--q")
    if debye and size is None:
        raise XtalsolveError("--debye needs the particle diameter --size", "--debye")
    from xtalsolve.radiation import wavelength_from_options

    lam = wavelength_from_options(wavelength, radiation)[0] or 1.54184  # Cu Kalpha when neither is given
    kind = "neutron" if neutron else "xray"
    crystals = [read_structure(path) for path in structures]
    biso = (0.5 if r is not None else 0.0) if biso is None else biso  # PDF peaks need a width
    header = {"radiation": kind, "biso_A2": biso, "generator": "xtalsolve simulate"}
    if r is not None:
        from xtalsolve.physics.pdf import simulate_pdf

        signals = simulate_pdf(crystals, *r, biso=biso, particle_diameter_A=size, radiation=kind)
        grid, unit, lam = r[0] + r[2] * np.arange(signals.shape[1]), "r", None
        header |= {"model": "PDF G(r) (1/angstrom^2)", "particle_diameter_A": "infinite" if size is None else size}
    else:
        from xtalsolve.physics.powder import make_grid, simulate_powder

        two_theta = two_theta if (two_theta is not None or q is not None) else (5.0, 90.0, 0.02)
        grid, unit = make_grid(None if q is not None else two_theta, q)
        if debye:
            from xtalsolve.physics.debye import simulate_nanoparticle

            signals = simulate_nanoparticle(crystals, size, lam, two_theta, q, biso=biso, radiation=kind)
            header |= {"model": "Debye scattering equation", "particle_diameter_A": size}
        else:
            from rich.console import Console

            # the compiled model's kernels are built on the first run after installation (~16 s), then cached
            with Console(stderr=True).status(f"simulating {len(crystals)} pattern(s)"):
                signals = simulate_powder(crystals, lam, two_theta, q, size=size, biso=biso, radiation=kind,
                                          shape=shape)
            header |= {"model": "Bragg, Thompson-Cox-Hastings pseudo-Voigt, Caglioti W = 0.0025 deg^2",
                       "crystallite_size_A": "infinite" if size is None else size}
            if size is not None:
                header["crystallite_shape"] = shape
                if shape != "lorentzian":
                    header["model"] = (f"Bragg, exact {shape} size profile convolved with the instrument's "
                                       f"pseudo-Voigt (Caglioti W = 0.0025 deg^2)")
    out.mkdir(parents=True, exist_ok=True)
    for path, crystal, y in zip(structures, crystals, signals):
        sigma = np.ones_like(y) if unit == "r" else np.sqrt(np.maximum(y, 0.0))
        pattern = Pattern(grid, y, sigma, unit, lam, str(path))
        extra = {"structure": str(path), "formula": crystal.composition.reduced_formula}
        target = write_xy(pattern, out / f"{path.stem}.xy", extra | header, sigma=False)
        typer.echo(f"wrote {target}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Output directory.")] = Path("xtalsolve-demo"),
    sizes: Annotated[bool, typer.Option("--sizes", help="Instead: simulate the bundled anatase at several "
                                                        "crystallite sizes and plot them (forward model only).")] = False,
    samples: Annotated[int, typer.Option("--samples", help="Candidates to draw.")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
):
    """Solve the bundled nanocrystal pattern (rock-salt NaCl, 60 A crystallites, Cu Ka1) from its formula alone
    with the shipped model, and check the answer against the reference structure."""
    from importlib import resources

    if sizes:
        _demo_sizes(out)
        return
    from pymatgen.analysis.structure_matcher import StructureMatcher

    from xtalsolve.io import read_pattern
    from xtalsolve.io.structures import read_structure

    examples = resources.files("xtalsolve.resources").joinpath("examples")
    with resources.as_file(examples.joinpath("NaCl_nano_CuKa1.xy")) as path:
        data = read_pattern(path)
    with resources.as_file(examples.joinpath("NaCl.cif")) as path:
        reference = read_structure(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "NaCl_nano_CuKa1.xy").write_text(examples.joinpath("NaCl_nano_CuKa1.xy").read_text())
    typer.echo("solving the bundled pattern NaCl_nano_CuKa1.xy (formula NaCl, Z unknown)", err=True)
    summary = _solve_and_report(data, "NaCl", out, None, samples=samples, seed=seed, size_hint=None, natoms=None,
                                steps=100, guided=True)
    best = read_structure(out / summary["candidates"][0]["cif"])
    loose = StructureMatcher(ltol=0.3, stol=0.5, angle_tol=10)
    strict = StructureMatcher()
    verdict = ("matches the reference (pymatgen StructureMatcher, default tolerances)" if strict.fit(best, reference)
               else "matches the reference at loose tolerances only" if loose.fit(best, reference)
               else "does NOT match the reference")
    rms = strict.get_rms_dist(best, reference) if strict.fit(best, reference) else None
    summary["reference_check"] = {"reference": "NaCl.cif (bundled)", "verdict": verdict,
                                  "rms_normalised": None if rms is None else float(rms[0])}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    typer.echo(f"rank 1 {verdict}; a = {best.lattice.a:.4f} A (reference {reference.lattice.a:.4f} A); "
               f"see {out / 'rank01.cif'}, {out / 'fit.png'}, {out / 'summary.json'}")


def _demo_sizes(out: Path) -> None:
    """The forward-model demo: the bundled anatase TiO2 as nanocrystals of several sizes, patterns and a plot."""
    from importlib import resources

    from xtalsolve.io import write_xy
    from xtalsolve.io.structures import read_structure
    from xtalsolve.pattern import Pattern
    from xtalsolve.physics.powder import make_grid, simulate_powder
    from xtalsolve.plots import plot_patterns

    example = resources.files("xtalsolve.resources").joinpath("examples/anatase_TiO2.cif")
    with resources.as_file(example) as path:
        crystal = read_structure(path)
    sizes = [10.0, 30.0, 100.0, 1000.0]
    two_theta = (10.0, 80.0, 0.02)
    grid, unit = make_grid(two_theta)
    patterns = [simulate_powder([crystal], 1.54184, two_theta, size=size, biso=0.5)[0] for size in sizes]
    out.mkdir(parents=True, exist_ok=True)
    for size, y in zip(sizes, patterns):
        pattern = Pattern(grid, y, np.sqrt(np.maximum(y, 0.0)), unit, 1.54184, "anatase_TiO2.cif")
        header = {"structure": "anatase TiO2 (bundled)", "crystallite_size_A": size, "biso_A2": 0.5}
        write_xy(pattern, out / f"anatase_D{size:g}A.xy", header, sigma=False)
    figure = plot_patterns(grid, patterns, [f"D = {s:g} A" for s in sizes], out / "anatase_sizes.png",
                           title="Anatase TiO2 nanocrystals, Cu Ka")
    typer.echo(f"wrote {len(sizes)} patterns and {figure}")


@app.command()
def refine(
    pattern: Annotated[Path, typer.Argument(help="Powder pattern file (2theta).")],
    structures: Annotated[list[Path], typer.Argument(help="Starting structure(s) (CIF), one per phase.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder: refined.cif (refined_<phase>.cif per phase), "
                                                    "summary.json, fit.png.")],
    wavelength: WavelengthOpt = None,
    radiation: RadiationOpt = None,
    x_unit: XUnitOpt = None,
    lebail: Annotated[bool, typer.Option("--lebail", help="Le Bail fit (cell and space group only).")] = False,
    background: Annotated[Optional[int], typer.Option("--background", help="Chebyshev background terms (default: one "
                                                                            "per 5 degrees of range, 8-24).")] = None,
    symprec: Annotated[float, typer.Option("--symprec", help="Symmetry tolerance (angstrom).")] = 0.05,
    displacement: Annotated[bool, typer.Option("--displacement/--no-displacement",
                                               help="Refine sample displacement.")] = True,
    asymmetry: Annotated[int, typer.Option("--asymmetry", help="Berar-Baldinozzi asymmetry terms refined (0, 2, 4).")] = 0,
    texture: Annotated[str, typer.Option("--texture", help="March-Dollase preferred orientation: none, auto (search "
                                                           "the low-index axes, keep one that clearly helps) or an "
                                                           "axis h,k,l.")] = "none",
    early_b: Annotated[bool, typer.Option("--early-b/--no-early-b", help="Also run the cell stage with the "
                                          "displacement parameters B free and keep the lower Rwp (a strong "
                                          "intensity fall-off otherwise misleads the early stages).")] = True,
):
    """Rietveld (or Le Bail) refinement of one or more phases against a measured pattern, in stages."""
    import warnings

    import torch
    from pymatgen.core import Structure
    from rich.console import Console

    from xtalsolve import refine as engine
    from xtalsolve.refine.report import write_outputs

    torch.set_num_threads(1)  # small tensors: one thread is fastest and leaves the other cores free
    data = load_pattern_option(pattern, wavelength, radiation, x_unit)
    start = []
    for structure in structures:
        if not structure.exists():
            raise XtalsolveError("no such file", structure)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                start.append(Structure.from_file(structure))
        except Exception as err:  # pymatgen raises many kinds for a bad CIF
            raise XtalsolveError(f"cannot read the structure: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
                                 structure) from err
    texture_option = _texture_option(texture)
    if lebail and texture_option is not None:
        raise XtalsolveError("a Le Bail fit has free intensities, so texture does not apply", "--texture")
    console = Console(stderr=True)
    progress = lambda s: console.print(f"{s['stage']:<28} Rwp {100 * s['rwp']:6.2f} %  ({s['n_free']} free, {s['seconds']:.0f} s)"  # noqa: E731
                                       + ("  B released" if s.get("biso_released") else ""))
    instrument = engine.instrument_of(data, radiation)
    options = dict(n_background=background, symprec=symprec, progress=progress, asymmetry=asymmetry,
                   names=[p.stem for p in structures] if len(structures) > 1 else None)
    if lebail:
        result = engine.lebail(data, start, instrument, **options)
    else:
        result = engine.refine(data, start, instrument, displacement=displacement, texture=texture_option,
                               early_biso=early_b, **options)
    paths = write_outputs(result, out)
    typer.echo(json.dumps({"rwp": result.rwp, "rp": result.rp, "gof": result.gof, "r_bragg": result.r_bragg,
                           "weight_fractions": {p.name: p.weight_fraction for p in result.phases},
                           "outputs": {k: str(v) for k, v in paths.items()}}))


def _texture_option(text: str):
    """--texture: none -> None, auto -> "auto", h,k,l -> an axis tuple."""
    value = text.strip().lower()
    if value in ("none", "auto"):
        return None if value == "none" else "auto"
    try:
        axis = tuple(int(v) for v in value.split(","))
    except ValueError:
        axis = ()
    if len(axis) != 3 or not any(axis):
        raise XtalsolveError(f"must be none, auto or an axis h,k,l such as 0,0,1, not {text!r}", "--texture")
    return axis


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", help="Training config (.json or .yaml), e.g. configs/small_cpu.json.")],
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Override the config's run folder.")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", help="Override the number of steps.")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Train on the first N pool structures (smoke runs).")] = None,
    time_limit: Annotated[Optional[float], typer.Option("--time-limit", help="Stop after this many seconds, "
                                                        "checkpointed; the same command resumes.")] = None,
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Train on a folder written by --export-data "
                                                     "(no shared data or pymatgen needed).")] = None,
    export_data: Annotated[Optional[Path], typer.Option("--export-data", help="Only parse the config's training and "
                                                        "validation sets into this folder, then stop.")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
):
    """Train (or resume) the pattern-conditioned crystal diffusion model; checkpoints and log.jsonl in the run folder."""
    from xtalsolve.diffusion.train import export_training_data, load_config
    from xtalsolve.diffusion.train import train as run_training

    cfg = load_config(config, run_dir=None if run_dir is None else str(run_dir), steps=steps, limit=limit,
                      time_limit_s=time_limit, data_dir=None if data_dir is None else str(data_dir))
    if export_data is not None:
        typer.echo(json.dumps(export_training_data(cfg, export_data, workers=max(os.cpu_count() or 1, 1))))
        return
    summary = run_training(cfg, progress=progress, log=lambda line: typer.echo(line, err=True))
    typer.echo(json.dumps(summary))


@app.command()
def solve(
    pattern: Annotated[Path, typer.Argument(help="Measured powder pattern.")],
    formula: Annotated[str, typer.Option("--formula", help="Chemical formula, e.g. TiO2 (Z is found from the data).")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (resumes a killed run).")],
    checkpoint: Annotated[Optional[Path], typer.Option("--checkpoint", help="Trained diffusion model (default: the "
                                                       "shipped gpu_mp20_ft.pt).")] = None,
    wavelength: WavelengthOpt = None,
    radiation: RadiationOpt = None,
    x_unit: XUnitOpt = None,
    samples: Annotated[int, typer.Option("--samples", help="Candidates to draw; each is fitted, the best refined.")] = 32,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    size_hint: Annotated[Optional[float], typer.Option("--size-hint", help="Crystallite size, angstrom.")] = None,
    natoms: Annotated[Optional[int], typer.Option("--natoms", help="Atoms in the cell (skips the Z search).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Reverse diffusion steps.")] = 100,
    no_guidance: Annotated[bool, typer.Option("--no-guidance", help="Conditioning only, no data guidance.")] = False,
    generator: Annotated[str, typer.Option("--generator", help="Candidate source: prototype (structure types of "
                                           "training crystals with the elements substituted, then random "
                                           "symmetric crystals; measured best), symmetric (random crystals in "
                                           "space groups drawn from the training prior), diffusion (the guided "
                                           "model), both (half diffusion, half symmetric) or "
                                           "prototype+diffusion (half each; the model reaches types no library "
                                           "holds).")] = "prototype",
    fill: Annotated[str, typer.Option("--fill", help="What the prototype generator draws once its library runs "
                                      "out for a cell: symmetric, diffusion (the guided model) or "
                                      "both.")] = "symmetric",
    rank_by: Annotated[str, typer.Option("--rank-by", help="Order of the refined candidates: rwp (Rietveld), fit "
                                         "(the restrained fit every candidate gets: fixed instrument, size and "
                                         "displacement), both (the geometric mean of the two) or auto (fit for "
                                         "very broad patterns; else both with a stated exact "
                                         "--crystallite-shape, rwp otherwise).")] = "auto",
    fit_structure: Annotated[str, typer.Option("--fit-structure", help="What the fit and the refinement change "
                                               "in a candidate: full (cell and coordinates), volume (an isotropic "
                                               "scaling; shape and coordinates kept) or auto (volume when "
                                               "the crystallite size (--size-hint, else estimated from the "
                                               "pattern) leaves too few independent observations, as for 10 A "
                                               "crystallites).")] = "auto",
    shape: ShapeOpt = "lorentzian",
    max_pool: Annotated[int, typer.Option("--max-pool", min=1, help="Each point of the pattern is the maximum over "
                                          "this many equally spaced sub-points of its bin (PXRDnet's 512-point "
                                          "patterns: 8); the calculated pattern is pooled alike. Needs a uniform "
                                          "Q grid.")] = 1,
    restarts: Annotated[int, typer.Option("--restarts", min=0, help="Further fits of each of the best screened "
                                          "candidates from other random trial cells (the fit is multimodal); "
                                          "0: none.")] = 3,
    scan: Annotated[int, typer.Option("--scan", min=0, help="Best distinct fitted candidates with at most six free "
                                      "coordinates whose coordinates are searched (4,096 placements in their "
                                      "space group, cell kept; the fit alone stops in the nearest minimum); "
                                      "0: none.")] = 4,
    refine: Annotated[int, typer.Option("--refine", help="Best distinct fitted candidates refined fully by "
                                        "Rietveld and ranked (each takes seconds to a minute); more can find a "
                                        "right candidate that the fit ranked lower, at that cost.")] = 3,
    library: Annotated[str, typer.Option("--library", help="Prototype library: extended (the types of mp20_train, "
                                         "then further types of MP-20 val/test, MPTS-52, MP-40, AFLOW, WBM and "
                                         "more; the PXRDnet benchmark's crystals left out), mp20 (mp20_train "
                                         "only) or a library file (tools/build_prototype_library.py).")] = "extended",
    second_pass_r_bragg: Annotated[float, typer.Option("--second-pass-r-bragg", min=0, help="When the rank-1 "
                                                       "candidate of a prototype or symmetric run refines to a Bragg "
                                                       "R-factor above this (0.10 = 10 %), draw "
                                                       "--second-pass-samples more from the guided diffusion model "
                                                       "and rank all together; 0: never.")] = 0.10,
    second_pass_samples: Annotated[int, typer.Option("--second-pass-samples", min=1,
                                                     help="Candidates of the second pass.")] = 32,
):
    """Solve a structure: draw candidates (known structure types with substituted elements, random symmetric
    crystals and/or the guided diffusion model), fit and refine them, rank by Rwp priced for free parameters."""
    data = load_pattern_option(pattern, wavelength, radiation, x_unit)
    if max_pool > 1:
        data = dataclasses.replace(data, max_pool=max_pool)
    _solve_and_report(data, formula, out, checkpoint, samples=samples, seed=seed, size_hint=size_hint, natoms=natoms,
                      steps=steps, guided=not no_guidance, generator=generator, rank_by=rank_by, shape=shape,
                      library=library, fit_structure=fit_structure, restarts=restarts, refine=refine, scan=scan,
                      fill=fill, second_pass_r_bragg=second_pass_r_bragg, second_pass_samples=second_pass_samples)


def _solve_and_report(data, formula: str, out: Path, checkpoint: Path | None, *, samples: int, seed: int,
                      size_hint: float | None, natoms: int | None, steps: int, guided: bool,
                      generator: str = "prototype", rank_by: str = "auto", shape: str = "lorentzian",
                      library: str = "extended", fit_structure: str = "auto", restarts: int = 3,
                      refine: int = 3, scan: int = 4, fill: str = "symmetric", second_pass_r_bragg: float = 0.10,
                      second_pass_samples: int = 32) -> dict:
    """Run the solver on a loaded pattern with a progress log on stderr and a one-line result on stdout."""
    import warnings

    import torch
    from rich.console import Console

    from xtalsolve.prototypes import check_library
    from xtalsolve.solve import SolveSettings, diffusion_generator, lazy_generator, make_generator, shipped_checkpoint
    from xtalsolve.solve import solve as run_solve

    if samples < 1:
        raise XtalsolveError("must be at least 1", "--samples")
    checkpoint = checkpoint or shipped_checkpoint()
    needs_model = generator not in ("prototype", "symmetric") or fill != "symmetric"
    # the guided model behind a run without it, drawn from only when nothing fits (SolveSettings.second_pass_r_bragg)
    second_pass = None
    if generator in ("prototype", "symmetric") and second_pass_r_bragg > 0:
        needs_model = True
        second_pass = lazy_generator(lambda: diffusion_generator(checkpoint, data, steps, guided,
                                                                 size_hint_A=size_hint))
    if needs_model and not checkpoint.is_file():
        raise XtalsolveError("no such checkpoint (train one with `xtalsolve train --config configs/small_cpu.json`)",
                             checkpoint)
    settings = SolveSettings(samples=samples, seed=seed, natoms=natoms, size_hint_A=size_hint, rank_by=rank_by,
                             crystallite_shape=shape, fit_structure=fit_structure,
                             restarts=restarts, refine_top=refine, scan_top=scan,
                             second_pass_r_bragg=second_pass_r_bragg,
                             second_pass_samples=second_pass_samples)  # bad values fail here
    check_library(library)
    torch.set_num_threads(1)  # small batches: one thread is as fast and leaves the other cores free
    generate = make_generator(generator, checkpoint, data, steps, guided, size_hint_A=size_hint, library=library,
                              fill=fill)
    console = Console(stderr=True)
    with warnings.catch_warnings():  # pymatgen's note on each CIF read back with coordinates on special positions
        warnings.filterwarnings("ignore", message="Issues encountered while parsing CIF")
        summary = run_solve(data, formula, generate, out, settings, progress=lambda m: console.log(m),
                            second_pass=second_pass)
    best = summary["candidates"][0]
    second = summary["second_pass"]
    typer.echo(f"{out}: rank 1 {best['cif']} Rwp {best['rwp']:.2%} {best['space_group']} "
               f"({len(summary['candidates'])} refined of {len(summary['screened'])} fitted, ranked by "
               f"{summary['ranking']['by']}, {summary['timing_s']:.0f} s)"
               + (f"; second pass from the guided model (library rank 1 R_Bragg "
                  f"{second['rank1_r_bragg_first_pass']:.1%})" if second.get("triggered")
                  and second.get("rank1_r_bragg_first_pass") is not None else ""))
    for caution in summary.get("cautions", []):
        typer.echo(f"caution: {caution}")
    return summary


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
