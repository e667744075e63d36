"""GSAS raw powder data, constant wavelength (.gsa .gss .gsas .fxye .fxy .xra, and .dat/.txt with a BANK line).

Layout (GSAS manual, "Powder data file"): line 1 title; optional ``Instrument parameter file: NAME``
line; ``#`` comments; then per histogram a line
``BANK ibank nchan nrec CONST start step 0 0 TYPE`` with start/step in centidegrees, followed by the
records. TYPE (STD when omitted):

- STD: 10 fields of (I2,F6.0) per record: number of counters n (blank = 1) and counts c;
  sigma = sqrt(c / n), as GSAS and GSAS-II do (sigma 1 for zero counts). Free-format records with
  exactly the expected number of values are accepted too.
- ESD: 5 pairs of (F8.0,F8.0): y, sigma.
- FXYE / FXY: free format, one point per line: 2theta (centidegrees), y[, sigma].

Only the first bank is read. Time-of-flight banks (RALF, SLOG, TIME_MAP) and the TOF-only ALT
record layout are refused with a clear message. GSAS raw files do not hold the wavelength; it is
taken from the instrument parameter file (``ICONS`` of a GSAS .prm, or ``Lam``/``Lam1``/``Lam2``
of a GSAS-II .instprm) named on line 2 or sharing the data file's base name, else from a
``wavelength``/``lambda`` statement in the title or comments.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from xtalsolve.errors import XtalsolveError
from xtalsolve.io._base import (
    RawData,
    check_point_count,
    decode_text,
    stated_wavelengths,
    wavelengths_in_header,
)

_ICONS = re.compile(r"^INS\s+\d*\s*ICONS\s+(\S+)\s+(\S+)", re.MULTILINE)
_INSTPRM_LAM = re.compile(r"^\s*(Lam|Lam1|Lam2)\s*[:=]\s*(\S+)", re.MULTILINE)
_TOF_TYPES = ("RALF", "SLOG", "TIME_MAP")


def looks_like_gsas(data: bytes) -> bool:
    """A BANK record near the top: GSAS data whatever the extension."""
    head = data[:4096].decode("latin-1").splitlines()[:12]
    return any(line.startswith("BANK ") for line in head[1:])


def _sfloat(field: str) -> float:
    """Fortran F-format field: blank is zero."""
    return float(field) if field.strip() else 0.0


def _values_std(records: list[str], nchan: int) -> tuple[np.ndarray, np.ndarray]:
    counts, sigma = [], []
    for record in records:
        remaining = nchan - len(counts)
        if remaining <= 0:
            break
        tokens = record.split()
        if len(tokens) == min(10, remaining) and len(record.rstrip()) != 80:
            fields = [(1, float(t)) for t in tokens]  # free format, no counter numbers
        else:
            padded = record.ljust(80)
            fields = []
            for i in range(0, 80, 8):
                if not padded[i : i + 8].strip():  # a blank field ends the record (short, truncated record)
                    break
                ncount = padded[i : i + 2].strip()
                fields.append((max(int(ncount), 1) if ncount else 1, _sfloat(padded[i + 2 : i + 8])))
        for ncount, value in fields[:remaining]:
            counts.append(value)
            sigma.append(np.sqrt(value / ncount) if value > 0 else 1.0)
    return np.array(counts), np.array(sigma)


def _values_esd(records: list[str], nchan: int) -> tuple[np.ndarray, np.ndarray]:
    y, sigma = [], []
    for record in records:
        padded = record.ljust(80)
        for i in range(0, 80, 16):
            if len(y) == nchan or not padded[i : i + 16].strip():
                break
            y.append(_sfloat(padded[i : i + 8]))
            sigma.append(_sfloat(padded[i + 8 : i + 16]))
    return np.array(y), np.array(sigma)


def _values_fxy(records: list[str], nchan: int, with_esd: bool, path: Path):
    rows = [r.split() for r in records if r.strip()][:nchan]
    ncol = 3 if with_esd else 2
    for k, row in enumerate(rows):
        if len(row) < ncol:
            raise XtalsolveError(f"data record {k + 1} of the bank has {len(row)} values; expected {ncol}", path)
    table = np.array([row[:ncol] for row in rows], dtype=float).reshape(-1, ncol)
    return table[:, 0] / 100.0, table[:, 1], (table[:, 2] if with_esd else None)


def _instrument_wavelengths(path: Path, named: str | None) -> tuple[tuple[float, ...], str | None]:
    """Wavelengths from the instrument parameter file named in the data file or sharing its base name."""
    candidates = [path.parent / Path(named.replace("\\", "/")).name] if named else []
    candidates += [path.with_suffix(ext) for ext in (".prm", ".PRM", ".instprm", ".inst", ".ins")]
    for candidate in candidates:
        if not candidate.is_file() or candidate.stat().st_size > 1_000_000:
            continue
        text = candidate.read_bytes().decode("latin-1")
        where = f"instrument file {candidate.name}"
        icons = _ICONS.search(text)
        if icons:  # GSAS: "INS  1 ICONS  lambda1  lambda2 ..."; lambda2 = 0 for a single line
            values = [icons.group(1)] + ([icons.group(2)] if float(icons.group(2)) > 0 else [])
            return stated_wavelengths(values, path, f"{where} ICONS"), candidate.name
        lam = {m.group(1): m.group(2).strip("[").split(",")[0] for m in _INSTPRM_LAM.finditer(text)}
        values = [lam["Lam"]] if "Lam" in lam else [lam[k] for k in ("Lam1", "Lam2") if k in lam]
        if values:  # GSAS-II .instprm: "Lam:1.5406" or "Lam1:" and "Lam2:"
            return stated_wavelengths(values, path, f"{where} Lam"), candidate.name
    return (), None


def read_gsas(path: Path, data: bytes, unit_hint: str) -> RawData:
    lines = decode_text(data, path).splitlines()
    title = lines[0].strip()
    named_prm = None
    comments = [title]
    bank_index = None
    for i, line in enumerate(lines[1:], 1):
        if i == 1 and line[:4].lower() == "inst" and ":" in line:
            named_prm = line.split(":", 1)[1].strip().strip("[]").strip()
        elif line.startswith("#"):
            comments.append(line)
        elif line.startswith("BANK"):
            bank_index = i
            break
    if bank_index is None:
        raise XtalsolveError("no BANK record; not a GSAS powder data file", path)
    bank = lines[bank_index].strip()
    fields = bank.split()
    if len(fields) < 5 or not fields[2].isdigit():
        raise XtalsolveError(f"malformed BANK record {bank!r} (expected BANK ibank nchan nrec bintyp ...)", path)
    nchan, bintyp = int(fields[2]), fields[4].upper()
    if bintyp in _TOF_TYPES:
        raise XtalsolveError(f"time-of-flight GSAS bank ({bintyp}); only constant wavelength (CONST) is read", path)
    if bintyp not in ("CONST", "CONS"):
        raise XtalsolveError(f"unknown GSAS bin type {bintyp!r} (expected CONST)", path)
    types = [f.upper() for f in fields[5:] if f.isalpha()]
    kind = types[-1] if types else "STD"
    if kind not in ("STD", "ESD", "FXYE", "FXY"):
        raise XtalsolveError(f"GSAS {kind} records are not supported (use STD, ESD, FXY or FXYE)", path)
    if nchan == 0:
        raise XtalsolveError("BANK record declares 0 points", path)
    check_point_count(nchan, path)

    records = []
    for line in lines[bank_index + 1 :]:
        if line.startswith(("BANK", "TIME_MAP")) or "\x1a" in line:
            break
        if not line.startswith("#"):
            records.append(line)
    if kind in ("STD", "ESD"):
        try:
            start, step = float(fields[5]) / 100.0, float(fields[6]) / 100.0
        except (IndexError, ValueError):
            raise XtalsolveError(f"BANK record {bank!r}: CONST needs start and step (centidegrees)", path) from None
        if step <= 0:
            raise XtalsolveError(f"BANK record gives a step of {fields[6]} centidegrees", path)
        y, sigma = _values_std(records, nchan) if kind == "STD" else _values_esd(records, nchan)
        x = start + step * np.arange(len(y))
    else:
        x, y, sigma = _values_fxy(records, nchan, kind == "FXYE", path)
    if len(y) < nchan:
        raise XtalsolveError(f"BANK declares {nchan} points but only {len(y)} are present (truncated file?)", path)

    meta = {"format": f"gsas-{kind.lower()}", "title": title, "bank": bank}
    wavelengths, prm = _instrument_wavelengths(path, named_prm)
    if prm:
        meta["wavelength_statement"] = f"instrument parameter file {prm}"
    else:
        wavelengths, statement = wavelengths_in_header(comments, path)
        if statement:
            meta["wavelength_statement"] = statement
        if named_prm:
            meta["instrument_file_missing"] = named_prm
    other_banks = sum(line.startswith("BANK") for line in lines[bank_index + 1 :])
    if other_banks:
        meta["banks_ignored"] = other_banks
    return RawData(x=x, y=y, sigma=sigma, unit="2theta", wavelengths=wavelengths, meta=meta)
