"""Outputs of a refinement: CIF with esd's, summary.json and the Rietveld plot (observed, calculated,
difference, reflection ticks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pymatgen.core.operations import SymmOp

from xtalsolve.refine.parameters import format_esd
from xtalsolve.refine.recipe import PhaseResult, RefinementResult

COORDINATE_DECIMALS = 5  # rounding error <= 5e-6, within pymatgen's CIF site tolerance (1e-4) after symmetry


def cif_text(result: RefinementResult, name: str = "refined", phase: PhaseResult | None = None) -> str:
    """CIF of a refined phase (default: the first): space group with its operations, cell and independent sites
    with esd's, isotropic B, the phase's weight fraction when there are several, and the fit statistics."""
    phase = phase or (result.phases[0] if result.phases else result)
    symmetry = phase.symmetry
    lines = [f"data_{name}", "_audit_creation_method 'xtalsolve refine'",
             f"_chemical_formula_sum '{phase.structure.composition.formula}'",
             f"_symmetry_space_group_name_H-M '{symmetry.symbol}'", f"_symmetry_Int_Tables_number {symmetry.number}"]
    for key, value, esd in zip(("length_a", "length_b", "length_c", "angle_alpha", "angle_beta", "angle_gamma"),
                               phase.cell, phase.cell_esd):
        lines.append(f"_cell_{key} {format_esd(float(value), float(esd) if esd > 0 else None)}")
    lines.append(f"_cell_volume {phase.structure.lattice.volume:.4f}")
    if len(result.phases) > 1:
        lines.append(f"_pd_phase_mass_% {format_esd(100 * phase.weight_fraction, 100 * phase.weight_fraction_esd or None)}")
    lines += [f"_pd_proc_ls_prof_R_factor {result.rp:.5f}", f"_pd_proc_ls_prof_wR_factor {result.rwp:.5f}",
              f"_pd_proc_ls_prof_wR_expected {result.r_expected:.5f}", f"_refine_ls_goodness_of_fit_all {result.gof:.4f}"]
    if phase.r_bragg is not None:
        lines.append(f"_refine_ls_R_I_factor {phase.r_bragg:.5f}")
    lines += ["", "loop_", "_symmetry_equiv_pos_as_xyz"]
    seen = set()
    for rot, trans in zip(symmetry.rotations, symmetry.translations):
        xyz = SymmOp.from_rotation_and_translation(rot, trans % 1.0).as_xyz_str()
        if xyz not in seen:
            seen.add(xyz)
            lines.append(f"  '{xyz}'")
    lines += ["", "loop_", "_atom_site_label", "_atom_site_type_symbol", "_atom_site_fract_x", "_atom_site_fract_y",
              "_atom_site_fract_z", "_atom_site_occupancy", "_atom_site_B_iso_or_equiv"]
    if phase.sites:
        for site in phase.sites:
            # five decimals at least, whatever the esd: a site on a special position such as (x, 2x, z) written
            # as 0.1666(4), 0.3331(8) is no longer on it, and readers expand it into extra atoms
            coords = [format_esd(v % 1.0, e if e > 1e-12 else None, min_decimals=COORDINATE_DECIMALS)
                      for v, e in zip(site["frac"], site["frac_esd"])]
            biso = format_esd(site["biso"], site["biso_esd"]) if site["biso"] is not None else "0.5"
            for k, (species, occ) in enumerate(site["species"].items()):
                label = site["label"] if k == 0 else f"{site['label']}_{k}"
                element = "".join(c for c in species if c.isalpha())
                lines.append(f"  {label} {element} {' '.join(coords)} {occ:.4f} {biso}")
    else:  # Le Bail: no atoms were refined; keep the starting model for reference
        for i, site in enumerate(phase.structure):
            for species, occ in site.species.items():
                x, y, z = site.frac_coords
                lines.append(f"  {species.symbol}{i + 1} {species.symbol} {x:.5f} {y:.5f} {z:.5f} {occ:.4f} 0.5")
    return "\n".join(lines) + "\n"


def _plain(value):
    """JSON-safe copy (numpy scalars and arrays to Python)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def plot_fit(result: RefinementResult, path: str | Path, title: str | None = None) -> None:
    """Rietveld plot: observed (dots), calculated (line), difference (below) and one row of reflection ticks
    per phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, yo, yc = result.x, result.y_obs, result.y_calc
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    ax.plot(x, yo, ".", ms=2, color="tab:red", label="observed")
    ax.plot(x, yc, "-", lw=0.8, color="black", label="calculated")
    ax.plot(x, result.background, "-", lw=0.6, color="tab:green", label="background")
    span = float(np.nanmax(yo) - np.nanmin(yo)) or 1.0
    tick_y = np.nanmin(yo) - 0.05 * span
    rows = [(p.name, p.ticks) for p in result.phases] if result.phases else [("reflections", result.ticks)]
    colours = ("tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:olive", "tab:cyan")
    for k, (label, ticks) in enumerate(rows):
        if k:
            tick_y -= 0.05 * span
        ax.plot(ticks, np.full(len(ticks), tick_y), "|", ms=8, color=colours[k % len(colours)],
                label=label if len(rows) > 1 else "reflections")
    diff = yo - yc
    offset = tick_y - 0.08 * span - np.nanmax(diff)
    ax.plot(x, diff + offset, "-", lw=0.6, color="tab:gray", label="difference")
    for lo, hi in _excluded_runs(x, result.mask):
        ax.axvspan(lo, hi, color="0.9", zorder=0)
    ax.set_xlabel("2theta (degrees)")
    ax.set_ylabel("intensity")
    ax.set_xlim(x.min(), x.max())
    if title is None and len(result.phases) > 1:
        title = " + ".join(f"{p.name} {100 * p.weight_fraction:.1f} wt%" for p in result.phases)
        title += f": Rwp {100 * result.rwp:.2f} %, GoF {result.gof:.2f}"
    ax.set_title(title or f"{result.structure.composition.reduced_formula} {result.space_group}: "
                 f"Rwp {100 * result.rwp:.2f} %, GoF {result.gof:.2f}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _excluded_runs(x, mask):
    runs, start = [], None
    for xi, keep in zip(x, mask):
        if not keep and start is None:
            start = xi
        if keep and start is not None:
            runs.append((start, xi))
            start = None
    if start is not None:
        runs.append((start, x[-1]))
    return runs


def write_outputs(result: RefinementResult, out_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """DIR/refined.cif (one phase) or DIR/refined_<phase>.cif per phase, DIR/summary.json and DIR/fit.png;
    returns their paths (keys cif or cif_<phase>, summary, plot)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if len(result.phases) > 1:
        for phase in result.phases:
            paths[f"cif_{phase.name}"] = out / f"refined_{phase.name}.cif"
            paths[f"cif_{phase.name}"].write_text(cif_text(result, f"refined_{phase.name}", phase))
    else:
        paths["cif"] = out / "refined.cif"
        paths["cif"].write_text(cif_text(result))
    paths |= {"summary": out / "summary.json", "plot": out / "fit.png"}
    summary = result.summary() | (extra or {})
    paths["summary"].write_text(json.dumps(_plain(summary), indent=2))
    plot_fit(result, paths["plot"])
    return paths
