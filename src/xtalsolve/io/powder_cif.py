"""IUCr powder CIF (pdCIF): the measured profile of a (possibly multi-block) CIF.

Blocks and loops are parsed by pymatgen's :class:`~pymatgen.io.cif.CifFile`; this module only
chooses the profile. The first block with a measured intensity loop wins
(``_pd_meas_counts_total``, ``_pd_meas_intensity_total``, ``_pd_proc_intensity_total``,
``_pd_proc_intensity_net``, in that order); a block holding only a calculated profile
(``_pd_calc_intensity_*``) is used when no block has measured data (``meta["calculated"] = True``).
2theta (degrees) comes from ``_pd_proc_2theta_corrected`` / ``_pd_meas_2theta_scan`` /
``_pd_meas_angle_2theta``, or is generated from ``_pd_meas_2theta_range_min/max/inc`` (or the
``_pd_proc_`` range for processed intensities). sigma: the standard uncertainty written as
``327(18)``, else ``1/sqrt(_pd_proc_ls_weight)``.

Wavelength: ``_diffrn_radiation_wavelength`` (preferred) or ``_pd_proc_wavelength`` of the profile
block; else of a block that names the profile through ``_pd_block_diffractogram_id``; else the single
value stated by the file's other blocks, ignoring blocks named ``*_simulated_*`` (profiles simulated
with PLATON and appended to deposited files, with a wavelength of their own: 0.71073 A in av5088sup4,
measured with Cu). A looped pair is Kalpha1, Kalpha2.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from xtalsolve.errors import XtalsolveError
from xtalsolve.io._base import RawData, check_point_count, decode_text, stated_wavelengths

MEASURED_Y = ("_pd_meas_counts_total", "_pd_meas_intensity_total", "_pd_proc_intensity_total", "_pd_proc_intensity_net")
CALCULATED_Y = ("_pd_calc_intensity_total", "_pd_calc_intensity_net")
X_TAGS = ("_pd_proc_2theta_corrected", "_pd_meas_2theta_scan", "_pd_meas_angle_2theta")
OTHER_X = ("_pd_proc_d_spacing", "_pd_meas_time_of_flight", "_pd_proc_energy_incident", "_pd_proc_recip_len_q")
WAVELENGTH_TAGS = ("_diffrn_radiation_wavelength", "_pd_proc_wavelength")
_NUMBER_SU = re.compile(r"^([-+]?(?:\d+\.?(\d*)|\.(\d+)))(?:[eE]([-+]?\d+))?(?:\((\d+)\))?$")
_MISSING = ("?", ".")


def _cif_number(token: str) -> tuple[float, float]:
    """Value and standard uncertainty (NaN when none) of a CIF number such as ``1.234(5)`` or ``2.2E+02``."""
    match = _NUMBER_SU.match(token.strip())
    if not match:
        raise ValueError(token)
    _, decimals, leading_decimals, exponent, su = match.groups()
    value = float(token.strip().split("(")[0])
    if su is None:
        return value, np.nan
    places = len(decimals or leading_decimals or "")
    return value, int(su) * 10.0 ** (int(exponent or 0) - places)


def _column(
    block: dict, tag: str, path: Path, n: int | None = None, allow_missing: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Values and uncertainties of a looped numeric item; missing values ('?', '.') are NaN if allowed."""
    tokens = block[tag]
    if isinstance(tokens, str):
        tokens = [tokens]
    check_point_count(len(tokens), path)
    if n is not None and len(tokens) != n:
        raise XtalsolveError(f"{tag} has {len(tokens)} values, the intensities {n}", path)
    values = np.empty(len(tokens))
    sus = np.empty(len(tokens))
    for i, token in enumerate(tokens):
        if token in _MISSING and allow_missing:
            values[i] = sus[i] = np.nan
            continue
        if token in _MISSING:
            raise XtalsolveError(f"{tag}: value {i + 1} is missing ({token!r})", path)
        try:
            values[i], sus[i] = _cif_number(token)
        except ValueError:
            raise XtalsolveError(f"{tag}: value {i + 1} is {token!r}, not a number", path) from None
    return values, sus


def _scalar(block: dict, tag: str) -> str | None:
    value = block.get(tag)
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    return None if value is None or value in _MISSING else value


def _block_wavelengths(block: dict) -> tuple[list[str], str | None]:
    """Wavelength values (strings, standard uncertainties dropped) a block states, and the tag."""
    for tag in WAVELENGTH_TAGS:
        values = block.get(tag)
        if values is None:
            continue
        values = [values] if isinstance(values, str) else values
        values = [re.sub(r"\(\d+\)$", "", v) for v in values if v not in _MISSING]
        if values:
            return values, tag
    return [], None


def _profile_wavelengths(blocks: dict[str, dict], name: str) -> tuple[list[str], str]:
    """Wavelengths for the profile in block ``name`` (rules in the module docstring) and where they were found."""
    values, tag = _block_wavelengths(blocks[name])
    if values:
        return values, f"block data_{name} {tag}"
    block_id = _scalar(blocks[name], "_pd_block_id")
    for other_name, other in blocks.items():
        ids = other.get("_pd_block_diffractogram_id")
        ids = [ids] if isinstance(ids, str) else ids or []
        values, tag = _block_wavelengths(other)
        if block_id and block_id in ids and values:
            return values, f"block data_{other_name} {tag}"
    stated = {}
    for other_name, other in blocks.items():
        values, tag = _block_wavelengths(other)
        if values and "_simulated_" not in other_name:
            stated.setdefault(tuple(values), f"block data_{other_name} {tag}")
    if len(stated) == 1:
        ((values, where),) = stated.items()
        return list(values), where
    return [], ""


def _x_grid(block: dict, y_tag: str, n: int, path: Path) -> tuple[np.ndarray, str]:
    prefer = "_pd_meas" if y_tag.startswith("_pd_meas") else "_pd_proc"
    for tag in sorted(X_TAGS, key=lambda t: not t.startswith(prefer)):
        if tag in block and isinstance(block[tag], list):
            return _column(block, tag, path, n)[0], tag
    for prefix in sorted(("_pd_meas", "_pd_proc"), key=lambda p: p != prefer):
        limits = [_scalar(block, f"{prefix}_2theta_range_{k}") for k in ("min", "max", "inc")]
        if all(limits):
            try:
                start, stop, step = (_cif_number(v)[0] for v in limits)
            except ValueError:
                raise XtalsolveError(f"{prefix}_2theta_range_min/max/inc are not numbers: {limits}", path) from None
            if step <= 0:
                raise XtalsolveError(f"{prefix}_2theta_range_inc is {step}; must be positive", path)
            x = start + step * np.arange(n)
            if abs(x[-1] - stop) > 0.5 * step:
                raise XtalsolveError(
                    f"{n} intensities do not fit {prefix}_2theta_range {start:g}-{stop:g} step {step:g} "
                    f"(would end at {x[-1]:g})",
                    path,
                )
            return x, f"{prefix}_2theta_range_min/inc"
    others = [t for t in OTHER_X if t in block]
    if others:
        raise XtalsolveError(f"profile x is {others[0]}; only 2theta profiles are supported", path)
    raise XtalsolveError(f"no 2theta values or _pd_meas_2theta_range_* for {y_tag}", path)


def read_powder_cif(path: Path, data: bytes, unit_hint: str) -> RawData:
    text = decode_text(data, path)
    from pymatgen.io.cif import CifFile  # pymatgen parses CIF blocks, loops and text fields

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cif = CifFile.from_str(text)
        except (ValueError, ZeroDivisionError, IndexError) as err:
            # pymatgen refuses a loop_ whose value count is not a multiple of its data names
            raise XtalsolveError(
                f"malformed CIF: a loop_ does not have whole rows of values (truncated file?) [{err}]", path
            ) from None
    blocks = {name: {k.lower(): v for k, v in block.data.items()} for name, block in cif.data.items()}
    if not blocks:
        raise XtalsolveError("no data_ block; not a CIF", path)

    chosen = None
    for candidates, calculated in ((MEASURED_Y, False), (CALCULATED_Y, True)):
        for name, block in blocks.items():
            y_tag = next((t for t in candidates if isinstance(block.get(t), list)), None)
            if y_tag:
                chosen = name, block, y_tag, calculated
                break
        if chosen:
            break
    if chosen is None:
        raise XtalsolveError(
            "no powder profile (_pd_meas_*, _pd_proc_* or _pd_calc_* intensity loop) in any data block; "
            "is this a structure CIF?",
            path,
        )
    name, block, y_tag, calculated = chosen
    y, y_su = _column(block, y_tag, path)
    n = len(y)
    x, x_tag = _x_grid(block, y_tag, n, path)
    sigma = None
    if np.isfinite(y_su).all():
        sigma, sigma_from = y_su, f"{y_tag} standard uncertainties"
    elif isinstance(block.get("_pd_proc_ls_weight"), list):
        weight = _column(block, "_pd_proc_ls_weight", path, n, allow_missing=True)[0]
        # zero or missing weight marks points left out of the refinement; give those a Poisson
        # estimate rather than an infinite sigma
        used = np.nan_to_num(weight, nan=0.0) > 0
        sigma = np.sqrt(np.maximum(y, 1.0))
        sigma[used] = 1.0 / np.sqrt(weight[used])
        sigma_from = "_pd_proc_ls_weight"
        if not used.all():
            sigma_from += f" ({int((~used).sum())} points without weight estimated as sqrt(max(y, 1)))"

    values, where = _profile_wavelengths(blocks, name)
    wavelengths = stated_wavelengths(values[:2], path, where)

    meta = {
        "format": "powder-cif",
        "cif_block": name,
        "y_tag": y_tag,
        "x_tag": x_tag,
        "calculated": calculated,
    }
    if sigma is not None:
        meta["sigma_from"] = sigma_from
    if wavelengths:
        meta["wavelength_statement"] = where
    radiation = _scalar(block, "_diffrn_radiation_type")
    if radiation:
        meta["radiation"] = radiation
    return RawData(x=x, y=y, sigma=sigma, unit="2theta", wavelengths=wavelengths, meta=meta)
