"""Near-edge absorption spectra: read (two-column text, XDI 1.0; EELS as DigitalMicrograph .dm3/.dm4 or EMSA .msa
through RosettaSciIO), remove an EELS power-law background, normalise, align at the edge.

Energies are in eV. Normalisation follows the usual XAFS convention (Athena/Larch ``pre_edge``): a first E0 at the
maximum of d(mu)/dE, a line fitted to the pre-edge region subtracted, and division by the edge step, i.e. the
difference at E0 between a post-edge polynomial and the pre-edge line.

ELNES (an EELS core-loss edge) is read as the same kind of spectrum with ``meta["kind"] == "eels"``: the energy
axis is the energy loss (eV), the intensity counts. Its pre-edge background, the tail of the lower-lying edges and
the plasmons, falls off as a power law A E^-r and is subtracted (:func:`subtract_power_law`, as in Egerton's
"Electron Energy-Loss Spectroscopy in the Electron Microscope", ch. 4); after that the edge is normalised like an
absorption edge. In the dipole limit (small momentum transfer) the ELNES of an edge is its XANES: FEFF10's
orientation-averaged ELNES of a 49-atom Si K cluster (300 keV, 10 mrad collection) and its XANES agree to
Pearson r = 0.99997 once normalised (docs/spectra.md), so the XANES-trained models read ELNES as they are.

Alignment energy: by default E0 is then moved to where the normalised mu first reaches 1/2 (``e0_method="half"``).
FEFF spectra carry a small artificial step at the computed Fermi level, which the derivative criterion picks for some
clusters and not for others (a 4-5 eV scatter for Si K); the half-step point is stable for computed and measured
spectra alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xtalsolve.errors import XtalsolveError

MIN_POINTS = 20
MIN_SPAN_EV = 30.0
# Default model grid: energies relative to E0 (eV) on which spectra are compared and fed to the models.
FEATURE_GRID_EV = np.arange(-10.0, 50.0001, 0.5)


@dataclass(frozen=True)
class XasSpectrum:
    """Absorption spectrum: energy (eV, increasing), mu (arbitrary units), element/edge when known."""

    energy: np.ndarray
    mu: np.ndarray
    source: str = ""
    element: str | None = None
    edge: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Normalized:
    """Normalised spectrum: E0 (eV), edge step, and mu with pre-edge 0 and post-edge 1."""

    energy: np.ndarray
    norm: np.ndarray
    e0: float
    edge_step: float

    def on_grid(self, grid: np.ndarray = FEATURE_GRID_EV) -> np.ndarray:
        """Normalised mu at E0 + grid (eV); constant extrapolation beyond the measured range."""
        return np.interp(self.e0 + grid, self.energy, self.norm)


# ------------------------------------------------------------------------------------------------------- reading


def read_spectrum(path: str | Path, element: str | None = None, edge: str | None = None,
                  kind: str | None = None) -> XasSpectrum:
    """Read XDI 1.0 or whitespace/comma-separated text with energy (eV) in column 1 and mu in column 2, or an EELS
    file (.dm3, .dm4, .msa/.ems/.emsa: energy loss in eV, counts).

    XDI files are recognised by their ``# XDI/`` first line; mu is taken from a ``mu``/``mutrans``/``mufluor``
    column or computed as ln(i0/itrans) (transmission) or ifluor/i0 (fluorescence). ``kind`` ("xas" or "eels",
    ``meta["kind"]``) defaults to "eels" for the EELS formats and "xas" otherwise; give "eels" for an ELNES
    spectrum saved as two-column text.
    """
    path = Path(path)
    if not path.exists():
        raise XtalsolveError("file not found", path)
    if kind not in (None, "xas", "eels"):
        raise XtalsolveError(f"unknown spectrum kind {kind!r} (xas or eels)", "--kind")
    if path.suffix.lower() in EELS_SUFFIXES:
        spec = _read_eels(path)
    else:
        text = path.read_text(errors="replace")
        spec = _read_xdi(text, path) if text.lstrip().startswith("# XDI/") else _read_columns(text, path)
    element = element or spec.element
    edge = edge or spec.edge
    meta = {**spec.meta, "kind": kind or spec.meta.get("kind", "xas")}
    return check_spectrum(XasSpectrum(spec.energy, spec.mu, str(path), element, edge, meta))


# EELS files read through RosettaSciIO (the HyperSpy project's reader library)
EELS_SUFFIXES = (".dm3", ".dm4", ".msa", ".ems", ".emsa")


def _read_eels(path: Path) -> XasSpectrum:
    """An EELS spectrum from a DigitalMicrograph (.dm3/.dm4) or EMSA/MSA file: the energy-loss axis in eV and the
    counts; a spectrum image is summed over its navigation axes (the sum spectrum)."""
    try:
        if path.suffix.lower() in (".dm3", ".dm4"):
            from rsciio.digitalmicrograph import file_reader
        else:
            from rsciio.msa import file_reader
        signals = file_reader(str(path))
    except Exception as exc:  # the readers raise many kinds of errors on bad files; keep one line
        raise XtalsolveError(f"cannot read as EELS: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                             path) from None
    for sig in signals:
        signal_axes = [i for i, a in enumerate(sig["axes"]) if not a.get("navigate", False)]
        if len(signal_axes) != 1:
            continue
        ax = sig["axes"][signal_axes[0]]
        unit = str(ax.get("units", "")).strip().lower()
        if unit not in ("ev", "kev"):
            raise XtalsolveError(f"energy axis in {ax.get('units')!r}, not eV", path)
        data = np.asarray(sig["data"], float)
        counts = np.moveaxis(data, signal_axes[0], -1).reshape(-1, data.shape[signal_axes[0]]).sum(axis=0)
        energy = (ax.get("offset", 0.0) + ax.get("scale", 1.0) * np.arange(len(counts))) * (
            1000.0 if unit == "kev" else 1.0)
        meta = {"kind": "eels", "format": path.suffix.lower().lstrip("."),
                "summed_spectra": int(data.size // len(counts))}
        return XasSpectrum(energy, counts, str(path), None, None, meta)
    raise XtalsolveError("no one-dimensional spectrum (one energy axis) in the file", path)


def write_eels_msa(path: str | Path, energy: np.ndarray, counts: np.ndarray, title: str = "xtalsolve") -> Path:
    """Write an EELS spectrum (uniform energy-loss axis in eV, counts) as EMSA/MSA through RosettaSciIO."""
    from rsciio.msa import file_writer

    energy = np.asarray(energy, float)
    axis = {"size": len(counts), "offset": float(energy[0]), "scale": float(energy[1] - energy[0]), "units": "eV",
            "name": "Energy loss", "navigate": False}
    file_writer(str(path), {"data": np.asarray(counts, float), "axes": [axis], "original_metadata": {},
                            "metadata": {"General": {"title": title}, "Signal": {"signal_type": "EELS"}}})
    return Path(path)


def subtract_power_law(spec: XasSpectrum, edge_eV: float | None = None,
                       window: tuple[float, float] = (-80.0, -8.0)) -> XasSpectrum:
    """EELS pre-edge background A E^-r, fitted by least squares in log-log on ``window`` (eV relative to the
    tabulated edge energy, or ``edge_eV``) and subtracted from the whole spectrum. The fitted r and window are
    added to ``meta["background"]``. Raises when the window holds fewer than 10 points or non-positive counts."""
    src = spec.source or "spectrum"
    edge = edge_eV if edge_eV is not None else (edge_energy(spec.element, spec.edge)
                                                 if spec.element and spec.edge else None)
    if edge is None:
        raise XtalsolveError("edge energy unknown (give the absorber and edge) for the EELS background", src)
    e, y = np.asarray(spec.energy, float), np.asarray(spec.mu, float)
    m = (e >= edge + window[0]) & (e <= edge + window[1])
    if m.sum() < 10:
        raise XtalsolveError(f"{m.sum()} points {-window[0]:.0f}-{-window[1]:.0f} eV below the edge at {edge:.0f} eV: "
                             "an EELS spectrum must start well before the edge for its power-law background", src)
    if np.any(y[m] <= 0):
        raise XtalsolveError("non-positive counts before the edge: not a raw EELS spectrum (background "
                             "already removed? then read it as --kind xas)", src)
    slope, intercept = np.polyfit(np.log(e[m]), np.log(y[m]), 1)
    background = np.exp(intercept) * e ** slope
    meta = {**spec.meta, "background": {"model": "power law A E^-r", "r": round(float(-slope), 3),
                                        "window_eV": [round(float(edge + window[0]), 1),
                                                      round(float(edge + window[1]), 1)]}}
    return XasSpectrum(e, y - background, spec.source, spec.element, spec.edge, meta)


def _numeric_rows(lines: list[str], source) -> np.ndarray:
    rows = []
    for ln in lines:
        ln = ln.strip()
        if not ln or ln[0] in "#;!%":
            continue
        parts = re.split(r"[,\s]+", ln)
        try:
            rows.append([float(x) for x in parts if x])
        except ValueError:
            if rows:  # text after data started
                raise XtalsolveError(f"non-numeric data line: {ln[:40]!r}", source) from None
            continue  # a header line without comment mark
    if not rows:
        raise XtalsolveError("no numeric data", source)
    width = min(len(r) for r in rows)
    if width < 2:
        raise XtalsolveError("need at least two columns (energy in eV, mu)", source)
    return np.array([r[:width] for r in rows], dtype=float)


def _read_columns(text: str, source) -> XasSpectrum:
    data = _numeric_rows(text.splitlines(), source)
    return XasSpectrum(data[:, 0], data[:, 1], str(source))


def _read_xdi(text: str, source) -> XasSpectrum:
    lines = text.splitlines()
    header = {}
    for ln in lines:
        m = re.match(r"#\s*([A-Za-z0-9_]+\.[A-Za-z0-9_]+)\s*:\s*(.*)$", ln)
        if m:
            header[m.group(1).lower()] = m.group(2).strip()
    cols = {}
    for key, value in header.items():
        if key.startswith("column."):
            name, *unit = value.split()
            cols[name.lower()] = (int(key.split(".")[1]) - 1, unit[0] if unit else "")
    data = _numeric_rows(lines, source)
    if "energy" not in cols:
        raise XtalsolveError("XDI file has no 'energy' column", source)
    ie, unit = cols["energy"]
    energy = data[:, ie] * {"ev": 1.0, "kev": 1000.0}.get(unit.lower(), 1.0)

    def col(name):
        return data[:, cols[name][0]]

    with np.errstate(divide="ignore", invalid="ignore"):
        for name in ("mu", "mutrans", "mufluor", "normtrans", "normfluor"):
            if name in cols:
                mu = col(name)
                break
        else:
            if "i0" in cols and "itrans" in cols:
                mu = np.log(col("i0") / col("itrans"))
            elif "i0" in cols and "ifluor" in cols:
                mu = col("ifluor") / col("i0")
            else:
                raise XtalsolveError("XDI file has no mu column and no i0/itrans or i0/ifluor pair", source)
    if not np.all(np.isfinite(mu)):
        raise XtalsolveError("mu is not finite everywhere (zero or negative intensities?)", source)
    return XasSpectrum(energy, mu, str(source), header.get("element.symbol"), header.get("element.edge"),
                       {k: v for k, v in header.items() if not k.startswith("column.")})


def synthetic_eels(energy: np.ndarray, cross_section: np.ndarray, edge_eV: float, start: float = -100.0,
                   dispersion: float = 0.25, background_ratio: float = 3.0, r: float = 3.0, step_counts: float = 2e4,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A measured-like EELS core-loss spectrum from a computed edge (``energy`` in eV, ``cross_section`` any units,
    e.g. FEFF10 ELNES): channels of ``dispersion`` eV from ``start`` eV before ``edge_eV`` to the end of the
    computed range; the edge scaled to ``step_counts`` counts per channel after it (the mean of its last 20 eV),
    zero before its first point; a power-law background A E^-r worth ``background_ratio`` edge steps at the edge;
    Poisson counting noise (seeded). Returns (energy loss, counts). For tests and benchmarks of the ELNES path."""
    e = np.arange(edge_eV + start, float(energy[-1]), dispersion)
    edge = np.interp(e, energy, cross_section, left=0.0)
    edge *= step_counts / cross_section[energy >= energy[-1] - 20.0].mean()
    background = background_ratio * step_counts * (e / edge_eV) ** -r
    return e, np.random.default_rng(seed).poisson(edge + background).astype(float)


# ------------------------------------------------------------------------------------------------------ checking


def check_spectrum(spec: XasSpectrum) -> XasSpectrum:
    """Sort by energy, drop duplicate energies, and reject spectra that cannot be a near-edge scan in eV."""
    src = spec.source or "spectrum"
    e, mu = np.asarray(spec.energy, float), np.asarray(spec.mu, float)
    ok = np.isfinite(e) & np.isfinite(mu)
    e, mu = e[ok], mu[ok]
    e, idx = np.unique(e, return_index=True)
    mu = mu[idx]
    if len(e) < MIN_POINTS:
        raise XtalsolveError(f"too short: {len(e)} points (need >= {MIN_POINTS})", src)
    ref = edge_energy(spec.element, spec.edge) if spec.element and spec.edge else None
    if e[-1] < 100.0 and (ref is None or ref >= 100.0):  # edges below 100 eV (Li K in EELS) do end there
        raise XtalsolveError(f"energies end at {e[-1]:.4g}: looks like keV or relative energies; give absolute "
                             "photon energies in eV", src)
    if e[-1] - e[0] < MIN_SPAN_EV:
        raise XtalsolveError(f"too short: spans {e[-1] - e[0]:.1f} eV (need >= {MIN_SPAN_EV:.0f} eV)", src)
    if ref is not None and not (e[0] - 100 <= ref <= e[-1] + 100):
        raise XtalsolveError(f"energy range {e[0]:.1f}-{e[-1]:.1f} eV does not contain the {spec.element} "
                             f"{spec.edge} edge ({ref:.1f} eV); wrong units or wrong element?", src)
    return XasSpectrum(e, mu, spec.source, spec.element, spec.edge, spec.meta)


def edge_energy(element: str, edge: str) -> float | None:
    """Tabulated absorption-edge energy (eV, xraydb), or None when unknown."""
    try:
        import xraydb

        return float(xraydb.xray_edge(element, edge).energy)
    except (ImportError, ValueError, KeyError, AttributeError, TypeError):
        return None


# -------------------------------------------------------------------------------------------------- normalising


def find_e0(energy: np.ndarray, mu: np.ndarray, window: tuple[float, float] | None = None) -> float:
    """E0 (eV) at the first strong maximum of d(mu)/dE, optionally searched only inside ``window`` (eV).

    The derivative is smoothed with a 3-point running mean so a single noisy point cannot win.
    """
    d = np.gradient(mu, energy)
    d = np.convolve(d, np.ones(3) / 3, mode="same")
    mask = np.ones_like(energy, bool) if window is None else (energy >= window[0]) & (energy <= window[1])
    mask[[0, -1]] = False
    if not mask.any():
        raise XtalsolveError("no data inside the edge search window", "e0")
    # the first point of the strongest rise: the first local maximum of d(mu)/dE reaching half the largest one
    # (a later, steeper rise, e.g. a second white-line peak, must not be taken for the edge)
    idx = np.flatnonzero(mask)
    big = idx[d[idx] >= 0.5 * d[idx].max()]
    i = big[0]
    while i + 1 in big and d[i + 1] >= d[i]:
        i += 1
    return float(energy[i])


def normalize(
    spec: XasSpectrum,
    e0: float | None = None,
    pre: tuple[float, float] = (-150.0, -30.0),
    post: tuple[float, float | None] = (50.0, None),
    e0_method: str = "half",
) -> Normalized:
    """Pre-edge line + post-edge quadratic normalisation (ranges relative to E0, eV).

    Where the scan does not reach far enough below the edge (computed spectra), the pre-edge line is replaced by
    the first point's value; when the post-edge range spans less than 100 eV, the post-edge is the mean of the last
    20 eV (a line fitted there would extrapolate badly back to E0). The polynomial is quadratic for post-edge spans
    above 300 eV, else linear. Raises when no edge step is found.
    """
    e, mu = spec.energy, spec.mu
    src = spec.source or "spectrum"
    if e0 is None:
        ref = edge_energy(spec.element, spec.edge) if spec.element and spec.edge else None
        e0 = find_e0(e, mu, None if ref is None else (ref - 40.0, ref + 40.0))
    m_pre = (e >= e0 + pre[0]) & (e <= e0 + pre[1])
    if m_pre.sum() >= 3:
        pre_line = np.polyval(np.polyfit(e[m_pre], mu[m_pre], 1), e)
    else:
        pre_line = np.full_like(e, mu[0])
    hi = e[-1] if post[1] is None else e0 + post[1]
    m_post = (e >= e0 + post[0]) & (e <= hi)
    span = e[m_post][-1] - e[m_post][0] if m_post.sum() >= 5 else 0.0
    if span >= 100.0:
        post_curve = np.polyval(np.polyfit(e[m_post], mu[m_post], 2 if span > 300.0 else 1), e)
    else:  # too short to extrapolate a slope back to E0: mean of the last 20 eV
        post_curve = np.full_like(e, mu[e >= max(e0 + 20.0, e[-1] - 20.0)].mean())
    i0 = int(np.argmin(np.abs(e - e0)))
    step = float(post_curve[i0] - pre_line[i0])
    # point-to-point noise from the median absolute second difference (robust against the edge itself)
    noise = 1.4826 * float(np.median(np.abs(np.diff(mu, 2)))) / np.sqrt(6.0) + 1e-300
    if not np.isfinite(step) or step <= 5.0 * noise or i0 in (0, len(e) - 1):
        raise XtalsolveError(f"no absorption edge found (edge step {step:.3g}, point-to-point noise {noise:.3g})",
                             src)
    flat = (mu - pre_line) / step
    if e0_method == "half":
        above = np.flatnonzero((flat >= 0.5) & (e >= e0 - 30.0))
        j = int(above[0]) if len(above) else i0
        if j > 0:  # linear interpolation between the bracketing points
            e0 = float(e[j - 1] + (0.5 - flat[j - 1]) * (e[j] - e[j - 1]) / (flat[j] - flat[j - 1] + 1e-300))
    elif e0_method != "derivative":
        raise XtalsolveError("e0_method must be 'half' or 'derivative'", "e0_method")
    return Normalized(e, flat, float(e0), step)


def spectrum_features(spec: XasSpectrum, grid: np.ndarray = FEATURE_GRID_EV) -> np.ndarray:
    """Normalised mu on ``grid`` (eV relative to E0): the edge-aligned vector that models and baselines use."""
    return normalize(spec).on_grid(grid)
