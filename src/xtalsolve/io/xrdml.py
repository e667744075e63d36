"""PANalytical XRDML (XML, schemas 1.0-2.x): the first 2theta scan of the first measurement.

Read: ``usedWavelength`` (kAlpha1, kAlpha2, ratioKAlpha2KAlpha1), the 2Theta ``positions``
(``startPosition``/``endPosition``, equally spaced, or ``listPositions``), ``intensities`` or
``counts``, and ``commonCountingTime``/``countingTimes``. Namespaces are ignored (matched on local
names) so every schema version reads the same. Intensities in counts per second are turned back into
counts with the counting time to give Poisson sigmas. ``beamAttenuationFactors`` are recorded, not applied.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from xtalsolve.errors import XtalsolveError
from xtalsolve.io._base import RawData, check_point_count, stated_wavelengths


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(element, name: str):
    return next((c for c in element if _local(c.tag) == name), None)


def _children(element, name: str) -> list:
    return [c for c in element if _local(c.tag) == name]


def _numbers(element, what: str, path: Path) -> np.ndarray:
    tokens = (element.text or "").split()
    check_point_count(len(tokens), path)
    try:
        return np.array(tokens, dtype=float)
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        raise XtalsolveError(f"<{what}> holds {bad!r}, not a number", path) from None


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _scalar(element, what: str, path: Path) -> float:
    if element is None or not (element.text or "").strip():
        raise XtalsolveError(f"<{what}> is missing or empty", path)
    try:
        return float(element.text)
    except ValueError:
        raise XtalsolveError(f"<{what}> holds {element.text.strip()!r}, not a number", path) from None


def read_xrdml(path: Path, data: bytes, unit_hint: str) -> RawData:
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, LookupError) as err:  # LookupError: unknown encoding in the XML declaration
        raise XtalsolveError(f"not valid XRDML (XML error: {err})", path) from None
    if _local(root.tag) != "xrdMeasurements":
        raise XtalsolveError(f"XML root element is <{_local(root.tag)}>, not XRDML <xrdMeasurements>", path)
    measurements = _children(root, "xrdMeasurement")
    if not measurements:
        raise XtalsolveError("no <xrdMeasurement> element", path)
    measurement = measurements[0]
    meta: dict = {"format": "xrdml", "schema": root.tag[1:].split("}")[0] if root.tag.startswith("{") else None}

    wavelengths: tuple[float, ...] = ()
    used = _child(measurement, "usedWavelength")
    if used is not None:
        meta["wavelength_intended"] = used.get("intended")
        lines = [_child(used, name) for name in ("kAlpha1", "kAlpha2")]
        values = [e.text.strip() for e in lines if e is not None and (e.text or "").strip()]
        wavelengths = stated_wavelengths(values, path, "<usedWavelength>")
        if wavelengths:
            meta["wavelength_statement"] = "<usedWavelength> kAlpha1/kAlpha2"
        ratio = _child(used, "ratioKAlpha2KAlpha1")
        if ratio is not None and (ratio.text or "").strip():
            meta["ka2_ka1_ratio"] = _scalar(ratio, "ratioKAlpha2KAlpha1", path)

    scans = [s for s in _children(measurement, "scan") if _child(s, "dataPoints") is not None]
    if not scans:
        raise XtalsolveError("no <scan> with <dataPoints>", path)
    meta["scans"] = len(scans)
    scan = scans[0]
    meta["scan_axis"] = scan.get("scanAxis")
    points = _child(scan, "dataPoints")

    counts_el = _child(points, "intensities")
    if counts_el is None:
        counts_el = _child(points, "counts")
    if counts_el is None:
        raise XtalsolveError("scan has neither <intensities> nor <counts>", path)
    y = _numbers(counts_el, _local(counts_el.tag), path)
    n = len(y)
    if n < 2:
        raise XtalsolveError(f"only {n} intensity value(s) in the scan", path)

    two_theta = next((p for p in _children(points, "positions") if p.get("axis") == "2Theta"), None)
    if two_theta is None:
        axes = [p.get("axis") for p in _children(points, "positions")]
        raise XtalsolveError(f"no 2Theta positions (axes: {', '.join(map(str, axes))}); not a powder scan", path)
    if (two_theta.get("unit") or "deg") != "deg":
        raise XtalsolveError(f"2Theta positions in unit {two_theta.get('unit')!r}; expected 'deg'", path)
    listed = _child(two_theta, "listPositions")
    if listed is not None:
        x = _numbers(listed, "listPositions", path)
        if len(x) != n:
            raise XtalsolveError(f"{len(x)} 2Theta positions but {n} intensities", path)
    else:
        start = _scalar(_child(two_theta, "startPosition"), "startPosition", path)
        end = _scalar(_child(two_theta, "endPosition"), "endPosition", path)
        x = np.linspace(start, end, n)

    # counting time(s), seconds: turn counts per second back into counts for Poisson sigmas
    time = None
    common = _child(points, "commonCountingTime")
    listed_times = _child(points, "countingTimes")
    if common is not None:
        time = _scalar(common, "commonCountingTime", path)
    elif listed_times is not None:
        time = _numbers(listed_times, "countingTimes", path)
        if len(time) != n:
            raise XtalsolveError(f"{len(time)} counting times but {n} intensities", path)
    if _child(points, "beamAttenuationFactors") is not None:
        meta["beam_attenuation_factors"] = "present, not applied"
    unit = (counts_el.get("unit") or "counts").lower()
    meta["intensity_unit"] = unit
    sigma = None
    if unit in ("counts per second", "cps") and time is not None and np.all(np.asarray(time) > 0):
        counts = y * time
        sigma = np.sqrt(np.maximum(counts, 1.0)) / time
        meta["sigma_estimated"] = True
    meta["counting_time_s"] = float(np.mean(time)) if time is not None else None
    return RawData(x=x, y=y, sigma=sigma, unit="2theta", wavelengths=wavelengths, meta=meta)
