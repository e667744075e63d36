"""Peak shapes of powder diffraction: widths from instrument, crystallite size and microstrain, and the
Thompson-Cox-Hastings pseudo-Voigt that combines them (P. Thompson, D. E. Cox and J. B. Hastings,
J. Appl. Cryst. 20, 79 (1987)).

Widths are full widths at half maximum in degrees 2theta. Hand-written in torch because every width must be
differentiable with respect to the refined profile parameters.
"""

from __future__ import annotations

import math

import torch

SCHERRER_K = 0.9
"""Scherrer constant for FWHM (0.89-0.94 for spheres and cubes; 0.9 is the common choice)."""


def caglioti_fwhm(theta: torch.Tensor, u, v, w) -> torch.Tensor:
    """Instrumental Gaussian FWHM (degrees): sqrt(U tan^2 theta + V tan theta + W), U, V, W in deg^2."""
    t = torch.tan(theta)
    return torch.sqrt(torch.clamp(u * t * t + v * t + w, min=1e-12))


def scherrer_fwhm(theta: torch.Tensor, wavelength: float, size) -> torch.Tensor:
    """Size broadening FWHM (degrees) of crystallites of size ``size`` (angstrom): K lambda / (D cos theta)."""
    return torch.rad2deg(SCHERRER_K * wavelength / (size * torch.cos(theta)))


def strain_fwhm(theta: torch.Tensor, strain) -> torch.Tensor:
    """Microstrain broadening FWHM (degrees) for apparent strain ``strain`` = Delta d / d: 4 eps tan theta."""
    return torch.rad2deg(4.0 * strain * torch.tan(theta))


def tch_fwhm_eta(fwhm_gauss: torch.Tensor, fwhm_lorentz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Total FWHM and Lorentzian fraction eta of the pseudo-Voigt approximating the Voigt of the two widths."""
    g, l = fwhm_gauss, fwhm_lorentz
    fwhm = (g**5 + 2.69269 * g**4 * l + 2.42843 * g**3 * l**2 + 4.47163 * g**2 * l**3 + 0.07842 * g * l**4 + l**5) ** 0.2
    q = l / fwhm
    eta = torch.clamp(1.36603 * q - 0.47719 * q**2 + 0.11116 * q**3, 0.0, 1.0)
    return fwhm, eta


def pseudo_voigt(dx: torch.Tensor, fwhm: torch.Tensor, eta: torch.Tensor, area=1.0) -> torch.Tensor:
    """Pseudo-Voigt of area ``area`` at offsets ``dx`` from the peak centre (same unit as ``fwhm``).

    The per-peak factors are formed first (fwhm, eta and area are usually one value per peak, dx a window of
    points per peak), so only seven operations run over the points; the Lorentzian is skipped where eta is
    zero everywhere and nothing needs its gradient.
    """
    gauss_height = (1.0 - eta) * area * math.sqrt(4.0 * math.log(2.0) / math.pi) / fwhm
    gauss_rate = -4.0 * math.log(2.0) / (fwhm * fwhm)
    d2 = dx * dx
    profile = torch.exp(d2 * gauss_rate) * gauss_height
    needs_grad = torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in (dx, fwhm, eta, area))
    if needs_grad or not torch.is_tensor(eta) or bool((eta != 0).any()):
        hwhm = 0.5 * fwhm
        profile = profile + (eta * area * hwhm / math.pi) / (d2 + hwhm * hwhm)
    return profile


def pseudo_voigt_partials(dx: torch.Tensor, fwhm: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """The unit-area pseudo-Voigt at offsets ``dx`` = x - centre and its derivatives with respect to the peak
    centre, the FWHM and eta, stacked on a last axis of four: (value, d/d centre, d/d fwhm, d/d eta), in the
    unit of ``dx`` (degrees 2theta in the refinement). Closed form (checked against autograd in the tests):
    a Rietveld Jacobian needs these for every peak and point, and forward-mode autograd would render each peak
    once per refined parameter instead of once."""
    rate = 4.0 * math.log(2.0)
    d2 = dx * dx
    w2 = fwhm * fwhm
    gauss = math.sqrt(rate / math.pi) / fwhm * torch.exp(-rate * d2 / w2)
    h2 = 0.25 * w2
    denom = d2 + h2
    lorentz = 0.5 * fwhm / math.pi / denom
    value = gauss + eta * (lorentz - gauss)
    d_centre = (1.0 - eta) * gauss * (2.0 * rate * dx / w2) + eta * lorentz * (2.0 * dx / denom)
    d_fwhm = (1.0 - eta) * gauss * (2.0 * rate * d2 / (w2 * fwhm) - 1.0 / fwhm) + eta * (d2 - h2) / (2.0 * math.pi * denom * denom)
    return torch.stack([value, d_centre, d_fwhm, lorentz - gauss], dim=-1)


def berar_baldinozzi(dx: torch.Tensor, fwhm: torch.Tensor, two_theta: torch.Tensor, p1, p2, p3=0.0, p4=0.0) -> torch.Tensor:
    """Berar-Baldinozzi peak-asymmetry factor (J.-F. Berar and G. Baldinozzi, J. Appl. Cryst. 26, 128 (1993)),
    the multiplier of a symmetric profile that FullProf uses for axial divergence:

        A = 1 + (P1 Fa(z) + P2 Fb(z)) / tan(theta) + (P3 Fa(z) + P4 Fb(z)) / tan(2 theta),
        Fa(z) = 2 z exp(-z^2),  Fb(z) = 2 (2 z^2 - 3) Fa(z),  z = dx / FWHM,

    dx = offsets from the peak centre and fwhm in degrees 2theta, two_theta (degrees) the peak position.
    Fa and Fb are odd, so the factor moves intensity from one side of the peak to the other and conserves the
    area of any symmetric profile exactly; P1 < 0 moves the centroid to low angle, as axial divergence does
    below 90 degrees (the Fb terms mainly change the shape); the 1/tan(2 theta) terms change sign at 90 degrees,
    where axial divergence reverses. Chosen over Finger-Cox-Jephcoat because it costs one multiplication per profile point
    (FCJ needs a quadrature of tens of points per peak) while still capturing the low-angle tail; the FCJ
    geometry is the reference it is checked against (tests/test_refine_asymmetry.py)."""
    z = dx / fwhm
    fa = 2.0 * z * torch.exp(-z * z)
    fb = 2.0 * (2.0 * z * z - 3.0) * fa
    theta = torch.deg2rad(two_theta) / 2.0
    return 1.0 + (p1 * fa + p2 * fb) / torch.tan(theta) + (p3 * fa + p4 * fb) / torch.tan(2.0 * theta)
