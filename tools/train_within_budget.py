"""Train the crystal diffusion model within a fixed wall-clock budget (for a lent GPU's lease).

A short probe run (inside the learning-rate warm-up, where the schedule does not depend on the total number of
steps) measures the steps per second; the run's ``steps`` are then set so that the cosine schedule ends at the
budget, and training resumes from the probe's checkpoint with ``time_limit_s`` as a safety stop. The EMA weights
of the best validation loss (``best.pt``), the loss log and a summary are copied to ``--out``.

    python tools/train_within_budget.py --config configs/gpu_lease.json --data-dir .devdata/mp20 --budget 420 --out OUT

The data folder comes from ``xtalsolve train --config configs/gpu_lease.json --export-data .devdata/mp20``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from xtalsolve.diffusion.train import load_config, train
from xtalsolve.errors import XtalsolveError

RESERVE_S = 20.0  # final validation, checkpoint and copies


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--budget", type=float, required=True, help="wall-clock seconds for both runs")
    parser.add_argument("--probe-steps", type=int, default=200)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        config = load_config(args.config, data_dir=args.data_dir, run_dir=args.run_dir)
        if args.probe_steps >= config.warmup:
            raise XtalsolveError(f"--probe-steps {args.probe_steps} must lie inside the warm-up ({config.warmup})",
                                 args.config)
        probe = train(replace(config, steps=args.probe_steps, checkpoint_every=args.probe_steps,
                              val_every=args.probe_steps), progress=False)
        print("probe", json.dumps(probe), flush=True)
        left = args.budget - (time.perf_counter() - started) - RESERVE_S
        steps = args.probe_steps + max(int(probe["steps_per_s"] * left), 1)
        final = replace(config, steps=steps, time_limit_s=max(left, 1.0))
        summary = train(final, progress=False)
    except XtalsolveError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary.update(probe_steps_per_s=probe["steps_per_s"], planned_steps=steps, wall_s=time.perf_counter() - started,
                   config=asdict(final))
    print("final", json.dumps(summary), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(final.run_dir)
    for name in ("best.pt", "log.jsonl"):
        shutil.copy(run / name, out / name)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
