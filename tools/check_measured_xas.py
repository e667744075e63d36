#!/usr/bin/env python
"""Measured-spectrum check of the local-coordination pipeline: Fe K XANES of known oxides (../shared/data/
experimental_xas: hematite and wustite six-fold, magnetite 1/3 four-fold + 2/3 six-fold).

    python tools/check_measured_xas.py --cache cache/spectra_fe_k [--samples 8] [--keep-same-formula]
        [--broaden FWHM_eV] [--min-cn 4] [--align]

The template library is built from the FEFF cache; by default every FeO, Fe2O3 and Fe3O4 entry is dropped from it
so the answer cannot come from a computed copy of the same material. Prints one JSON line per spectrum.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
XAS = ROOT.parent / "shared" / "data" / "experimental_xas"
EXPECTED = {"Fe2O3_rt_01.xdi": "6", "FeO_rt_01.xdi": "6", "Fe3O4_rt_01.xdi": "4:6 = 1:2"}


def main() -> None:
    from xtalsolve.io.spectra import read_spectrum
    from xtalsolve.local.library import build_library
    from xtalsolve.local.predict import predict_local

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(ROOT / "cache" / "spectra_fe_k"))
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--keep-same-formula", action="store_true")
    p.add_argument("--broaden", type=float, default=0.0, help="Gaussian FWHM (eV) applied to the templates")
    p.add_argument("--align", action="store_true",
                   help="fit one energy shift, stretch and broadening of the templates to each spectrum first")
    p.add_argument("--min-cn", type=int, default=4,
                   help="drop templates with fewer O neighbours (two-fold 'Fe-O' sites of selenide oxides, whose "
                        "other neighbours lie beyond the Fe-O cutoff, are not oxide environments)")
    a = p.parse_args()
    lib = build_library(a.cache, "Fe")
    if not a.keep_same_formula:
        lib = lib.without_formulas({"FeO", "Fe2O3", "Fe3O4"})
    lib = lib.subset(lib.coordination_numbers("O", "Fe") >= a.min_cn)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lib.npz"
        lib.save(path)
        for name, expected in EXPECTED.items():
            spec = read_spectrum(XAS / name, "Fe", "K")
            pred = predict_local(spec, "Fe", "K", a.samples, "O", library=path, method="template",
                                 broaden_eV=a.broaden, align=a.align)
            s = pred.summary
            print(json.dumps({"file": name, "expected_cn": expected, "predicted_cn": s["coordination_number"],
                              "cn_counts": s["spread"]["coordination_number_counts"],
                              "mean_fe_o_A": s["mean_bond_length_A"], "library_size": len(lib),
                              "lcf_cn_fractions": s["mixture"]["coordination_number_fractions"],
                              "lcf_components": s["mixture"]["components"], "lcf_residual": s["mixture"]["residual"],
                              "alignment": s.get("alignment"),
                              "templates": [c.meta.get("formula") for c in pred.clusters]}))


if __name__ == "__main__":
    main()
