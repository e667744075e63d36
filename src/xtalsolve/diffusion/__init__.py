"""Data-guided diffusion for crystal structures from powder patterns (issue #3), in small composable pieces:

corruption  forward processes: VP DDPM on the lattice log-metric 6-vector, wrapped normal on coordinates
denoiser    CSPNet-style periodic message passing (permutation equivariant, translation / rotation invariant)
encoder     1D CNN pattern encoder with classifier-free dropout
model       the two networks plus their processes (one checkpointable module); denoiser callables for sampling
guidance    DPS data guidance through the differentiable powder model; classifier-free combination
sampler     predictor-corrector reverse diffusion for a fixed composition
train       config, on-the-fly augmented patterns, AdamW + EMA, resumable checkpoints, loss log

Heavy modules are imported on use: ``from xtalsolve.diffusion.sampler import sample``.
"""
