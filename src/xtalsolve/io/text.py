"""Column text: .xy .xye .dat .csv .txt and PDF .gr (PDFgetX2/X3/N output, or bare columns).

Layout understood: optional header lines, then whitespace-, comma- or semicolon-separated numeric
columns (decimal commas, as in "10,02;105", are recognised from the first data line). The header
ends at the first all-numeric line, or, in PDFgetX/N files whose header holds numeric tables, at
the ``#### start data`` marker. Comment lines (``#``, ``!``, ``%``, ``//``) may
appear anywhere. Columns: x y [sigma]; a PDF may also have r G dr dG (PDFgetX convention; dG is
sigma, dr is ignored).

The header is searched for the x unit (``# x_unit: q``, ``# columns: 2theta_deg intensity``, the SPEC
``#L r(A) G(r)`` line, ``# x: r (angstrom)``, or a column-name line such as ``2theta,intensity``)
and the wavelength (``# wavelength_A: 1.5405;1.5443``, ``lambda=0.142773``, ``wavelength = 0.21281``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from xtalsolve.errors import XtalsolveError
from xtalsolve.io._base import (
    MAX_POINTS,
    RawData,
    check_point_count,
    decode_text,
    unit_from_name,
    wavelengths_in_header,
)

COMMENT = ("#", "!", "%", "//")
_SEPARATORS = re.compile(r"[\s,;]+")
_DECIMAL_COMMA = re.compile(r"\d,\d")
_START_DATA = re.compile(r"^#+\s*start\s+data", re.IGNORECASE)
_KEY_VALUE = re.compile(r"^[#!%/\s]*([A-Za-z][\w ]*?)\s*[:=]\s*(.*)$")


def _tokens(line: str, decimal_comma: bool = False) -> list[str]:
    line = line.strip().replace('"', "")
    if decimal_comma:
        line = line.replace(",", ".")
    return _SEPARATORS.split(line.strip(",;"))


def _uses_decimal_comma(line: str) -> bool:
    """European exports: "10,02;105" or "10,02 105,5". A comma between digits inside a field is a decimal mark."""
    if ";" in line:
        return "," in line
    fields = line.split()
    return len(fields) >= 2 and any(_DECIMAL_COMMA.search(f) for f in fields)


def _is_numeric(line: str) -> bool:
    stripped = line.strip()
    if not stripped or stripped.startswith(COMMENT):
        return False
    try:
        [float(t) for t in _tokens(stripped, _uses_decimal_comma(stripped))]
    except ValueError:
        return False
    return True


def _data_start(lines: list[str]) -> int:
    """Index of the first line of the data block (``len(lines)`` when there is none)."""
    for i, line in enumerate(lines[:20000]):
        if _START_DATA.match(line.strip()):
            return i + 1
    return next((i for i, line in enumerate(lines) if _is_numeric(line)), len(lines))


def _stated_unit_and_names(header: list[str], ncol: int) -> tuple[str | None, list[str] | None]:
    """x unit stated in the header (or None) and column names when the header gives them."""
    names = None
    statements: dict[str, str] = {}
    for line in header:
        stripped = line.strip()
        if stripped.startswith("#L "):  # SPEC column labels (PDFgetX/N); the last one labels the data
            names = stripped[3:].split()
            continue
        match = _KEY_VALUE.match(stripped)
        if match:
            key = match.group(1).strip().lower().replace(" ", "_")
            statements.setdefault(key, match.group(2).strip())
    if "columns" in statements:
        names = statements["columns"].split() or names
    if names is None and header:
        # a column-name line right before the data, e.g. "2theta,intensity" in a .csv
        last = header[-1].strip()
        if last and not last.startswith(COMMENT) and len(_tokens(last)) == ncol:
            names = _tokens(last)
    for value in (statements.get("x_unit"), names[0] if names else None, statements.get("x")):
        unit = unit_from_name(value.split()[0]) if value and value.split() else None
        if unit:
            return unit, names
    return None, names


def _sigma_column(ncol: int, unit: str, names: list[str] | None, path: Path) -> int | None:
    if ncol == 2:
        return None
    if ncol == 3:
        return 2
    if ncol == 4 and unit == "r":
        if names and len(names) == 4 and names[2].lower().startswith("dg"):
            return 2
        return 3  # r G dr dG
    expected = "x y [sigma], or r G dr dG for a PDF" if ncol == 4 else "x y [sigma]"
    raise XtalsolveError(f"{ncol} columns; expected {expected}", path)


def read_text(path: Path, data: bytes, unit_hint: str) -> RawData:
    """Columns of numbers with an optional header. ``unit_hint``: the x unit to assume if the file says none."""
    n_lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    if n_lines > MAX_POINTS:  # refuse before parsing: count lines, less the header
        head = data[: 1 << 20].decode("latin-1").splitlines()[:-1]
        check_point_count(n_lines - _data_start(head), path)

    lines = decode_text(data, path).splitlines()
    start = _data_start(lines)
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    first_data = decimal_comma = None
    for number, line in enumerate(lines[start:], start + 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(COMMENT):
            continue
        if first_data is None:
            first_data, decimal_comma = number - 1, _uses_decimal_comma(stripped)
        rows.append(_tokens(stripped, decimal_comma))
        line_numbers.append(number)
    if not rows:
        raise XtalsolveError("no data lines found (only header or comment lines)", path)
    check_point_count(len(rows), path)
    header = lines[:first_data]

    ncol = len(rows[0])
    for tokens, number in zip(rows, line_numbers):
        if len(tokens) != ncol:
            raise XtalsolveError(
                f"line {number} has {len(tokens)} columns but line {line_numbers[0]} has {ncol}", path
            )
    if ncol == 1:
        raise XtalsolveError("only one column; need x and y (and optionally sigma)", path)
    try:
        table = np.array(rows, dtype=float)
    except ValueError:
        for tokens, number in zip(rows, line_numbers):
            for token in tokens:
                try:
                    float(token)
                except ValueError:
                    raise XtalsolveError(f"line {number}: {token!r} is not a number", path) from None
        raise
    bad = ~np.isfinite(table).all(axis=1)
    if bad.any():
        k = int(np.argmax(bad))
        raise XtalsolveError(f"line {line_numbers[k]}: NaN or infinite value ({' '.join(rows[k])})", path)

    stated_unit, names = _stated_unit_and_names(header, ncol)
    sigma_col = _sigma_column(ncol, stated_unit or unit_hint, names, path)
    wavelengths, statement = wavelengths_in_header(header, path)
    meta = {"format": "text", "columns": names or ncol, "header_lines": len(header), "decimal_comma": decimal_comma}
    if statement:
        meta["wavelength_statement"] = statement
    return RawData(
        x=table[:, 0],
        y=table[:, 1],
        sigma=None if sigma_col is None else table[:, sigma_col],
        unit=stated_unit,
        wavelengths=wavelengths,
        meta=meta,
    )
