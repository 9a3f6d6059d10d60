"""The unified vocabulary: one id space, a contiguous range per modality, and special tokens.

Layout: special tokens first, then the 256 byte tokens (quoted text), then one range per media tokenizer
(in the order they are added). The model's embedding and head cover the whole space; samplers restrict
logits to the range the layout asks for.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SPECIAL_TOKENS = (
    "<pad>", "<boi>", "<eoi>", "<bov>", "<eov>", "<boa>", "<eoa>", "<bos3d>", "<eos3d>", "<bot>", "<eot>",
    "<mixed>", "<dual>", "<reserved0>", "<reserved1>", "<reserved2>",
)
NUM_BYTES = 256


@dataclass
class Vocabulary:
    """ranges maps a modality name to (start, size); sizes of media ranges are their tokenizers' vocab sizes."""
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    _starts: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # device -> range starts

    @classmethod
    def build(cls, media: dict[str, int]) -> "Vocabulary":
        ranges = {"special": (0, len(SPECIAL_TOKENS)), "byte": (len(SPECIAL_TOKENS), NUM_BYTES)}
        start = len(SPECIAL_TOKENS) + NUM_BYTES
        for name, size in media.items():
            if size <= 0:
                raise ValueError(f"modality {name!r} needs a positive vocabulary size, got {size}")
            ranges[name] = (start, size)
            start += size
        return cls(ranges)

    @property
    def size(self) -> int:
        return max(s + n for s, n in self.ranges.values())

    def special(self, name: str) -> int:
        try:
            return SPECIAL_TOKENS.index(name)
        except ValueError:
            raise KeyError(f"unknown special token {name!r}") from None

    def range(self, modality: str) -> tuple[int, int]:
        """(start, stop) of a modality's ids."""
        if modality not in self.ranges:
            raise KeyError(f"vocabulary has no {modality!r} range; it has {sorted(self.ranges)}")
        s, n = self.ranges[modality]
        return s, s + n

    def to_unified(self, modality: str, local_ids, check: bool = True):
        """Local ids -> unified ids. ``check=False`` skips the range check, for ids a tokenizer has just made
        on an accelerator, where reading the check's answer back would wait for every queued kernel."""
        start, stop = self.range(modality)
        if check and ((local_ids < 0).any() or (local_ids >= stop - start).any()):
            raise ValueError(f"{modality} ids must lie in [0, {stop - start})")
        return local_ids + start

    def to_local(self, modality: str, unified_ids):
        start, stop = self.range(modality)
        if (unified_ids < start).any() or (unified_ids >= stop).any():
            raise ValueError(f"ids outside the {modality} range [{start}, {stop})")
        return unified_ids - start

    def modality_of(self, ids):
        """Per id, the index (in ``ranges`` order) of the modality it belongs to."""
        import torch

        starts = self._starts.get(ids.device)
        if starts is None:  # once per device: a fresh copy each call would wait for the device's queued kernels
            starts = self._starts[ids.device] = torch.tensor([s for s, _ in self.ranges.values()], device=ids.device)
        return torch.bucketize(ids.contiguous(), starts, right=True) - 1  # ranges are contiguous and ordered by start

    def to_dict(self) -> dict:
        return {"ranges": {k: list(v) for k, v in self.ranges.items()}, "special_tokens": list(SPECIAL_TOKENS)}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocabulary":
        if list(d.get("special_tokens", SPECIAL_TOKENS)) != list(SPECIAL_TOKENS):
            raise ValueError("checkpoint was built with a different special-token list")
        # ordered by start id: the modality index (modality_of) must not depend on how JSON orders keys
        items = sorted(((k, (int(v[0]), int(v[1]))) for k, v in d["ranges"].items()), key=lambda kv: kv[1][0])
        return cls(dict(items))
