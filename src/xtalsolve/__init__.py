"""xtalsolve: crystal structures from nanocrystal powder patterns and local coordination from near-edge spectra."""

__version__ = "0.1.0"

from xtalsolve.errors import XtalsolveError
from xtalsolve.pattern import Pattern
from xtalsolve.physics.powder import Instrument, simulate_powder

__all__ = ["Instrument", "Pattern", "XtalsolveError", "simulate_powder"]
