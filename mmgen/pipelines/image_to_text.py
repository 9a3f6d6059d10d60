"""Image -> text with the same AR transformer that draws (SEED's "see"): the image's tokens, then the caption
as byte tokens. The checkpoint is a text-to-image checkpoint whose model was trained on both directions
(``training.see_batch`` in its recipe), e.g. ``checkpoints/seed``.

    pipe = ImageToTextPipeline.from_pretrained("checkpoints/seed")
    print(pipe([Image.open("x.png")]).captions)
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmgen.model.transformer import MMGenTransformer
from mmgen.pipelines.text_to_image import load_tokenizer, read_index
from mmgen.sampling.ar import SamplingOptions, beam_search_text, check_beams, sample_text
from mmgen.tokenizers.base import CheckpointError
from mmgen.tokenizers.vq_image import images_to_tensor

MAX_IMAGES_PER_CALL = 256
DEFAULT_MAX_BYTES = 240
BEAM_ROWS = 512  # beam search: images x beams per KV cache (about 2.5 MB a row for the shipped SEED model)


@dataclass
class CaptionOutput:
    captions: list[str]
    record: dict = field(default_factory=dict)


class ImageToTextPipeline:
    def __init__(self, tokenizer, model: MMGenTransformer, tasks=("draw", "see")):
        start, stop = model.vocab.range("image")
        if stop - start != tokenizer.vocab_size:
            raise CheckpointError(f"vocabulary mismatch: the model's image range has {stop - start} ids, "
                                  f"the tokenizer has {tokenizer.vocab_size} codes")
        if "see" not in tasks:
            raise CheckpointError("this checkpoint's model was not trained to write captions (its model_index.json "
                                  "lists no 'see' task); use one trained on both directions, e.g. checkpoints/seed")
        if model.tokens_per_step != 1:
            raise CheckpointError("captioning reads image tokens one position each: this model uses Token-Shuffle")
        if model.config.byte_index:
            raise CheckpointError("this model numbers quoted-text bytes (byte_index), so it cannot write captions as "
                                  "bytes")
        self.tokenizer, self.model = tokenizer.eval(), model.eval()

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageToTextPipeline":
        directory = Path(directory)
        index = read_index(directory)
        for part in ("tokenizer", "model"):
            if part not in index:
                raise CheckpointError(f"{directory}/model_index.json names no {part!r}")
        return cls(load_tokenizer(directory / index["tokenizer"]),
                   MMGenTransformer.from_pretrained(directory / index["model"]), index.get("tasks", ["draw"]))

    @torch.no_grad()
    def start_ids(self, images) -> torch.Tensor:
        """Images -> the rows a caption is written after: ``<boi>`` image ids ``<eoi> <bot>`` (b, s)."""
        vocab = self.model.vocab
        ids = vocab.to_unified("image", self.tokenizer.encode(images))
        b = ids.shape[0]
        special = torch.tensor([vocab.special("<eoi>"), vocab.special("<bot>")])
        return torch.cat([torch.full((b, 1), vocab.special("<boi>")), ids, special.expand(b, -1)], 1)

    @torch.no_grad()
    def __call__(self, images, temperature: float | None = None, top_k: int | None = None,
                 generator: torch.Generator | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 beams: int = 1) -> CaptionOutput:
        """One caption per image. Greedy by default; ``beams`` > 1: the most likely caption by beam search
        (``sampling.ar.beam_search_text``); ``temperature`` > 0 samples instead (seed it with ``generator``)."""
        greedy = temperature is None or temperature == 0
        check_beams(beams)
        if beams > 1 and not greedy:
            raise ValueError("beam search finds the most likely caption; it does not sample: give beams or a "
                             "temperature, not both")
        x = images_to_tensor(images)
        if x.shape[0] == 0:
            raise ValueError("give at least one image")
        if x.shape[0] > MAX_IMAGES_PER_CALL:
            raise ValueError(f"at most {MAX_IMAGES_PER_CALL} images per call, got {x.shape[0]}")
        if not isinstance(max_bytes, int) or not 1 <= max_bytes <= 1024:
            raise ValueError(f"max_bytes must be an integer in [1, 1024], got {max_bytes!r}")
        start = self.start_ids(x)
        b = start.shape[0]
        opts = SamplingOptions(guidance_scale=1.0, temperature=1.0 if greedy else float(temperature),
                               top_k=top_k or 0)
        need = start.shape[1] + max_bytes + 1
        if need > self.model.config.max_positions:
            raise ValueError(f"{max_bytes} caption bytes exceed what the model holds "
                             f"({self.model.config.max_positions} positions)")
        if beams > 1:  # at most BEAM_ROWS hypotheses in one KV cache
            captions, records = [], []
            step = max(1, BEAM_ROWS // beams)
            for i in range(0, b, step):
                texts, _, rec = beam_search_text(self.model, start[i:i + step], max_bytes, beams)
                captions += texts
                records.append(rec)
            record = records[0]
            record.batch, record.seconds = b, sum(r.seconds for r in records)
            record.forward_passes = sum(r.forward_passes for r in records)
        else:
            captions, record = sample_text(self.model, start, max_bytes, opts, generator, greedy=greedy)
        return CaptionOutput(captions, record.to_dict())
