"""Si K spectra -> first shell when the spectrum is broader than FEFF's (a stand-in for a measured spectrum's
resolution): the shipped diffusion model against template matching on the held-out crystalline splits.

Each held-out spectrum (test and val split of ``data/feff_cache/spectra_si_k.tar.gz``, split by material) is
convolved with a Gaussian of the given FWHM (eV). The model gets the broadened spectrum as it is (it was trained on
unbroadened FEFF spectra and has no broadening option); template matching (k = 5) gets the training split broadened
by the same FWHM, which is its best case (a user would have to guess the FWHM). Same consensus and metrics as
``benchmarks/spectra_amorphous.py`` (8 samples per spectrum).

    OMP_NUM_THREADS=1 nice python benchmarks/spectra_broadening.py [--fwhm 1.5,3] [--checkpoint X.pt]

Prints a table and writes benchmarks/results/spectra_broadening.json.
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CRYSTAL_CACHE = ROOT / "data" / "feff_cache" / "spectra_si_k.tar.gz"
OUT = ROOT / "benchmarks" / "results" / "spectra_broadening.json"
METRICS = ("n", "first_shell_mae_A", "bond_mae_A", "cn_error_rate", "cn_relative_error", "angle_w1_pooled_deg")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fwhm", default="1.5,3", help="Gaussian FWHMs (eV), comma-separated")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped edm_Si_K.pt")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*fractional coordinates rounded.*")
    import torch

    torch.set_num_threads(1)
    from xtalsolve.local.evaluate import evaluate_model, evaluate_template, format_cell
    from xtalsolve.local.library import build_library
    from xtalsolve.local.model import load_model
    from xtalsolve.local.predict import default_checkpoint_path

    ckpt = args.checkpoint or default_checkpoint_path("Si", "K")
    model, cfg = load_model(ckpt)
    with tempfile.TemporaryDirectory(prefix="xtal_cryst_") as tmp:
        with tarfile.open(CRYSTAL_CACHE) as tar:
            tar.extractall(tmp, filter="data")
        crystal = build_library(next(Path(tmp).iterdir()), "Si")
    train = crystal.split("train")
    rows: dict[str, dict] = {}
    t0 = time.perf_counter()
    for fwhm in [float(v) for v in args.fwhm.split(",")]:
        templates = train.broadened(fwhm)
        for split in ("test", "val"):
            held_out = crystal.split(split).broadened(fwhm)
            rows[f"diffusion {ckpt.name} | {split} | {fwhm:g} eV"] = evaluate_model(model, cfg, held_out, "Si",
                                                                                   samples=args.samples)
            rows[f"template k=5 | {split} | {fwhm:g} eV"] = evaluate_template(templates, held_out, "Si")
            for key in list(rows)[-2:]:
                print(key, {m: format_cell(rows[key][m]) for m in METRICS[1:]}, flush=True)
    result = {"checkpoint": str(ckpt), "samples": args.samples, "seconds": round(time.perf_counter() - t0, 1),
              "scores": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| method | split | FWHM | " + " | ".join(METRICS) + " |\n" + "|---" * (len(METRICS) + 3) + "|")
    for key, r in rows.items():
        method, split, fwhm = key.split(" | ")
        print(f"| {method} | {split} | {fwhm} | " + " | ".join(format_cell(r.get(m)) for m in METRICS) + " |")


if __name__ == "__main__":
    main()
