"""xtalsolve: crystal structures from nanocrystal powder patterns and local coordination from near-edge spectra.

Public API (imported lazily so that the command line starts fast):
    simulate_powder(structures, wavelength, two_theta=(min, max, step), size=None, biso=0.0) -> np.ndarray
    Instrument, Pattern, XtalsolveError
"""

__version__ = "0.1.0"

_EXPORTS = {
    "simulate_powder": "xtalsolve.physics.powder",
    "Instrument": "xtalsolve.physics.powder",
    "Pattern": "xtalsolve.pattern",
    "XtalsolveError": "xtalsolve.errors",
    "read_pattern": "xtalsolve.io",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'xtalsolve' has no attribute {name!r}")
