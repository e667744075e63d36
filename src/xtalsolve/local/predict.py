"""Spectrum -> sampled absorber-centred clusters, their consensus first shell, and the output files.

Predictors: the diffusion model (the packaged checkpoint ``data/edm_<absorber>_<edge>.pt`` unless one is given;
the default wherever one exists: the Si K model scores better than template matching on the held-out crystalline
and the amorphous sets, see docs/spectra.md) and template matching over a spectrum library (the default where no
model exists, e.g. Fe K). The method used is written into ``summary.json``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xtalsolve.errors import XtalsolveError
from xtalsolve.io.spectra import XasSpectrum, normalize
from xtalsolve.local.clusters import Cluster, first_shell

DATA_DIR = Path(__file__).parent / "data"


def default_library_path(absorber: str, edge: str) -> Path:
    return DATA_DIR / f"library_{absorber}_{edge}.npz"


def default_checkpoint_path(absorber: str, edge: str) -> Path:
    return DATA_DIR / f"edm_{absorber}_{edge}.pt"


@dataclass
class LocalPrediction:
    method: str
    clusters: list[Cluster]
    summary: dict
    extra: dict = field(default_factory=dict)


def consensus(clusters: list[Cluster], ligand: str = "O") -> dict:
    """Consensus first shell over sampled clusters: modal CN, median sorted bond lengths and angles among the samples
    with that CN, and the spread (CN histogram, standard deviations)."""
    shells = [first_shell(c, ligand) for c in clusters]
    counts = Counter(s.coordination_number for s in shells)
    cn = max(counts, key=lambda c: (counts[c], -c))
    agree = [s for s in shells if s.coordination_number == cn]
    bonds = np.array([s.bond_lengths_A for s in agree]) if cn else np.zeros((len(agree), 0))
    angles = np.array([s.angles_deg for s in agree]) if cn > 1 else np.zeros((len(agree), 0))
    means = np.array([s.mean_bond_length_A for s in shells if s.coordination_number > 0])
    return {
        "coordination_number": int(cn),
        "bond_lengths_A": np.round(np.median(bonds, axis=0), 4).tolist() if cn else [],
        "mean_bond_length_A": round(float(np.median(bonds.mean(axis=1))), 4) if cn else None,
        "angles_deg": np.round(np.median(angles, axis=0), 2).tolist() if cn > 1 else [],
        "spread": {
            "coordination_number_counts": {str(k): v for k, v in sorted(counts.items())},
            "coordination_number_agreement": round(counts[cn] / len(shells), 3),
            "mean_bond_length_std_A": round(float(np.std(means)), 4) if len(means) else None,
            "bond_lengths_std_A": np.round(np.std(bonds, axis=0), 4).tolist() if cn else [],
            "angles_std_deg": np.round(np.std(angles, axis=0), 2).tolist() if cn > 1 else [],
        },
        "ligand": ligand,
        "samples": len(clusters),
    }


def site_mixture(matcher, features: np.ndarray, absorber: str, ligand: str = "O", components: int = 6) -> dict:
    """Linear-combination fit of the spectrum over the template library (:meth:`TemplateMatcher.mixture`),
    summarised as the fraction of absorber sites per coordination number (weights of the templates with that
    CN, normalised) and the ``components`` heaviest templates. A spectrum is the average over the absorber's
    sites, so for a sample with several kinds of site this, not the modal CN, is the answer."""
    weights, residual = matcher.mixture(features)
    total = float(weights.sum())
    if total <= 0:
        return {"coordination_number_fractions": {}, "components": [], "weight_sum": 0.0,
                "residual": round(residual, 5)}
    lib = matcher.library
    used = np.flatnonzero(weights > 1e-3 * total)
    cns = dict(zip(used.tolist(), lib.subset(used).coordination_numbers(ligand, absorber).tolist()))
    fractions: Counter = Counter()
    for i in used:
        fractions[cns[i]] += weights[i] / total
    top = used[np.argsort(-weights[used])][:components]
    return {
        "coordination_number_fractions": {str(cn): round(float(f), 3) for cn, f in sorted(fractions.items())},
        "components": [{"formula": lib.meta[i].get("formula"), "material_id": lib.meta[i].get("material_id"),
                        "coordination_number": cns[i], "weight": round(float(weights[i] / total), 3)}
                       for i in top],
        "weight_sum": round(total, 3),
        "residual": round(residual, 5),
    }


def predict_local(
    spectrum: XasSpectrum,
    absorber: str,
    edge: str = "K",
    samples: int = 8,
    ligand: str = "O",
    library: str | Path | None = None,
    checkpoint: str | Path | None = None,
    method: str = "auto",
    seed: int = 0,
    broaden_eV: float = 0.0,
    align: bool | None = None,
) -> LocalPrediction:
    """Sample ``samples`` clusters for ``spectrum`` and summarise them (see :func:`consensus`).

    ``method`` "auto" (default): the diffusion model when a checkpoint exists for the absorber and edge (the
    packaged ``data/edm_<absorber>_<edge>.pt`` or ``checkpoint``) and no template ``library`` was passed on its
    own, else template matching. The Si K model scores better than template matching on every held-out set
    (docs/spectra.md); Fe K has no model and uses the templates.

    An EELS spectrum (``spectrum.meta["kind"] == "eels"``, ELNES) first loses its power-law background
    (:func:`~xtalsolve.io.spectra.subtract_power_law`); its edge is then read as XANES (the dipole limit).

    ``broaden_eV``: Gaussian FWHM applied to the template library's computed spectra before matching (the
    instrumental resolution of a measured spectrum). ``align``: first fit one energy shift, energy-scale stretch
    and broadening of the whole template library to the spectrum (:func:`~xtalsolve.local.baselines.fit_alignment`;
    the broadening is ``broaden_eV`` when that is given), reported as ``alignment`` in the summary. Template
    matching then matches against the aligned library (None: on by default); the diffusion model is given the
    spectrum mapped back onto the computed energy axis (:meth:`Alignment.to_computed_axis`; None: off, as the
    model's scores were measured on computed spectra; pass True for a measured spectrum). The grid holds the
    identity, so a computed spectrum keeps (nearly) its own axis; measured Fe K oxides need stretches of
    1.2-1.35 (docs/spectra.md). When a template library exists, ``mixture`` (a linear-combination fit over it,
    :func:`site_mixture`) is reported by both methods."""
    if spectrum.meta.get("kind") == "eels":
        from xtalsolve.io.spectra import subtract_power_law

        spectrum = subtract_power_law(spectrum)
    norm = normalize(spectrum)
    ckpt = Path(checkpoint) if checkpoint else default_checkpoint_path(absorber, edge)
    lib_path = Path(library) if library else default_library_path(absorber, edge)
    if method not in ("auto", "diffusion", "template"):
        raise XtalsolveError("method must be auto, diffusion or template", "--method")
    use_model = method == "diffusion" or (method == "auto" and ckpt.exists() and (checkpoint is not None
                                                                                  or library is None))
    extra = {"e0_eV": norm.e0, "edge_step": norm.edge_step, "normalized": norm}
    lib = _template_library(lib_path, absorber, edge, required=not use_model or bool(align))
    fitted = matcher = None
    if lib is not None:
        from xtalsolve.local.baselines import ALIGN_FWHMS_EV, TemplateMatcher, fit_alignment

        feats = norm.on_grid(lib.grid)
        if align or (align is None and not use_model):
            fitted = fit_alignment(lib, feats, fwhms=(broaden_eV,) if broaden_eV > 0 else ALIGN_FWHMS_EV)
            lib = lib.aligned(fitted.shift_eV, fitted.stretch, fitted.fwhm_eV)
            extra["alignment"] = fitted.as_dict()
        else:
            lib = lib.broadened(broaden_eV)
        matcher = TemplateMatcher(lib)
        mixture = site_mixture(matcher, feats, absorber, ligand)
    if use_model:
        from xtalsolve.local.model import load_model, sample_clusters

        if not ckpt.exists():
            raise XtalsolveError("no diffusion checkpoint", ckpt)
        model, cfg = load_model(ckpt)
        grid = np.asarray(cfg["grid"])
        feats = norm.on_grid(grid)
        if fitted is not None:
            feats = fitted.to_computed_axis(grid, feats)
        clusters = sample_clusters(model, cfg, feats, samples, absorber, seed=seed)
        extra["grid"] = grid
        name = f"diffusion ({ckpt.name})"
    else:
        clusters = matcher.predict(feats, samples, absorber)
        if not clusters:
            raise XtalsolveError("template library has no usable entry", lib_path)
        extra["template_features"] = [lib.features[c.meta["template_index"]] for c in clusters]
        extra["grid"] = lib.grid
        name = "template matching (nearest library spectra)"
    extra["features"] = feats
    summary = {"method": name, "absorber": absorber, "edge": edge, **consensus(clusters, ligand),
               "e0_eV": round(norm.e0, 2), "source": spectrum.source, "spectrum_kind": spectrum.meta.get("kind", "xas")}
    if "background" in spectrum.meta:
        summary["eels_background"] = spectrum.meta["background"]
    if matcher is not None:
        summary["mixture"] = mixture
    if "alignment" in extra:
        summary["alignment"] = extra["alignment"]
    return LocalPrediction(name, clusters, summary, extra)


def representative_sample(clusters: list[Cluster], summary: dict, ligand: str = "O") -> int:
    """Index of the sampled cluster that stands for the consensus: among the samples with the consensus CN, the one
    whose sorted bond lengths are nearest (RMS) to the consensus bond lengths."""
    cn, target = summary["coordination_number"], np.asarray(summary["bond_lengths_A"])
    best, best_d = 0, np.inf
    for i, cl in enumerate(clusters):
        fs = first_shell(cl, ligand)
        if fs.coordination_number == cn:
            d = float(np.sqrt(np.mean((np.sort(fs.bond_lengths_A) - target) ** 2))) if cn else 0.0
            if d < best_d:
                best, best_d = i, d
    return best


def simulate_prediction(pred: LocalPrediction, settings=None) -> dict:
    """FEFF10 XANES (ELNES for an EELS input) of the predicted first shell: the absorber and the ligands of
    :func:`representative_sample` (no farther atoms: the models predict the first shell), normalised like the
    input and compared with it on the same energy grid (Pearson r). Adds ``simulated`` (features on ``grid``) to
    ``pred.extra`` and returns the summary entry. One FEFF run with the library's settings (a few seconds for 5-7
    atoms).

    The farther shells, which shape the spectrum above the white line, are absent, so r measures the first shell's
    share of the agreement: a check that the predicted shell is consistent with the edge, not a refinement."""
    import time

    from dataclasses import asdict

    from xtalsolve.local.clusters import first_shell_cluster
    from xtalsolve.local.feff import FeffSettings, feff_input, run_feff

    ligand = pred.summary.get("ligand", "O")
    i = representative_sample(pred.clusters, pred.summary, ligand)
    shell = first_shell_cluster(pred.clusters[i], ligand)
    if len(shell) == 1:
        raise XtalsolveError("the predicted cluster has no first shell to simulate", "--simulate")
    kind = "elnes" if pred.summary.get("spectrum_kind") == "eels" else "xanes"
    settings = settings or FeffSettings(edge=pred.summary["edge"], spectroscopy=kind)
    t0 = time.perf_counter()
    energy, mu, _ = run_feff(feff_input(shell, settings, title="xtalsolve local --simulate"))
    grid = np.asarray(pred.extra["grid"])
    sim = normalize(XasSpectrum(energy, mu, "FEFF10", shell.absorber, pred.summary["edge"])).on_grid(grid)
    pred.extra["simulated"] = sim
    r = float(np.corrcoef(sim, np.asarray(pred.extra["features"]))[0, 1])
    return {"sample": i, "atoms": len(shell), "pearson_r": round(r, 4), "seconds": round(time.perf_counter() - t0, 1),
            "code": "FEFF10 (feff10-rs)", "settings": asdict(settings),
            "note": "absorber and predicted first shell only; farther shells are absent"}


def _template_library(path: Path, absorber: str, edge: str, required: bool):
    """The template library at ``path`` (.npz or a FEFF cache folder); None when there is none and it is not
    ``required`` (template matching and alignment need one)."""
    from xtalsolve.local.library import SpectrumLibrary, build_library

    if path.is_dir():
        return build_library(path, absorber, edge=edge)
    if path.exists():
        return SpectrumLibrary.load(path)
    if required:
        raise XtalsolveError(f"no model or template library for {absorber} {edge}; build one with "
                             "`xtalsolve spectra generate` and pass it with --library", path)
    return None


def write_outputs(pred: LocalPrediction, spectrum: XasSpectrum, out: str | Path) -> Path:
    """Write ``summary.json``, ``sample_XXX.xyz`` (one per sampled cluster) and ``local.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(pred.summary, indent=2) + "\n")
    for i, cl in enumerate(pred.clusters):
        fs = first_shell(cl, pred.summary.get("ligand", "O"))
        (out / f"sample_{i:03d}.xyz").write_text(cl.to_xyz(f"sample {i} CN={fs.coordination_number} "
                                                           f"method={pred.method}"))
    _plot(pred, spectrum, out / "local.png")
    return out


def _plot(pred: LocalPrediction, spectrum: XasSpectrum, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = pred.extra.get("normalized") or normalize(spectrum)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    a1.plot(norm.energy - norm.e0, norm.norm, "k-", lw=1.5, label="input (normalised)")
    if "template_features" in pred.extra:
        a1.plot(pred.extra["grid"], pred.extra["template_features"][0], "r--", lw=1,
                label="best template (FEFF10)")
    if "simulated" in pred.extra:
        r = pred.summary.get("simulated", {}).get("pearson_r")
        a1.plot(pred.extra["grid"], pred.extra["simulated"], "g-", lw=1,
                label=f"predicted first shell (FEFF10), r = {r}")
    a1.set_xlim(-20, 60)
    a1.set_xlabel("E - E0 (eV)")
    a1.set_ylabel("normalised mu")
    a1.legend(fontsize=8)
    d = np.concatenate([c.distances[1:] for c in pred.clusters])
    a2.hist(d[d < 4.0], bins=np.arange(1.0, 4.0, 0.04), color="C0")
    a2.set_xlabel(f"distance from {pred.summary['absorber']} (angstrom)")
    a2.set_ylabel(f"neighbours ({len(pred.clusters)} samples)")
    a2.set_title(f"CN {pred.summary['coordination_number']}, <r> {pred.summary['mean_bond_length_A']} A",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
