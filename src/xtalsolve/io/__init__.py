"""Pattern file I/O: :func:`read_pattern` for every supported format, :func:`write_xy` for text output.

Formats: column text (.xy .xye .dat .csv .txt), PDF G(r) (.gr, .gr.xy), PANalytical .xrdml,
GSAS constant-wavelength raw data (.fxye .fxy .gsa .gss .gsas .xra), IUCr powder CIF (.cif).
"""

from xtalsolve.io._base import MAX_POINTS
from xtalsolve.io.patterns import FORMATS, read_pattern, write_xy

__all__ = ["FORMATS", "MAX_POINTS", "read_pattern", "write_xy"]
