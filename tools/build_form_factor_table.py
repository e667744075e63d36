"""Write src/xtalsolve/resources/waasmaier_kirfel.json from the Waasmaier-Kirfel table shipped in xraydb.

Waasmaier & Kirfel, Acta Cryst. A51, 416-431 (1995): f0(s) = c + sum_{i=1..5} a_i exp(-b_i s^2),
s = sin(theta)/lambda in 1/angstrom, valid to s = 6 1/angstrom. Run once (needs ``pip install xraydb``);
the JSON is committed so that nothing is read from xraydb at run time.
"""

import json
from pathlib import Path

import xraydb

OUT = Path(__file__).resolve().parents[1] / "src" / "xtalsolve" / "resources" / "waasmaier_kirfel.json"


def main() -> None:
    db = xraydb.get_xraydb()
    table = db.tables["Waasmaier"]
    out = {
        "reference": "D. Waasmaier and A. Kirfel, Acta Cryst. A51, 416-431 (1995); as tabulated in xraydb "
        + getattr(xraydb, "__version__", "?"),
        "formula": "f0(s) = c + sum_i a_i exp(-b_i s^2), s = sin(theta)/lambda (1/angstrom)",
        "elements": {},
    }
    for row in db.query(table).all():
        if row.ion != row.element:  # neutral atoms only
            continue
        out["elements"][row.element] = {
            "Z": int(row.atomic_number),
            "a": json.loads(row.scale),
            "b": json.loads(row.exponents),
            "c": float(row.offset),
        }
    OUT.write_text(json.dumps(out, indent=1))
    print(f"wrote {len(out['elements'])} elements to {OUT}")


if __name__ == "__main__":
    main()
