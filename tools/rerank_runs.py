"""Offline analysis of stored benchmark solves (benchmarks/pxrdnet_protocol.py run folders): where the true crystal
stands among the candidates, and how often it would be first under other ranking prices.

    python tools/rerank_runs.py benchmarks/results/pxrdnet_runs_TAG --set pxrdnet
    python tools/rerank_runs.py benchmarks/results/mp20_val_runs_TAG --set mp20_val --misses

For each run folder (<id>_D<size>_<arm>/ with summary.json and candidates/) the true crystal is read from the
benchmark's set, and every refined candidate is matched (strict and loose, :func:`xtalsolve.metrics.match`) in its
screened and its refined form; matches are cached in the runs folder (_matches.json), so a second call is fast.
It prints the rank-1 strict / loose matches among the refined candidates for a grid of parameter prices, prior
prices and ranking bases, scored by the solver's own rules (:func:`xtalsolve.solve._scored`,
:func:`~xtalsolve.solve._rank_key`; first row: the default prices and each run's own basis), and with
``--misses`` the screen place of the first matching candidate of every loose rank-1 miss. Re-ranking can only
reorder the candidates that were refined: a change of price that would refine others is not seen here.
"""

from __future__ import annotations

import argparse
import itertools
import json
import warnings
from pathlib import Path

TOLERANCES = ("strict", "loose")


def material(run: Path) -> str:
    """The material id of a run folder (<id>_D<size>_<arm>)."""
    return run.name.split("_")[0]


def references(set_name: str, ids: list[str]) -> dict:
    """The true crystals of ``ids`` in the benchmark set ``set_name`` (pxrdnet: the benchmark pool; else a
    structure set such as mp20_test or mp20_val)."""
    from xtalsolve.data import evaluation_set, load_structures

    if set_name == "pxrdnet":
        pool = evaluation_set("pxrdnet")
        wanted = [key for key in pool.keys if key[1] in set(ids)]
        tensors = type(pool)(pool.protocol, pool.role, tuple(wanted)).load()
        return {key[1]: tensors.structure(i) for i, key in enumerate(wanted)}
    return dict(zip(ids, load_structures(set_name, ids=ids).structures))


def matched(cif: str, truth) -> list[bool]:
    """[strict, loose] match of a CIF text against ``truth``; an unreadable CIF matches nothing."""
    from pymatgen.core import Structure

    from xtalsolve.metrics import match

    try:
        structure = Structure.from_str(cif, fmt="cif")
    except Exception:  # noqa: BLE001 - a CIF pymatgen cannot build is a miss
        return [False, False]
    return [match(structure, truth, tol).matched for tol in TOLERANCES]


def refined_records(run: Path, truth, cache: dict) -> list[dict]:
    """The refined candidate records of one run, each with "_screen" and "_refined" [strict, loose] matches."""
    out = []
    for path in sorted((run / "candidates").glob("*.json")):
        record = json.loads(path.read_text())
        if "rwp" not in record or "screen_residual" not in record:
            continue
        key = f"{run.name}/{path.stem}"
        if key not in cache:
            cache[key] = {"screen": matched(record["screen_cif"], truth), "refined": matched(record["cif"], truth)}
        record["_screen"], record["_refined"] = cache[key]["screen"], cache[key]["refined"]
        out.append(record)
    return out


def first(records: list[dict], basis: str, parameter: float, prior: float) -> list[bool]:
    """[strict, loose] match of the candidate the solver would rank first among ``records`` with these prices
    (per free parameter, per prior rank in the screen) and ranking ``basis``."""
    from xtalsolve.solve import SolveSettings, _rank_key, _scored

    if not records:
        return [False, False]
    settings = SolveSettings(parameter_price=parameter, prior_price=prior)
    scored = [_scored(dict(r), settings, prior) for r in records]
    return min(scored, key=lambda r: _rank_key(r, basis))["_refined"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="a benchmark's run folder, e.g. benchmarks/results/pxrdnet_runs_TAG")
    parser.add_argument("--set", required=True, help="pxrdnet, mp20_test or mp20_val: where the true crystals are")
    parser.add_argument("--misses", action="store_true", help="screen place of the truth in each rank-1 miss")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from xtalsolve.solve import RANK_BY, SolveSettings

    set_name = "mp20_test" if args.set == "mp20" else args.set

    if not args.runs.is_dir():
        parser.error(f"{args.runs}: no such folder")
    runs = sorted(d for d in args.runs.iterdir() if (d / "summary.json").is_file())
    if not runs:
        parser.error(f"{args.runs}: no run folders with a summary.json")
    summaries = {d: json.loads((d / "summary.json").read_text()) for d in runs}
    truth_of = dict(zip(runs, map(references(set_name, [material(d) for d in runs]).get, map(material, runs))))
    cache_file = args.runs / "_matches.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    records = {d: refined_records(d, truth_of[d], cache) for d in runs}
    cache_file.write_text(json.dumps(cache))

    ceiling = sum(any(r["_refined"][0] for r in rs) for rs in records.values())
    print(f"{len(runs)} runs; the true crystal (strict) among the refined in {ceiling}")
    default = [first(rs, summaries[d]["ranking"]["by"], SolveSettings.parameter_price, SolveSettings.prior_price)
               for d, rs in records.items()]
    print(f"{'basis':6s} {'parameter':>9s} {'prior':>6s} {'strict@1':>9s} {'loose@1':>8s}")
    print(f"{'own':6s} {SolveSettings.parameter_price:9.2f} {SolveSettings.prior_price:6.2f} "
          f"{sum(h[0] for h in default):9d} {sum(h[1] for h in default):8d}")
    for basis, parameter, prior in itertools.product([b for b in RANK_BY if b != "auto"], (0.0, 0.01, 0.02, 0.04),
                                                     (0.0, 0.01, 0.03)):
        hits = [first(rs, basis, parameter, prior) for rs in records.values()]
        print(f"{basis:6s} {parameter:9.2f} {prior:6.2f} {sum(h[0] for h in hits):9d} {sum(h[1] for h in hits):8d}")

    if args.misses:
        from pymatgen.core import Structure

        from xtalsolve.metrics import match

        print("\nrank-1 misses (loose): screen place of the first matching candidate, its score / the best's")
        for run, summary in summaries.items():
            ranked = summary["candidates"]
            if ranked and match(Structure.from_file(run / ranked[0]["cif"]), truth_of[run], "loose").matched:
                continue
            place = None
            for k, c in enumerate(summary["screened"][:20]):
                if match(Structure.from_file(run / c["cif"]), truth_of[run], "loose").matched:
                    ratio = c["screen_score"] / summary["screened"][0]["screen_score"]
                    place = f"place {k}, x{ratio:.2f}, {'refined' if c['refined'] else 'not refined'}"
                    break
            print(f"  {run.name}: {place or 'no match among the first 20 screened'}")


if __name__ == "__main__":
    main()
