"""Si K ELNES -> first shell: the XANES-trained model and template matching read EELS core-loss spectra.

For every crystalline test and val cluster (the held-out spectra of ``spectra_amorphous.py``, from the committed
FEFF cache ``data/feff_cache/spectra_si_k.tar.gz``):

1. FEFF10 ELNES of the same 49-atom cluster (300 keV, collection 10 mrad, convergence 1 mrad, orientation averaged;
   cached by input under ``cache/elnes_si_k``, so a re-run computes nothing) and its Pearson r with the cluster's
   XANES, both normalised on the feature grid (how good the dipole-limit reading is);
2. a measured-like EELS spectrum of it (``synthetic_eels``: 0.25 eV channels from 100 eV before the edge, a power
   law A E^-3 worth three edge steps at the edge, 2e4 counts per channel in the edge step, Poisson noise), written
   as EMSA (.msa) and read back, background-subtracted and normalised by the code of ``xtalsolve local``;
3. template matching (k = 5, the crystalline train split as templates) and the diffusion model (8 samples; the
   shipped ``src/xtalsolve/local/data/edm_Si_K.pt`` unless ``--checkpoint``) on those features, beside the same
   clusters' XANES.

    OMP_NUM_THREADS=1 python benchmarks/spectra_elnes.py [--checkpoint X.pt] [--workers 1]

Prints a table and writes benchmarks/results/spectra_elnes.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CRYSTAL_CACHE = ROOT / "data" / "feff_cache" / "spectra_si_k.tar.gz"
ELNES_CACHE = ROOT / "cache" / "elnes_si_k"
OUT = ROOT / "benchmarks" / "results" / "spectra_elnes.json"


def eels_features(lib, clusters, elnes_cache, settings, workdir: Path) -> tuple[np.ndarray, list[float]]:
    """Features of each cluster's synthetic EELS spectrum (through an .msa file and `xtalsolve local`'s reading),
    and the Pearson r of its noise-free FEFF ELNES with its XANES features."""
    from xtalsolve.io.spectra import (XasSpectrum, edge_energy, normalize, read_spectrum, subtract_power_law,
                                      synthetic_eels, write_eels_msa)
    from xtalsolve.local.feff import feff_input, input_key

    edge = edge_energy("Si", "K")
    feats, r_feff = [], []
    for i, cl in enumerate(clusters):
        energy, sigma, _ = elnes_cache.get(input_key(feff_input(cl, settings)))
        clean = normalize(XasSpectrum(energy, sigma, "feff elnes", "Si", "K")).on_grid(lib.grid)
        r_feff.append(float(np.corrcoef(clean, lib.features[i])[0, 1]))
        e, counts = synthetic_eels(energy, sigma, edge, seed=i)
        spec = read_spectrum(write_eels_msa(workdir / f"{i:03d}.msa", e, counts), "Si", "K")
        feats.append(normalize(subtract_power_law(spec)).on_grid(lib.grid))
    return np.array(feats), r_feff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None, help="diffusion checkpoint; default the shipped one")
    p.add_argument("--no-model", action="store_true")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--workers", type=int, default=1, help="parallel FEFF runs")
    p.add_argument("--limit", type=int, default=None, help="only the first N spectra of each set (a smoke run)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from xtalsolve.local.clusters import Cluster
    from xtalsolve.local.evaluate import evaluate_model, evaluate_template
    from xtalsolve.local.feff import FeffSettings, SpectrumCache, compute_spectra
    from xtalsolve.local.library import build_library
    from xtalsolve.local.predict import default_checkpoint_path

    settings = FeffSettings(spectroscopy="elnes")
    result: dict = {"elnes_settings": dataclasses.asdict(settings),
                    "eels": {"dispersion_eV": 0.25, "start_eV_before_edge": 100.0, "background": "A E^-3",
                             "background_at_edge_in_edge_steps": 3.0, "edge_step_counts": 2e4, "noise": "Poisson"}}
    model = cfg = None
    if not args.no_model:
        from xtalsolve.local.model import load_model

        ckpt = args.checkpoint or default_checkpoint_path("Si", "K")
        model, cfg = load_model(ckpt)
        result["checkpoint"] = str(ckpt.resolve().relative_to(ROOT)) if ckpt.resolve().is_relative_to(ROOT) else str(
            ckpt)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="xtal_elnes_") as tmp:
        with tarfile.open(CRYSTAL_CACHE) as tar:
            tar.extractall(tmp, filter="data")
        xanes_dir = next(p for p in Path(tmp).iterdir() if p.is_dir())
        crystal = build_library(xanes_dir, "Si")
        xanes_cache = SpectrumCache(xanes_dir)
        train = crystal.split("train")
        held = {name: crystal.split(name) for name in ("test", "val")}
        if args.limit:
            held = {name: lib.subset(range(min(args.limit, len(lib)))) for name, lib in held.items()}

        def cluster_of(meta):
            rec = xanes_cache.get(meta["key"])[2]
            return Cluster(tuple(rec["cluster"]["species"]), np.array(rec["cluster"]["positions_A"]))

        clusters = {name: [cluster_of(m) for m in lib.meta] for name, lib in held.items()}
        t0 = time.perf_counter()
        elnes_cache = SpectrumCache(ELNES_CACHE)
        result["feff"] = compute_spectra([c for cs in clusters.values() for c in cs], elnes_cache, settings,
                                         workers=args.workers, total=sum(map(len, clusters.values())))
        result["feff_seconds"] = round(time.perf_counter() - t0, 1)
        work = Path(tmp, "msa")
        work.mkdir()
        result["feff_elnes_vs_xanes_pearson"] = {}
        for name, lib in held.items():
            feats, r_feff = eels_features(lib, clusters[name], elnes_cache, settings, work)
            eels = dataclasses.replace(lib, features=feats)
            result["feff_elnes_vs_xanes_pearson"][name] = {"median": round(float(np.median(r_feff)), 5),
                                                           "min": round(float(np.min(r_feff)), 5)}
            rows[f"template k=5 | crystalline {name}, XANES"] = evaluate_template(train, lib, "Si")
            rows[f"template k=5 | crystalline {name}, ELNES (EELS)"] = evaluate_template(train, eels, "Si")
            if model is not None:
                tag = f"diffusion {Path(result['checkpoint']).name}"
                rows[f"{tag} | crystalline {name}, XANES"] = evaluate_model(model, cfg, lib, "Si", samples=args.samples)
                rows[f"{tag} | crystalline {name}, ELNES (EELS)"] = evaluate_model(model, cfg, eels, "Si",
                                                                                   samples=args.samples)
    result["scores"] = rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    cols = ("n", "first_shell_mae_A", "bond_mae_A", "cn_error_rate", "cn_relative_error", "angle_w1_pooled_deg")
    print("| method | set | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for key, r in rows.items():
        method, subset = key.split(" | ")
        print(f"| {method} | {subset} | " + " | ".join(
            f"{r[c]:.4f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols) + " |")
    print("FEFF ELNES vs XANES (normalised, Pearson r):", result["feff_elnes_vs_xanes_pearson"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
