"""Training of the pattern-conditioned crystal diffusion model: config, data, loss, loop, checkpoints.

Data follow the binding rules of the shared data README (section 3): ``protocol = "mp20"`` trains on
``training_pool("mp20")`` (mp20_train only) and validates on mp20_val; ``protocol = "pxrdnet"`` trains on
``training_pool("pxrdnet")`` (benchmark ids and their duplicates removed) with a seeded held-out split for
validation. Patterns are simulated on the fly with the augmentation of :mod:`xtalsolve.data.augment`.

Every random draw of step k comes from a generator seeded by (seed, k), and the batch order from (seed, epoch),
so a run resumed from a checkpoint continues exactly as the uninterrupted run would. Checkpoints are plain
dicts of tensors and built-in types (``torch.load(..., weights_only=True)``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from xtalsolve.data.augment import Augmentation, training_patterns
from xtalsolve.diffusion.corruption import canonical_cell
from xtalsolve.diffusion.encoder import cfg_dropout
from xtalsolve.diffusion.model import CrystalDiffusion, ModelConfig
from xtalsolve.errors import XtalsolveError

CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class TrainConfig:
    """One training run (units: steps, structures per batch; lr per step). ``augment`` overrides fields of
    :class:`~xtalsolve.data.augment.Augmentation`; ``model`` those of :class:`ModelConfig`."""

    run_dir: str = "runs/diffusion"
    protocol: str = "mp20"
    limit: int | None = None  # first N structures of the training pool (None: all)
    max_atoms: int | None = 20
    val_limit: int | None = 256
    val_fraction: float = 0.075  # pxrdnet protocol: held-out share of the pool
    seed: int = 0
    steps: int = 10_000
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    p_uncond: float = 0.1
    lattice_weight: float = 1.0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    val_every: int = 500
    val_batches: int = 4
    threads: int = 2
    device: str = "cpu"  # "cpu", "cuda" or "auto"; patterns are always simulated on the CPU
    model: dict = field(default_factory=dict)
    augment: dict = field(default_factory=dict)

    def model_config(self) -> ModelConfig:
        return ModelConfig(**self.model)

    def augmentation(self) -> Augmentation:
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in self.augment.items()}
        return replace(Augmentation(), **options)


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """TrainConfig from a JSON or YAML file; ``overrides`` (not None) replace its values."""
    path = Path(path)
    if not path.is_file():
        raise XtalsolveError("no such config file", path)
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as err:  # noqa: BLE001 - json / yaml raise their own error types
        raise XtalsolveError(f"cannot parse config ({type(err).__name__}: {err})", path) from None
    if not isinstance(raw, dict):
        raise XtalsolveError("config must be a mapping of option names to values", path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(raw, path)


def config_from_dict(raw: dict, source: str | Path = "config") -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise XtalsolveError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}", source)
    config = TrainConfig(**raw)
    try:
        config.model_config()
        config.augmentation()
    except TypeError as err:
        raise XtalsolveError(f"bad model or augment option ({err})", source) from None
    if config.protocol not in ("mp20", "pxrdnet"):
        raise XtalsolveError(f"protocol must be mp20 or pxrdnet, not {config.protocol!r}", source)
    if config.steps < 1 or config.batch_size < 1:
        raise XtalsolveError("steps and batch_size must be positive", source)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Data


def ordered_only(tensors, max_atoms: int | None = None):
    """The crystals with ordered, fully occupied sites (and at most ``max_atoms`` atoms): what CSP diffusion models."""
    keep = []
    for i in range(len(tensors)):
        lo, hi = tensors.offsets[i], tensors.offsets[i + 1]
        n = hi - lo
        ok = n > 0 and np.all(tensors.occupancy[lo:hi] == 1.0) and len(np.unique(tensors.site[lo:hi])) == n
        keep.append(bool(ok) and (max_atoms is None or n <= max_atoms))
    return tensors.subset(np.flatnonzero(keep))


def training_data(config: TrainConfig):
    """(train, validation) StructureTensors under the config's protocol (data README section 3)."""
    from xtalsolve.data import training_pool, validation_set

    pool = training_pool(config.protocol, max_atoms=config.max_atoms)
    if config.protocol == "mp20":
        train_pool, val_pool = pool, validation_set("mp20")
    else:
        train_pool, val_pool = pool.split(config.val_fraction, seed=config.seed)
    train = ordered_only(train_pool.load(limit=config.limit), config.max_atoms)
    val = ordered_only(val_pool.load(limit=config.val_limit), config.max_atoms)
    return train, val


# ---------------------------------------------------------------------------------------------------------------
# Loss


def _generator(seed: int, stream: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + step) % (2**63 - 1))


def diffusion_loss(model: CrystalDiffusion, batch, generator: torch.Generator, p_uncond: float,
                   augment: Augmentation, lattice_weight: float = 1.0) -> dict:
    """Denoising score-matching loss of one CrystalBatch (float32, CPU): patterns simulated and augmented,
    condition dropped with ``p_uncond``, one time per crystal for both fields. All random draws happen on the CPU
    from ``generator`` (reproducible on any device); the network runs on the model's device."""
    device = next(model.parameters()).device
    patterns, pmask, _ = training_patterns(batch, augment, generator)
    lattice, frac = canonical_cell(batch.lattice.double(), batch.frac.double())
    mask = batch.mask
    x0 = model.lattice.encode(lattice, batch.n_sites).float()
    t = model.lattice.sample_t(len(batch), generator)
    x_t, eps = model.lattice.add_noise(x0, t, generator)
    f_t, target = model.torus.add_noise(frac.float(), t, generator)
    f_t = f_t * mask[..., None]
    uncond = cfg_dropout(len(batch), p_uncond, generator)
    on = lambda *xs: [x.to(device) for x in xs]
    patterns, pmask, uncond, numbers, f_t, x_t, t, eps, target, mask = on(
        patterns, pmask, uncond, batch.numbers, f_t, x_t, t, eps, target, mask)
    cond = model.encoder(patterns, pmask, uncond)
    eps_hat, score_hat = model(numbers, f_t, x_t, t, cond)
    loss_lattice = ((eps_hat - eps) ** 2).mean()
    m = mask[..., None].float()
    loss_frac = (((score_hat - target) ** 2) * m).sum() / (3 * m.sum())
    return {"loss": lattice_weight * loss_lattice + loss_frac, "loss_lattice": loss_lattice, "loss_frac": loss_frac}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": str(torch.__version__)}
    try:
        out["xtalsolve"] = version("xtalsolve")
    except PackageNotFoundError:
        out["xtalsolve"] = "unknown"
    return out


def _save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        torch.save(obj, handle)
    os.replace(handle.name, path)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = sorted(Path(run_dir, "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict, loaded safely (weights_only: tensors and built-in types only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as err:
        raise XtalsolveError(f"cannot read checkpoint ({err})", path) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise XtalsolveError("not an xtalsolve diffusion checkpoint (or a different format version)", path)
    return state


def load_model(path: str | Path, ema: bool = True) -> CrystalDiffusion:
    """The model of a checkpoint (EMA weights by default; ``best.pt`` holds only those), in eval mode."""
    state = load_checkpoint(path)
    model = CrystalDiffusion(ModelConfig(**state["config"]["model"]))
    model.load_state_dict(state["ema"] if ema or "model" not in state else state["model"])
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Loop


def _lr(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to 10 % at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _batch_rows(config: TrainConfig, n: int, step: int) -> np.ndarray:
    per_epoch = max(n // config.batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([config.seed, epoch]).permutation(n)
    return order[k * config.batch_size : (k + 1) * config.batch_size]


@torch.no_grad()
def validation_loss(model, val, config: TrainConfig, augment: Augmentation) -> float:
    """Mean loss over the first ``val_batches`` batches of the validation set, with fixed noise (comparable
    across steps and runs)."""
    values = []
    for j in range(config.val_batches):
        rows = np.arange(j * config.batch_size, min((j + 1) * config.batch_size, len(val)))
        if len(rows) == 0:
            break
        out = diffusion_loss(model, val.batch(rows, dtype=torch.float32), _generator(config.seed, 1, j), 0.0,
                             augment, config.lattice_weight)
        values.append(float(out["loss"]))
    return float(np.mean(values)) if values else float("nan")


def train(config: TrainConfig, data=None, progress: bool = True, log=print) -> dict:
    """Train (or resume) the run in ``config.run_dir``; returns {"step", "best_val", "run_dir", "steps_per_s"}.

    data: optional (train, val) StructureTensors (default :func:`training_data`). Writes
    ``checkpoints/step_*.pt`` (full state), ``best.pt`` (EMA weights of the lowest validation loss),
    ``log.jsonl`` (one line per step: losses, lr; validation lines carry "val_loss") and ``config.json``.
    """
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(int(config.threads), 1))
    train_set, val_set = training_data(config) if data is None else data
    train_set = ordered_only(train_set, config.max_atoms)
    val_set = ordered_only(val_set, config.max_atoms)
    if len(train_set) == 0:
        raise XtalsolveError("no training structures left after filtering", "config")
    augment = config.augmentation()

    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    torch.manual_seed(config.seed)  # parameter initialisation
    model = CrystalDiffusion(config.model_config()).to(device)
    ema = CrystalDiffusion(config.model_config()).to(device)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step, best_val = 0, float("inf")
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        state = load_checkpoint(resume)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step, best_val = int(state["step"]), float(state["best_val"])
        log(f"resumed {resume} at step {step}")
        kept = [r for r in read_log(run_dir) if r["step"] <= step]  # drop what the interrupted run logged later
        (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    (run_dir / "config.json").write_text(json.dumps(asdict(config), indent=2))
    log_file = open(run_dir / "log.jsonl", "a")  # noqa: SIM115 - closed in the finally below

    def write(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    def checkpoint() -> None:
        _save({"format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
               "optimizer": optimizer.state_dict(), "config": asdict(config), "versions": _versions(),
               "best_val": best_val, "n_train": len(train_set), "n_val": len(val_set)},
              run_dir / "checkpoints" / f"step_{step:07d}.pt")
        for old in sorted((run_dir / "checkpoints").glob("step_*.pt"))[: -max(config.keep_checkpoints, 1)]:
            old.unlink()

    def validate() -> None:
        nonlocal best_val
        value = validation_loss(ema, val_set, config, augment) if len(val_set) else float("nan")
        write({"step": step, "val_loss": value})
        if value < best_val:
            best_val = value
            _save({"format": CHECKPOINT_FORMAT, "step": step, "ema": ema.state_dict(),
                   "config": asdict(config), "versions": _versions(), "best_val": best_val,
                   "n_train": len(train_set), "n_val": len(val_set)}, run_dir / "best.pt")

    started, first_step = time.perf_counter(), step
    bar = _progress(progress, config.steps, step)
    try:
        if step == 0:
            validate()
        model.train()
        while step < config.steps:
            rows = _batch_rows(config, len(train_set), step)
            batch = train_set.batch(rows, dtype=torch.float32)
            lr = _lr(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = diffusion_loss(model, batch, _generator(config.seed, 0, step), config.p_uncond, augment,
                                 config.lattice_weight)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1.0 - decay)
            step += 1
            write({"step": step, "lr": lr, "grad_norm": float(grad_norm), **{k: float(v.detach()) for k, v in out.items()}})
            if bar is not None:
                bar[0].update(bar[1], completed=step, description=f"loss {float(out['loss']):.3f}")
            if step % config.val_every == 0 or step == config.steps:
                validate()
            if step % config.checkpoint_every == 0 or step == config.steps:
                checkpoint()
    finally:
        log_file.close()
        if bar is not None:
            bar[0].stop()
    elapsed = time.perf_counter() - started
    rate = (step - first_step) / elapsed if elapsed > 0 and step > first_step else float("nan")
    return {"step": step, "best_val": best_val, "run_dir": str(run_dir), "steps_per_s": rate, "device": str(device),
            "n_train": len(train_set), "n_val": len(val_set)}


def _progress(enabled: bool, total: int, done: int):
    if not enabled:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TimeRemainingColumn())
    task = bar.add_task("training", total=total, completed=done)
    bar.start()
    return bar, task


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of ``log.jsonl`` (for plots and tests)."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

