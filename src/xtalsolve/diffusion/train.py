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
from types import SimpleNamespace

import numpy as np
import torch

from xtalsolve.data.augment import Augmentation, training_patterns
from xtalsolve.diffusion.corruption import canonical_cell
from xtalsolve.diffusion.encoder import cfg_dropout
from xtalsolve.diffusion.model import CrystalDiffusion, ModelConfig
from xtalsolve.errors import XtalsolveError

CHECKPOINT_FORMAT = 1
SIMULATE_ON = ("loader", "device")  # where training patterns are simulated (TrainConfig.simulate_on)


@dataclass(frozen=True)
class TrainConfig:
    """One training run (units: steps, structures per batch; lr per step). ``augment`` overrides fields of
    :class:`~xtalsolve.data.augment.Augmentation`; ``model`` those of :class:`ModelConfig`."""

    run_dir: str = "runs/diffusion"
    protocol: str = "mp20"
    limit: int | None = None  # first N structures of the training pool (None: all)
    data_dir: str | None = None  # train.npz / val.npz of :func:`export_training_data` (no shared data needed)
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
    device: str = "cpu"  # "cpu", "cuda" or "auto"
    # where training patterns are simulated: "loader" (CPU) or "device" (in line, on the training device). On the
    # H200 lease with 16 cores, in line there gave 21 batches of 128 per second, 14 loader workers 20-26 steps/s:
    # the reflection enumeration stays on the CPU; "device" pays where a GPU has few CPU cores beside it
    simulate_on: str = "loader"
    loader_workers: int = 0  # processes simulating the next steps' patterns beside the network (0: in line)
    init_from: str | None = None  # a checkpoint whose EMA weights start a new run (fine-tuning); same model config
    time_limit_s: float | None = None  # stop (validated and checkpointed, resumable) after this wall time
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
    if config.simulate_on not in SIMULATE_ON:
        raise XtalsolveError(f"simulate_on must be one of {', '.join(SIMULATE_ON)}, not {config.simulate_on!r}",
                             source)
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


def _pools(config: TrainConfig):
    """(train, validation) pools of the config's protocol (data README section 3)."""
    from xtalsolve.data import training_pool, validation_set

    pool = training_pool(config.protocol, max_atoms=config.max_atoms)
    if config.protocol == "mp20":
        return pool, validation_set("mp20")
    return pool.split(config.val_fraction, seed=config.seed)


def training_data(config: TrainConfig):
    """(train, validation) StructureTensors under the config's protocol (data README section 3); read from
    ``config.data_dir`` when set (written by :func:`export_training_data` under the same protocol)."""
    if config.data_dir is not None:
        train, val = _exported(config)
        return train.subset(np.arange(min(len(train), config.limit or len(train)))), val
    return _parsed(config, limit=config.limit)


def _parsed(config: TrainConfig, limit: int | None = None, workers: int = 1):
    """(train, validation) parsed from the protocol's pools: ordered crystals of at most ``max_atoms``."""
    train_pool, val_pool = _pools(config)
    train = ordered_only(train_pool.load(limit=limit, workers=workers), config.max_atoms)
    val = ordered_only(val_pool.load(limit=config.val_limit, workers=workers), config.max_atoms)
    return train, val


def export_training_data(config: TrainConfig, folder: str | Path, workers: int = 1) -> dict:
    """Parse the config's (train, validation) sets once and write them to ``folder`` (train.npz, val.npz,
    data.json) for ``data_dir``: a training machine then needs neither the shared data nor pymatgen."""
    train, val = _parsed(config, workers=workers)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train.save(folder / "train.npz")
    val.save(folder / "val.npz")
    meta = {**_export_key(config), "n_train": len(train), "n_val": len(val)}
    (folder / "data.json").write_text(json.dumps(meta, indent=2))
    return meta


def _exported(config: TrainConfig):
    from xtalsolve.data.structures import StructureTensors

    folder = Path(config.data_dir)
    try:
        meta = json.loads((folder / "data.json").read_text())
        train, val = StructureTensors.load(folder / "train.npz"), StructureTensors.load(folder / "val.npz")
    except (OSError, ValueError, KeyError) as err:
        raise XtalsolveError(f"not an exported training-data folder ({err})", folder) from None
    wanted = _export_key(config)
    differ = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
    if differ:
        said = ", ".join(f"{k} {got!r} (config: {want!r})" for k, (got, want) in differ.items())
        raise XtalsolveError(f"exported for other settings: {said}", folder)
    return train, val


def _export_key(config: TrainConfig) -> dict:
    """The settings that decide an export's content (the pxrdnet split also depends on seed and fraction)."""
    key = {"protocol": config.protocol, "max_atoms": config.max_atoms, "val_limit": config.val_limit}
    if config.protocol == "pxrdnet":
        key.update(seed=config.seed, val_fraction=config.val_fraction)
    return key


# ---------------------------------------------------------------------------------------------------------------
# Loss


def _generator(seed: int, stream: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed((seed * 1_000_003 + stream * 7_919 + step) % (2**63 - 1))


def loss_inputs(model, batch, generator: torch.Generator, p_uncond: float, augment: Augmentation) -> dict:
    """Everything random of one training step, drawn from ``generator`` on its device (the batch is moved
    there): the batch's augmented patterns, the noised lattice and coordinates with their targets, and the
    condition dropout. ``model`` needs only its (parameter-free) corruption processes ``lattice`` and ``torus``,
    so data-loader workers can run this beside the network on the CPU, or the training loop in line on the GPU."""
    batch = batch.to(generator.device)
    patterns, pmask, _ = training_patterns(batch, augment, generator)
    lattice, frac = canonical_cell(batch.lattice.double(), batch.frac.double())
    mask = batch.mask
    x0 = model.lattice.encode(lattice, batch.n_sites).float()
    t = model.lattice.sample_t(len(batch), generator)
    x_t, eps = model.lattice.add_noise(x0, t, generator)
    f_t, target = model.torus.add_noise(frac.float(), t, generator)
    f_t = f_t * mask[..., None]
    uncond = cfg_dropout(len(batch), p_uncond, generator)
    return {"patterns": patterns, "pmask": pmask, "uncond": uncond, "numbers": batch.numbers, "f_t": f_t,
            "x_t": x_t, "t": t, "eps": eps, "target": target, "mask": mask}


def network_loss(model: CrystalDiffusion, inputs: dict, lattice_weight: float = 1.0) -> dict:
    """Denoising score-matching loss of :func:`loss_inputs` on the model's device: MSE of the lattice noise
    plus MSE of the normalised torus score over the real (unpadded) atoms."""
    device = next(model.parameters()).device
    x = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    cond = model.encoder(x["patterns"], x["pmask"], x["uncond"])
    eps_hat, score_hat = model(x["numbers"], x["f_t"], x["x_t"], x["t"], cond)
    loss_lattice = ((eps_hat - x["eps"]) ** 2).mean()
    m = x["mask"][..., None].float()
    loss_frac = (((score_hat - x["target"]) ** 2) * m).sum() / (3 * m.sum())
    return {"loss": lattice_weight * loss_lattice + loss_frac, "loss_lattice": loss_lattice, "loss_frac": loss_frac}


class _StepInputs(torch.utils.data.Dataset):
    """The loss inputs of training steps ``first, first + 1, ...``, each a pure function of (seed, step), so
    that data-loader workers simulate patterns in parallel without changing what any step sees; drawn on
    ``device`` (a CPU for the workers, the training device in line)."""

    def __init__(self, config: TrainConfig, train_set, processes, augment: Augmentation, first: int,
                 device: str | torch.device = "cpu"):
        self.config, self.train_set, self.processes = config, train_set, processes
        self.augment, self.first, self.device = augment, first, device

    def __len__(self) -> int:
        return max(self.config.steps - self.first, 0)

    def __getitem__(self, k: int) -> dict:
        step = self.first + k
        rows = _batch_rows(self.config, len(self.train_set), step)
        batch = self.train_set.batch(rows, dtype=torch.float32)
        return loss_inputs(self.processes, batch, _generator(self.config.seed, 0, step, self.device),
                           self.config.p_uncond, self.augment)


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)


def _step_inputs(config: TrainConfig, train_set, model: CrystalDiffusion, augment: Augmentation, first: int,
                 device: torch.device):
    """Iterator over the loss inputs of steps ``first`` ... ``config.steps - 1``: simulated on the CPU by
    ``config.loader_workers`` processes ahead of the network (in line when 0), or (``simulate_on`` "device") in
    line on the training device, where a GPU simulates a batch's patterns faster than a CPU core."""
    processes = SimpleNamespace(lattice=model.lattice, torus=model.torus)
    if config.simulate_on == "device":
        steps = _StepInputs(config, train_set, processes, augment, first, device)
        return (steps[k] for k in range(len(steps)))
    pin = device.type == "cuda"
    workers = max(int(config.loader_workers), 0)
    loader = torch.utils.data.DataLoader(
        _StepInputs(config, train_set, processes, augment, first), batch_size=None, shuffle=False,
        num_workers=workers, worker_init_fn=_one_thread if workers else None, prefetch_factor=4 if workers else None,
        pin_memory=pin, persistent_workers=False)
    return iter(loader)


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


def initial_weights(config: TrainConfig) -> dict:
    """The EMA weights of ``config.init_from`` (a ``best.pt`` or a full checkpoint) to start a new run from;
    its model configuration must be the run's."""
    state = load_checkpoint(config.init_from)
    theirs = {**asdict(ModelConfig()), **state.get("config", {}).get("model", {})}
    ours = asdict(config.model_config())
    if theirs != ours:
        differ = sorted(k for k in ours if theirs.get(k) != ours[k])
        raise XtalsolveError(f"its model differs from the config's in {', '.join(differ)}", config.init_from)
    return state["ema"]


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


def validation_inputs(model, val, config: TrainConfig, augment: Augmentation) -> list[dict]:
    """Loss inputs of the first ``val_batches`` batches of the validation set, with fixed noise (so that the
    validation loss compares across steps and runs; drawn once per run)."""
    out = []
    for j in range(config.val_batches):
        rows = np.arange(j * config.batch_size, min((j + 1) * config.batch_size, len(val)))
        if len(rows) == 0:
            break
        batch = val.batch(rows, dtype=torch.float32)
        out.append(loss_inputs(model, batch, _generator(config.seed, 1, j), 0.0, augment))
    return out


@torch.no_grad()
def validation_loss(model, inputs: list[dict], lattice_weight: float = 1.0) -> float:
    """Mean loss over :func:`validation_inputs`."""
    values = [float(network_loss(model, x, lattice_weight)["loss"]) for x in inputs]
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
    if data is None:  # already filtered
        train_set, val_set = training_data(config)
    else:
        train_set, val_set = (ordered_only(part, config.max_atoms) for part in data)
    if len(train_set) == 0:
        raise XtalsolveError("no training structures left after filtering", "config")
    augment = config.augmentation()

    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else
                          "cpu" if config.device == "auto" else config.device)
    if device.type == "cuda":  # TF32 matrix products: ~8x the FP32 rate, ample for a denoising loss
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
    elif config.init_from is not None:
        start = initial_weights(config)
        model.load_state_dict(start)
        ema.load_state_dict(start)
        log(f"started from the weights of {config.init_from}")
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

    val_inputs = validation_inputs(model, val_set, config, augment)

    def validate() -> None:
        nonlocal best_val
        value = validation_loss(ema, val_inputs, config.lattice_weight)
        write({"step": step, "val_loss": value})
        if value < best_val:
            best_val = value
            weights = {k: v.cpu() for k, v in ema.state_dict().items()}  # readable on a machine without the GPU
            _save({"format": CHECKPOINT_FORMAT, "step": step, "ema": weights, "config": asdict(config),
                   "versions": _versions(), "best_val": best_val, "n_train": len(train_set), "n_val": len(val_set)},
                  run_dir / "best.pt")

    started, first_step, stopped = time.perf_counter(), step, None
    bar = _progress(progress, config.steps, step)
    inputs = _step_inputs(config, train_set, model, augment, step, device)
    try:
        if step == 0:
            validate()
        model.train()
        while step < config.steps:
            lr = _lr(config, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            out = network_loss(model, next(inputs), config.lattice_weight)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), model.parameters()):
                    e.lerp_(p, 1.0 - decay)
            step += 1
            losses = {k: float(v.detach()) for k, v in out.items()}
            write({"step": step, "lr": lr, "grad_norm": float(grad_norm), **losses})
            if bar is not None:
                bar[0].update(bar[1], completed=step, description=f"loss {losses['loss']:.3f}")
            over_time = config.time_limit_s is not None and time.perf_counter() - started > config.time_limit_s
            if step % config.val_every == 0 or step == config.steps or over_time:
                validate()
            if step % config.checkpoint_every == 0 or step == config.steps or over_time:
                checkpoint()
            if over_time and step < config.steps:
                stopped = f"time limit {config.time_limit_s:g} s"
                log(f"stopped at step {step} of {config.steps}: {stopped} (resume with the same command)")
                break
    finally:
        del inputs  # shuts the loader's workers down
        log_file.close()
        if bar is not None:
            bar[0].stop()
    elapsed = time.perf_counter() - started
    rate = (step - first_step) / elapsed if elapsed > 0 and step > first_step else float("nan")
    return {"step": step, "best_val": best_val, "run_dir": str(run_dir), "steps_per_s": rate, "device": str(device),
            "n_train": len(train_set), "n_val": len(val_set), "stopped": stopped}


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

