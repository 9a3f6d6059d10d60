"""What every mmgen training loop shares: resumable, atomic training state and a metrics log.

Training state is weights + optimizer + step, all in safetensors and JSON (no pickles, so a state folder
can never run code when loaded). It is written to a temporary folder and renamed into place, so an
interrupted run resumes from the last complete state.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmgen.tokenizers.base import CheckpointError


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": opt_state["param_groups"], "scalars": {}}
    for pid, st in opt_state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{pid}.{k}"] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_train_state(directory: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     step: int, extra: dict | None = None) -> None:
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, "extra": extra or {}}))
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        directory.rename(old)
    tmp.rename(directory)
    if old.exists():
        shutil.rmtree(old)


def past_time_limit(acc, start: float, max_minutes: float | None) -> bool:
    """Whether the run has used its ``max_minutes`` (wall clock since ``start``), decided the same on every
    process: each rank's own clock could stop one rank a step before another, whose next gradient all-reduce
    would then wait forever. One all-gather of a flag per step, only when a limit is set and there are
    several processes."""
    if max_minutes is None:
        return False
    return _largest_over_processes(acc, float((time.time() - start) / 60 > max_minutes)) > 0


def check_time_schedule(time_schedule: bool, max_minutes: float | None, resume: bool) -> None:
    """--time-schedule needs a positive --max-minutes, and is refused with --resume (whose clock starts again)."""
    if time_schedule and not (max_minutes and max_minutes > 0):
        raise ValueError("a time schedule spreads the learning rate over --max-minutes: give it (above 0)")
    if time_schedule and resume:
        raise ValueError("--time-schedule follows this run's clock, which a resumed run would start again (its "
                         "learning rate back near the peak): resume without it")


def time_progress(acc, start: float, max_minutes: float) -> float:
    """The share of ``max_minutes`` used since ``start``, the largest over the processes, so every rank sets the
    same learning rate (each rank's own clock would let their weights drift apart)."""
    return _largest_over_processes(acc, (time.time() - start) / (60 * max_minutes))


def _largest_over_processes(acc, value: float) -> float:
    """The largest ``value`` over the processes; alone, the value itself (a device tensor read back would wait
    for the queued kernels)."""
    if acc.num_processes == 1:
        return value
    return float(acc.gather(torch.tensor([value], device=acc.device)).max())


def should_resume(directory: str | os.PathLike, resume: bool) -> bool:
    """Whether a run loads ``directory`` (its train_state): with ``resume``, there must be one (a mistyped
    --output would otherwise start over silently); without it, there must be none (a new run would overwrite
    it and append a second history to metrics.jsonl)."""
    directory = Path(directory)
    exists = directory.exists() or directory.with_name(directory.name + ".old").exists()
    if resume and not exists:
        raise CheckpointError(f"--resume: there is no training state in {directory}")
    if exists and not resume:
        raise CheckpointError(f"{directory.parent} already holds a run (train_state/): pass --resume to continue "
                              "it, or choose another --output")
    return resume


def load_train_state(directory: str | os.PathLike, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer | None) -> tuple[int, dict]:
    """Restore weights and optimizer; returns (step, extra). Falls back to the previous state if needed."""
    directory = Path(directory)
    if not (directory / "state.json").exists():
        old = directory.with_name(directory.name + ".old")
        if (old / "state.json").exists():
            directory = old
        else:
            raise CheckpointError(f"no training state to resume in {directory}")
    try:
        meta = json.loads((directory / "state.json").read_text())
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        if optimizer is not None:
            optimizer.load_state_dict(_unflatten_optimizer(load_file(str(directory / "optimizer.safetensors")),
                                                           meta["optimizer"]))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"training state in {directory} is corrupt or belongs to another model: {e}") from e
    return int(meta["step"]), meta.get("extra", {})


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (step, wall minutes, metrics)."""

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path, self.enabled, self.start = Path(path), enabled, time.time()
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, step: int, minutes_offset: float = 0.0, **metrics) -> None:
        if not self.enabled:
            return
        row = {"step": step, "minutes": round(minutes_offset + (time.time() - self.start) / 60, 3)}
        row.update({k: (round(float(v), 6) if isinstance(v, (float, int, torch.Tensor)) else v)
                    for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_yaml(path: str | os.PathLike) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping")
    return data


def check_sections(recipe: dict, allowed: dict[str, set[str] | None], where: str) -> None:
    """A recipe's top-level sections and its keys in each are known ones (``allowed``: section -> keys, or
    None for a section checked elsewhere): a misspelt key would otherwise be ignored and the run would train
    with the default instead, silently."""
    unknown = sorted(set(recipe) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown recipe sections {unknown}; known: {sorted(allowed)}")
    for section, keys in allowed.items():
        value = recipe.get(section, {})
        if keys is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{where}: recipe section {section!r} must be a mapping, got {value!r}")
        bad = sorted(set(value) - keys)
        if bad:
            raise ValueError(f"{where}: unknown keys {bad} in section {section!r}; known: {sorted(keys)}")


def cosine_lr(step: int, total: int, base: float, warmup: int, final_frac: float = 0.1,
              progress: float | None = None) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from ``base`` to ``final_frac * base`` at ``total``.
    ``progress`` (0..1, e.g. the share of a time budget used) moves the cosine on when it is further along than
    the step count: a run stopped by the clock then ends annealed, whatever its steps per second."""
    import math

    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if progress is not None:
        t = min(1.0, max(t, progress))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def shuffled_passes(n: int, batch: int, seed: int):
    """Endless index batches (batch,) over ``n`` cached items: each pass a fresh permutation drawn from ``seed``,
    cut into whole batches (a pass's remainder is left out). What the trainers' encode-once caches revisit."""
    order = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=order)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]
