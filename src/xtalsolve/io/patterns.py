"""Read any supported pattern file into a checked :class:`~xtalsolve.pattern.Pattern`; write .xy files.

Rules applied to every format (decided here, once):

- x unit: what the file states; else ``x_unit``; else r for PDF names (``.gr``, ``.gr.xy``) and
  2theta otherwise. An ``x_unit`` contradicting the file is an error. Allowed ranges: 2theta 0-180
  degrees, Q 0-100 1/angstrom, r 0-1000 angstrom; outside them the x unit is surely wrong.
- wavelength: what the file states (Kalpha1 of a Kalpha1/Kalpha2 pair; the pair is kept in
  ``meta["wavelengths_A"]``); ``wavelength``/``radiation`` override it when given (recorded in
  ``meta["wavelength_file_A"]``), but a value more than 1 % away from the file's is refused as a
  likely mix-up (CuKa vs CuKa1 differ by 0.08 %, Mo vs Cu by a factor 2). 2theta data without any
  wavelength are read (``Pattern.q`` then raises); ``require_wavelength=True`` refuses them.
- x strictly increasing; a strictly decreasing file is reversed; anything else is an error.
- sigma: from the file when it has one (zeros replaced by the smallest positive sigma, negatives
  refused); else Poisson ``sqrt(max(y, 1))`` for intensities and unit weights (sigma = 1) for a
  PDF G(r), the convention of PDFgui/diffpy when dG is absent. ``meta["sigma_estimated"]`` says which.
- at most :data:`MAX_POINTS` points; no NaN or infinite values; at least 2 points.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from xtalsolve.errors import XtalsolveError
from xtalsolve.io._base import MAX_POINTS, RawData, check_point_count, pdf_like_name, read_bytes
from xtalsolve.pattern import UNITS, Pattern
from xtalsolve.radiation import wavelength_from_options

FORMATS: dict[str, str] = {
    ".xy": "text",
    ".xye": "text",
    ".dat": "text",
    ".csv": "text",
    ".txt": "text",
    ".gr": "text",
    ".xrdml": "xrdml",
    ".fxye": "gsas",
    ".fxy": "gsas",
    ".gsa": "gsas",
    ".gss": "gsas",
    ".gsas": "gsas",
    ".xra": "gsas",
    ".cif": "cif",
}
"""File extension (lower case) -> reader."""

FORMAT_NAMES = {"text": "column text", "xrdml": "XRDML", "gsas": "GSAS powder data", "cif": "powder CIF"}

X_RANGES = {"2theta": (0.0, 180.0), "q": (0.0, 100.0), "r": (0.0, 1000.0)}
"""Plausible x ranges (degrees, 1/angstrom, angstrom), inclusive."""

WAVELENGTH_TOLERANCE = 0.01
"""Largest relative difference between a file's wavelength and an override before it is refused."""


def _reader(fmt: str):
    if fmt == "text":
        from xtalsolve.io.text import read_text

        return read_text
    if fmt == "xrdml":
        from xtalsolve.io.xrdml import read_xrdml

        return read_xrdml
    if fmt == "gsas":
        from xtalsolve.io.gsas import read_gsas

        return read_gsas
    from xtalsolve.io.powder_cif import read_powder_cif

    return read_powder_cif


def _wavelength_option(wavelength, radiation, path: Path) -> tuple[float | None, str | None]:
    """The user's wavelength (angstrom) and which option gave it; errors name the file being read."""
    try:
        return wavelength_from_options(wavelength, radiation)
    except XtalsolveError as err:
        problem = err.problem if err.problem.startswith("give") else f"{err.source}: {err.problem}"
        raise XtalsolveError(problem, path) from None


def read_pattern(
    path: str | Path,
    *,
    wavelength: float | None = None,
    radiation: str | None = None,
    x_unit: str | None = None,
    require_wavelength: bool = False,
) -> Pattern:
    """Read a powder pattern or PDF file.

    path: .xy .xye .dat .csv .txt (columns), .gr (PDF columns), .xrdml, .fxye .fxy .gsa .gss .gsas .xra
        (GSAS constant wavelength), .cif (IUCr powder CIF).
    wavelength: angstrom; radiation: a name such as "CuKa" (give at most one); both override the file.
    x_unit: "2theta" (degrees), "q" (1/angstrom) or "r" (angstrom) for files that do not say.
    require_wavelength: refuse 2theta data whose wavelength is unknown (for commands that need Q).

    Raises :class:`XtalsolveError` naming the file and the problem for any bad input.
    """
    path = Path(path)
    if x_unit is not None and x_unit not in UNITS:
        raise XtalsolveError(f"--x-unit {x_unit!r} is not one of {', '.join(UNITS)}", path)
    user_wavelength, option = _wavelength_option(wavelength, radiation, path)
    if not path.exists():
        raise XtalsolveError("no such file", path)
    suffix = path.suffix.lower()
    fmt = FORMATS.get(suffix)
    if fmt is None and not path.is_dir():
        known = " ".join(sorted(FORMATS))
        raise XtalsolveError(f"unknown pattern format {path.suffix or '(no extension)'!r}; supported: {known}", path)
    data = read_bytes(path)
    if fmt == "text" and suffix in (".dat", ".txt"):
        from xtalsolve.io.gsas import looks_like_gsas

        if looks_like_gsas(data):
            fmt = "gsas"
    unit_hint = x_unit or ("r" if pdf_like_name(path) else "2theta")
    try:
        raw = _reader(fmt)(path, data, unit_hint)
    except XtalsolveError:
        raise
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, ET.ParseError) as err:
        # malformed input that a reader did not anticipate: still one line, naming the format
        raise XtalsolveError(f"cannot read as {FORMAT_NAMES[fmt]}: {err}", path) from None
    return _checked(raw, path, unit_hint, x_unit, user_wavelength, option, require_wavelength)


def _checked(
    raw: RawData,
    path: Path,
    unit_hint: str,
    x_unit: str | None,
    user_wavelength: float | None,
    option: str | None,
    require_wavelength: bool,
) -> Pattern:
    """Apply the rules in the module docstring to what a reader found."""
    meta = dict(raw.meta)
    if x_unit is not None and raw.unit is not None and raw.unit != x_unit:
        raise XtalsolveError(f"the file states x in {raw.unit}, but --x-unit {x_unit} was given", path)
    unit = raw.unit or unit_hint
    meta["x_unit_source"] = "file" if raw.unit else ("--x-unit" if x_unit else "default")

    x = np.asarray(raw.x, dtype=float)
    y = np.asarray(raw.y, dtype=float)
    sigma = None if raw.sigma is None else np.asarray(raw.sigma, dtype=float)
    check_point_count(len(x), path)
    if len(x) < 2:
        raise XtalsolveError(f"only {len(x)} data point(s)", path)
    for name, values in (("x", x), ("y", y), ("sigma", sigma)):
        if values is not None and not np.isfinite(values).all():
            k = int(np.argmax(~np.isfinite(values)))
            raise XtalsolveError(f"NaN or infinite {name} at point {k + 1}", path)

    step = np.diff(x)
    if not (step > 0).all():
        if (step < 0).all():
            x, y = x[::-1], y[::-1]
            sigma = None if sigma is None else sigma[::-1]
            meta["reversed"] = True
        else:
            k = int(np.argmax(step <= 0))
            what = "repeats" if step[k] == 0 else "goes back"
            raise XtalsolveError(
                f"x is not monotonic: x {what} at point {k + 2} ({x[k + 1]:g} after {x[k]:g})", path
            )
    low, high = X_RANGES[unit]
    if x[0] < low or x[-1] > high:
        origin = {"file": "stated by the file", "--x-unit": "from --x-unit", "default": "assumed"}
        hint = "; if x is not 2theta in degrees, say so with --x-unit" if meta["x_unit_source"] == "default" else ""
        raise XtalsolveError(
            f"x runs from {x[0]:g} to {x[-1]:g}, outside {low:g}-{high:g} for {unit} "
            f"(x unit {origin[meta['x_unit_source']]}){hint}",
            path,
        )

    if sigma is not None:
        if (sigma < 0).any():
            k = int(np.argmax(sigma < 0))
            raise XtalsolveError(f"negative sigma {sigma[k]:g} at point {k + 1}", path)
        zero = sigma == 0
        if zero.all():
            sigma = None
        elif zero.any():
            sigma = np.where(zero, sigma[~zero].min(), sigma)
            meta["sigma_zero_replaced"] = int(zero.sum())
    if sigma is None:
        if unit == "r":
            sigma = np.ones_like(y)
            meta["sigma_rule"] = "unit weights (no dG in file)"
        else:
            sigma = np.sqrt(np.maximum(y, 1.0))
            meta["sigma_rule"] = "sqrt(max(y, 1)) (Poisson)"
        meta["sigma_estimated"] = True
    else:
        meta.setdefault("sigma_estimated", False)

    file_wavelength = raw.wavelengths[0] if raw.wavelengths else None
    if len(raw.wavelengths) > 1:
        meta["wavelengths_A"] = list(raw.wavelengths)
    if user_wavelength is not None:
        if (
            file_wavelength is not None
            and unit != "r"
            and abs(user_wavelength - file_wavelength) > WAVELENGTH_TOLERANCE * file_wavelength
        ):
            raise XtalsolveError(
                f"the file states wavelength {file_wavelength:g} angstrom but {option} gives "
                f"{user_wavelength:g} angstrom; drop the option or correct the file",
                path,
            )
        wl = user_wavelength
        meta["wavelength_source"] = option
        if file_wavelength is not None:
            meta["wavelength_file_A"] = file_wavelength
    else:
        wl = file_wavelength
        meta["wavelength_source"] = meta.get("wavelength_statement", "file") if wl is not None else None
    if require_wavelength and unit == "2theta" and wl is None:
        raise XtalsolveError(
            "2theta data need a wavelength: the file states none; give --wavelength or --radiation", path
        )
    return Pattern(x=x, y=y, sigma=sigma, unit=unit, wavelength=wl, source=str(path), meta=meta)


_COLUMN_NAMES = {"2theta": "2theta_deg", "q": "q_invA", "r": "r_A"}


def write_xy(pattern: Pattern, path: str | Path, header: dict | None = None, *, sigma: bool = True) -> Path:
    """Write ``pattern`` as text columns x y [sigma] with ``#`` header lines that :func:`read_pattern` reads back.

    The x unit, wavelength (``unknown`` when None; ``Kalpha1;Kalpha2`` when the pattern carries the pair),
    and source come first, then ``header`` as ``# key: value`` lines, then the ``# columns:`` line.
    """
    path = Path(path)
    if pattern.wavelength is None:
        wavelength = "unknown"
    else:
        pair = pattern.meta.get("wavelengths_A")
        values = pair if pair and pair[0] == pattern.wavelength else [pattern.wavelength]
        wavelength = ";".join(f"{v:.10g}" for v in values)
    y_name = "G_invA2" if pattern.unit == "r" else "intensity"
    columns = [_COLUMN_NAMES[pattern.unit], y_name] + (["sigma"] if sigma else [])
    lines = [f"x_unit: {pattern.unit}", f"wavelength_A: {wavelength}", f"source: {pattern.source}"]
    lines += [f"{key}: {' '.join(str(value).split())}" for key, value in (header or {}).items()]
    lines.append(f"columns: {' '.join(columns)}")
    table = np.column_stack([pattern.x, pattern.y] + ([pattern.sigma] if sigma else []))
    try:
        np.savetxt(path, table, fmt="%.10g", header="\n".join(lines), comments="# ")
    except OSError as err:
        raise XtalsolveError(f"cannot write ({err.strerror})", path) from None
    return path


__all__ = ["FORMATS", "MAX_POINTS", "read_pattern", "write_xy"]
