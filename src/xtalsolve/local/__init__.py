"""Local coordination from near-edge spectra (XANES/ELNES): absorber-centred clusters, FEFF10 training data,
template-matching and EXAFS-style baselines, and a spectrum-conditioned E(3)-equivariant diffusion model.

Modules: clusters (cutting, perturbing, first-shell descriptors), feff (FEFF10 runs + cache), dataset (Si/Fe sites
of the shared crystal sets, material split), library (edge-aligned feature library), baselines, metrics, model
(EGNN diffusion), evaluate, predict (consensus + output files for ``xtalsolve local``).
"""
