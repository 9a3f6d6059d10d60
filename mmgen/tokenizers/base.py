"""The Tokenizer interface every modality implements, and TokenLayout, which says how ids are arranged.

Samplers, Token-Shuffle and codebook patterns read the layout; none of them special-cases a tokenizer.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint folder is missing, corrupt, or does not match what loads it."""


@dataclass(frozen=True)
class TokenLayout:
    """How a tokenizer arranges its ids.

    kind: "grid2d" (grid = (H, W)), "grid3d" (grid = (T, H, W)), "levels" (codebook levels per position),
    "causal1d" (grid = (N,)). ``levels`` is the number of codebook levels per position (1 for plain VQ).
    """
    kind: str
    grid: tuple[int, ...]
    levels: int = 1

    @property
    def num_tokens(self) -> int:
        n = self.levels
        for g in self.grid:
            n *= g
        return n

    def to_dict(self) -> dict:
        return {"kind": self.kind, "grid": list(self.grid), "levels": self.levels}


def _public_mode(path: str) -> None:
    """mkstemp creates files 0600; give them the mode an ordinary write would (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so readers see the old or the new content, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _public_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_part(directory: str | os.PathLike, config: dict, state: dict[str, torch.Tensor],
              dtype: torch.dtype | None = None) -> None:
    """Save one part as config.json + model.safetensors, each file atomically (readers never see half a file;
    a crash between the two can leave new weights beside the old config: save into a fresh folder when that
    matters)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
               for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".model.safetensors.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        _public_mode(tmp)
        os.replace(tmp, directory / "model.safetensors")
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    atomic_write_bytes(directory / "config.json", json.dumps(config, indent=2, sort_keys=True).encode())


def load_part(directory: str | os.PathLike, expected_type: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Load config.json + model.safetensors (never a pickle) with clear errors for missing or corrupt files."""
    directory = Path(directory)
    cfg_path, w_path = directory / "config.json", directory / "model.safetensors"
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"checkpoint {directory} is missing {p.name}")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if expected_type is not None and config.get("type") != expected_type:
        raise CheckpointError(f"{directory} holds a {config.get('type')!r}, expected a {expected_type!r}")
    try:
        state = load_file(str(w_path))
    except Exception as e:  # safetensors raises several types for truncated or garbage files
        raise CheckpointError(f"{w_path} is corrupt or not a safetensors file: {e}") from e
    return config, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {where} do not match the model its config describes: {e}") from e


class Tokenizer(torch.nn.Module):
    """media <-> LongTensor ids. Subclasses set ``layout`` and ``vocab_size`` and implement encode/decode."""

    layout: TokenLayout
    vocab_size: int

    def encode(self, media: Any) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def at_image_size(self, size: int) -> "Tokenizer":
        """This tokenizer on ``size`` x ``size`` media: itself at its own canvas. Only the convolutional grid
        tokenizers (``GridImageTokenizer``) move to another canvas; the rest refuse clearly."""
        if size == getattr(getattr(self, "config", None), "image_size", None):
            return self
        raise ValueError(f"a {type(self).__name__} works on its training canvas only; another image size needs "
                         "a convolutional grid tokenizer")

    def save_pretrained(self, directory: str | os.PathLike) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "Tokenizer":  # pragma: no cover - interface
        raise NotImplementedError
