"""Peak shapes of powder diffraction: widths from instrument, crystallite size and microstrain, and the
Thompson-Cox-Hastings pseudo-Voigt that combines them (P. Thompson, D. E. Cox and J. B. Hastings,
J. Appl. Cryst. 20, 79 (1987)).

Widths are full widths at half maximum in degrees 2theta. Hand-written in torch because every width must be
differentiable with respect to the refined profile parameters.
"""

from __future__ import annotations

import math

import torch

from xtalsolve.errors import XtalsolveError

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


_TCH_FWHM = (1.0, 2.69269, 2.42843, 4.47163, 0.07842, 1.0)  # G^(5-k) L^k coefficients of the TCH width
_TCH_ETA = (1.36603, -0.47719, 0.11116)  # q, q^2, q^3 coefficients of the TCH Lorentzian fraction


def _width_partials(theta, wavelength, u, v, w, x, y, strain, size) -> dict:
    """Partial derivatives (d fwhm, d eta), each (B, H), of the TCH widths of :func:`profile_widths` with respect to
    theta, u, v, w, x, y, strain and size (size's None when size is None)."""
    deg = 180.0 / math.pi
    t, sec = torch.tan(theta), 1.0 / torch.cos(theta)
    dt = sec * sec  # d tan / d theta
    c2_raw = u * t * t + v * t + w
    c2_live = (c2_raw >= 1e-12).to(theta.dtype)  # torch.clamp passes the gradient where the bound holds
    strain_width = 4.0 * deg * strain * t
    gauss = torch.sqrt(torch.clamp(c2_raw, min=1e-12) + strain_width**2)
    lorentz = x * t + y * sec
    size_term = 0.0 if size is None else SCHERRER_K * wavelength * deg * sec / size
    lorentz = lorentz + size_term
    # d gauss / d input = (d c2 / 2 + strain_width d strain_width) / gauss; d lorentz / d input
    d_gauss = {"theta": (0.5 * c2_live * (2.0 * u * t + v) * dt + strain_width * 4.0 * deg * strain * dt) / gauss,
               "u": 0.5 * c2_live * t * t / gauss, "v": 0.5 * c2_live * t / gauss, "w": 0.5 * c2_live / gauss,
               "strain": strain_width * 4.0 * deg * t / gauss}
    d_lorentz = {"theta": x * dt + (y * sec + size_term) * t, "x": t, "y": sec}
    if size is not None:
        d_lorentz["size"] = -size_term / size
    powers_g = [gauss ** (5 - k) for k in range(6)]
    powers_l = [lorentz**k for k in range(6)]
    total = sum(c * pg * pl for c, pg, pl in zip(_TCH_FWHM, powers_g, powers_l))
    fwhm = total**0.2
    by_g = sum(c * (5 - k) * gauss ** (4 - k) * powers_l[k] for k, c in enumerate(_TCH_FWHM[:5]))
    by_l = sum(c * k * powers_g[k] * lorentz ** (k - 1) for k, c in enumerate(_TCH_FWHM) if k)
    q = lorentz / fwhm
    eta_raw = _TCH_ETA[0] * q + _TCH_ETA[1] * q**2 + _TCH_ETA[2] * q**3
    eta_live = ((eta_raw >= 0.0) & (eta_raw <= 1.0)).to(theta.dtype)
    by_q = eta_live * (_TCH_ETA[0] + 2.0 * _TCH_ETA[1] * q + 3.0 * _TCH_ETA[2] * q**2)
    partials = {}
    for name in ("theta", "u", "v", "w", "x", "y", "strain", "size"):
        dg, dl = d_gauss.get(name), d_lorentz.get(name)
        if dg is None and dl is None:
            partials[name] = None
            continue
        d_total = (0.0 if dg is None else by_g * dg) + (0.0 if dl is None else by_l * dl)
        d_fwhm = 0.2 * fwhm / total * d_total
        d_eta = by_q * ((0.0 if dl is None else dl) - q * d_fwhm) / fwhm
        partials[name] = (torch.broadcast_to(d_fwhm, theta.shape), torch.broadcast_to(d_eta, theta.shape))
    return partials


_WIDTH_INPUTS = ("theta", "u", "v", "w", "x", "y", "strain", "size")


class _ProfileWidths(torch.autograd.Function):
    """TCH fwhm and eta with closed-form derivatives (see :func:`profile_widths`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(theta, wavelength, u, v, w, x, y, strain, size):
        return _composed_widths(theta, wavelength, u, v, w, x, y, strain, size)

    @staticmethod
    def setup_context(ctx, inputs, output):
        theta, wavelength, *rest = inputs
        ctx.wavelength = wavelength
        ctx.has_size = rest[-1] is not None
        saved = (theta, *rest[:-1]) + ((rest[-1],) if ctx.has_size else ())
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def _partials(ctx):
        saved = ctx.saved_tensors
        size = saved[7] if ctx.has_size else None
        return _width_partials(saved[0], ctx.wavelength, *saved[1:7], size)

    @staticmethod
    def jvp(ctx, d_theta, _, *tangents):
        partials = _ProfileWidths._partials(ctx)
        d_fwhm = d_eta = 0.0
        for name, tangent in zip(_WIDTH_INPUTS, (d_theta, *tangents)):
            if tangent is not None and partials[name] is not None:
                d_fwhm = d_fwhm + partials[name][0] * tangent
                d_eta = d_eta + partials[name][1] * tangent
        if isinstance(d_fwhm, float):  # no tangent reached the widths
            zero = torch.zeros_like(ctx.saved_tensors[0])
            return zero, zero.clone()
        return d_fwhm, d_eta

    @staticmethod
    def backward(ctx, g_fwhm, g_eta):
        partials = _ProfileWidths._partials(ctx)
        saved = ctx.saved_tensors
        grads = []
        for k, name in enumerate(_WIDTH_INPUTS):
            if partials[name] is None or not ctx.needs_input_grad[0 if k == 0 else k + 1]:
                grads.append(None)
                continue
            g = g_fwhm * partials[name][0] + g_eta * partials[name][1]
            grads.append(g if k == 0 else g.sum(-1, keepdim=True).sum_to_size(saved[k].shape))
        return grads[0], None, *grads[1:]


DERIVATIVES = ("autograd", "closed-form")


def check_derivatives(derivatives: str) -> None:
    """Raise a clear error for a ``derivatives`` choice other than those of DERIVATIVES."""
    if derivatives not in DERIVATIVES:
        raise XtalsolveError(f"derivatives must be 'autograd' or 'closed-form', not {derivatives!r}")


def _composed_widths(theta, wavelength, u, v, w, x, y, strain, size):
    gauss = torch.sqrt(caglioti_fwhm(theta, u, v, w) ** 2 + strain_fwhm(theta, strain) ** 2)
    lorentz = x * torch.tan(theta) + y / torch.cos(theta)
    if size is not None:
        lorentz = lorentz + scherrer_fwhm(theta, wavelength, size)
    return tch_fwhm_eta(gauss, lorentz)


def profile_widths(theta: torch.Tensor, wavelength: float, u, v, w, x, y, strain, size=None,
                   derivatives: str = "autograd") -> tuple[torch.Tensor, torch.Tensor]:
    """FWHM (degrees 2theta) and Lorentzian fraction (B, H) of reflections at Bragg angles ``theta`` (B, H,
    radians): the TCH pseudo-Voigt of the Gaussian sqrt(U tan^2 + V tan + W + (4 eps tan)^2) and the Lorentzian
    X tan + Y / cos + K lambda / (D cos) widths (U, V, W deg^2; X, Y deg; strain eps; size D angstrom, None =
    infinite; each (B, 1)), composed of caglioti_fwhm, strain_fwhm, scherrer_fwhm and tch_fwhm_eta.
    ``derivatives`` "closed-form": the same values with hand-written derivatives in every input, because
    forward-mode autograd (the Rietveld Jacobian) pays per operation and these widths are some forty of them;
    "autograd": torch differentiates the operations."""
    check_derivatives(derivatives)
    if derivatives == "closed-form":
        return _ProfileWidths.apply(theta, wavelength, u, v, w, x, y, strain, size)
    return _composed_widths(theta, wavelength, u, v, w, x, y, strain, size)


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
