"""What every format reader shares: the data as read (before any checking), file access, header parsing.

The readers in this package only *parse*; every physical or consistency check lives in
:func:`xtalsolve.io.patterns.read_pattern`, so all formats are held to the same rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xtalsolve.errors import XtalsolveError
from xtalsolve.radiation import MAX_WAVELENGTH_A, MIN_WAVELENGTH_A

MAX_POINTS = 1_000_000
"""Largest pattern accepted (points). Real powder patterns and PDFs have 10^3-10^5."""

MAX_FILE_BYTES = 256 * 2**20
"""Largest file read at all; 10^6 points of four 20-character columns is about 85 MB."""


@dataclass
class RawData:
    """A pattern as a format reader found it: arrays unchecked, plus what the file itself states.

    x, y: as read (x already converted to degrees / 1/angstrom / angstrom where the format uses
    other units, e.g. GSAS centidegrees). sigma: one standard deviation of y, or None when the
    file gives none. unit: the x unit the file states ("2theta", "q", "r"), None when it does not.
    wavelengths: angstrom, as stated by the file (Kalpha1 first, then Kalpha2); empty when none.
    """

    x: np.ndarray
    y: np.ndarray
    sigma: np.ndarray | None = None
    unit: str | None = None
    wavelengths: tuple[float, ...] = ()
    meta: dict = field(default_factory=dict)


def read_bytes(path: Path) -> bytes:
    """The whole file, after checking it exists, is a file, is not empty and is not absurdly large."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise XtalsolveError("no such file", path) from None
    except OSError as err:
        raise XtalsolveError(f"cannot read ({err.strerror})", path) from None
    if path.is_dir():
        raise XtalsolveError("is a directory, not a pattern file", path)
    if size == 0:
        raise XtalsolveError("file is empty", path)
    if size > MAX_FILE_BYTES:
        raise XtalsolveError(f"file too large ({size / 2**20:.0f} MB > {MAX_FILE_BYTES // 2**20} MB)", path)
    try:
        return path.read_bytes()
    except OSError as err:
        raise XtalsolveError(f"cannot read ({err.strerror})", path) from None


def decode_text(data: bytes, path: Path) -> str:
    """Text of a file that must be text: UTF-8 (BOM allowed), UTF-16 with BOM, else Latin-1 if it looks like text."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Windows software writes "Unicode" as UTF-16
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            raise XtalsolveError("file starts with a UTF-16 mark but is not UTF-16 text", path) from None
    if b"\x00" in data:
        raise XtalsolveError("binary file (contains NUL bytes), not a text pattern", path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Instrument software often writes Latin-1 headers (degree sign, angstrom); accept those, but not
        # bytes that are mostly control characters.
        control = sum(data.count(bytes([c])) for c in range(32) if c not in (9, 10, 12, 13))
        if control > 0.01 * len(data):
            raise XtalsolveError("binary file (not UTF-8 or Latin-1 text), not a text pattern", path) from None
        text = data.decode("latin-1")
    if not text.strip():
        raise XtalsolveError("file contains only whitespace", path)
    return text


def check_point_count(n: int, path: Path) -> None:
    if n > MAX_POINTS:
        raise XtalsolveError(f"too many points ({n} > {MAX_POINTS})", path)


def stated_wavelengths(values, path: Path, where: str) -> tuple[float, ...]:
    """Wavelengths (angstrom) a file states, each checked to be physical; ``where`` names the statement."""
    out = []
    for value in values:
        try:
            wl = float(value)
        except (TypeError, ValueError):
            raise XtalsolveError(f"{where} gives wavelength {value!r}, not a number", path) from None
        if not np.isfinite(wl) or not MIN_WAVELENGTH_A <= wl <= MAX_WAVELENGTH_A:
            raise XtalsolveError(
                f"{where} gives wavelength {value} angstrom, outside {MIN_WAVELENGTH_A}-{MAX_WAVELENGTH_A} angstrom",
                path,
            )
        out.append(wl)
    return tuple(out)


_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
# "wavelength_A: 1.5405;1.5443", "lambda=0.142773", "wavelength = 0.21281", "Wavelength (A) 0.4132"
_WAVELENGTH_STATEMENT = re.compile(
    rf"(?:wave[-_ ]?length|lambda)(?:_?a\b|\s*[(\[](?:a|å|angstrom)[)\]])?\s*[:=]?\s*({_NUMBER})"
    rf"(?:\s*[;,/]\s*({_NUMBER}))?",
    re.IGNORECASE,
)


def wavelengths_in_header(lines: list[str], path: Path) -> tuple[tuple[float, ...], str | None]:
    """The first wavelength statement in free-text header lines: (wavelengths, the line) or ((), None)."""
    for line in lines:
        match = _WAVELENGTH_STATEMENT.search(line)
        if match:
            values = [v for v in match.groups() if v is not None]
            where = f"header line {line.strip()[:60]!r}"
            return stated_wavelengths(values, path, where), line.strip()
    return (), None


def unit_from_name(name: str) -> str | None:
    """x unit named by a column label or unit statement ("2theta_deg", "Q(1/A)", "r_A", "tth"), else None."""
    label = name.strip().strip("#\"'").lower()
    if re.match(r"(2[-_ ]?theta|2th|tth|two[-_ ]?theta|2θ|twotheta)", label):
        return "2theta"
    if re.match(r"q(?![a-z])", label):
        return "q"
    if re.match(r"r(?![a-z])", label):
        return "r"
    return None


def pdf_like_name(path: Path) -> bool:
    """File names that by convention hold a PDF G(r): ``x.gr`` and the normalised ``x.gr.xy`` / ``x.gr.dat``."""
    name = path.name.lower()
    return name.endswith(".gr") or ".gr." in name
