"""Forward models: structure in, signal out (powder diffraction, Debye scattering, PDF)."""
