"""Image -> text with the same AR transformer that draws (SEED's "see"): the image's tokens, then the caption
as byte tokens. The checkpoint is a text-to-image checkpoint whose model was trained on both directions
(``training.see_batch`` in its recipe), e.g. ``checkpoints/seed``.

    pipe = ImageToTextPipeline.from_pretrained("checkpoints/seed")
    print(pipe([Image.open("x.png")]).captions)

Noisy-channel reranking (``rerank``; Yee et al. 2019's noisy-channel reranking, with this model's own drawing
direction as the channel): beam search proposes ``beams`` captions c for the image's ids x, and each is scored
by log p(c | x) + rerank * log p(x | c), where p(x | c) is the same model reading x teacher-forced after the
caption's sentence-encoder prefix, as it does when it draws. The seeing direction alone favours captions that
are likely a priori; the drawing direction asks which caption best explains these particular ids.

Mirror test-time augmentation (``mirror``; a world whose scenes are symmetric under a left-right mirror, with a
caption map, ``MIRROR_WORLDS``): the mirrored image is tokenized and captioned too, its beams mapped back, and
each candidate caption is scored in both views (the mirrored caption against the mirrored image's ids), so
two different sets of ids, one per view, vote on every caption.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmgen.model.transformer import MMGenTransformer
from mmgen.pipelines.text_to_image import load_tokenizer, read_index
from mmgen.sampling.ar import SamplingOptions, beam_search_text, check_beams, sample_text
from mmgen.text.encoder import SentenceEncoder
from mmgen.tokenizers.base import CheckpointError
from mmgen.tokenizers.vq_image import images_to_tensor
from mmgen.worlds import shapes

MAX_IMAGES_PER_CALL = 256
DEFAULT_MAX_BYTES = 240
BEAM_ROWS = 512  # beam search: images x beams per KV cache (about 2.5 MB a row for the shipped SEED model)
MAX_RERANK = 100.0
TEACHER_FORCED_ROWS = 256  # captions scored per forward pass (reranking)

# world -> (caption -> the form the model writes, caption -> the mirrored scene's caption); None: not a caption
MIRROR_WORLDS = {"shapes": (shapes.reading_caption, shapes.mirror_caption)}


def check_caption_options(beams, rerank) -> None:
    check_beams(beams)
    if isinstance(rerank, bool) or not isinstance(rerank, (int, float)) or not 0 <= rerank <= MAX_RERANK:
        raise ValueError(f"rerank must be a number in [0, {MAX_RERANK:g}], got {rerank!r}")
    if rerank > 0 and beams < 2:
        raise ValueError("reranking chooses among beam-search captions: give beams of 2 or more with rerank")


@dataclass
class CaptionOutput:
    captions: list[str]
    record: dict = field(default_factory=dict)


class ImageToTextPipeline:
    def __init__(self, tokenizer, model: MMGenTransformer, tasks=("draw", "see"), defaults: dict | None = None,
                 text_encoder: SentenceEncoder | None = None, world: str | None = None):
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
        self.tasks = list(tasks)
        defaults = dict(defaults or {})
        unknown = set(defaults) - {"beams", "rerank", "mirror"}
        if unknown:
            raise CheckpointError(f"unknown caption_defaults {sorted(unknown)} (known: beams, rerank, mirror)")
        self.world = world
        self.defaults = {"beams": defaults.get("beams", 1), "rerank": defaults.get("rerank", 0.0),
                         "mirror": defaults.get("mirror", False)}
        try:
            check_caption_options(self.defaults["beams"], self.defaults["rerank"])
            self.check_mirror(self.defaults["mirror"], self.defaults["beams"])
        except ValueError as err:
            raise CheckpointError(f"the checkpoint's caption_defaults: {err}") from None
        if self.defaults["rerank"] > 0 and "draw" not in self.tasks:
            raise CheckpointError("caption_defaults rerank by the drawing direction, which this model was not "
                                  "trained on (no 'draw' task)")
        self._text_encoder = text_encoder  # loaded on first use: only reranking reads captions back

    @classmethod
    def from_text_to_image(cls, pipe) -> "ImageToTextPipeline":
        """The captioning pipeline of a loaded TextToImagePipeline: the same weights, text encoder and
        ``caption_defaults``."""
        return cls(pipe.tokenizer, pipe.model, pipe.tasks, pipe.caption_defaults, pipe.text_encoder, pipe.world)

    @property
    def text_encoder(self) -> SentenceEncoder:
        if self._text_encoder is None:
            self._text_encoder = SentenceEncoder(self.model.config.max_cond_tokens)
        return self._text_encoder

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ImageToTextPipeline":
        directory = Path(directory)
        index = read_index(directory)
        for part in ("tokenizer", "model"):
            if part not in index:
                raise CheckpointError(f"{directory}/model_index.json names no {part!r}")
        return cls(load_tokenizer(directory / index["tokenizer"]),
                   MMGenTransformer.from_pretrained(directory / index["model"]), index.get("tasks", ["draw"]),
                   index.get("caption_defaults"), world=index.get("world"))

    def check_mirror(self, mirror, beams: int) -> None:
        if not isinstance(mirror, bool):
            raise ValueError(f"mirror must be true or false, got {mirror!r}")
        if mirror and self.world not in MIRROR_WORLDS:
            raise ValueError(f"mirror test-time augmentation needs a world whose scenes are mirror-symmetric "
                             f"({sorted(MIRROR_WORLDS)}); this checkpoint's world is {self.world!r}")
        if mirror and beams < 2:
            raise ValueError("mirroring chooses among beam-search captions of both views: give beams of 2 or more")

    @torch.no_grad()
    def start_ids(self, images) -> torch.Tensor:
        """Images -> the rows a caption is written after: ``<boi>`` image ids ``<eoi> <bot>`` (b, s)."""
        vocab = self.model.vocab
        ids = vocab.to_unified("image", self.tokenizer.encode(images))
        b = ids.shape[0]
        special = torch.tensor([vocab.special("<eoi>"), vocab.special("<bot>")])
        return torch.cat([torch.full((b, 1), vocab.special("<boi>")), ids, special.expand(b, -1)], 1)

    def caption_options(self, beams: int | None = None, rerank: float | None = None, mirror: bool | None = None,
                        sampling: bool = False) -> dict:
        """The beams, rerank and mirror a call uses: the given ones over the checkpoint's ``caption_defaults``
        (with one beam, or when ``sampling``, no reranking or mirror unless asked for, which is refused)."""
        if sampling:
            if beams not in (None, 1) or rerank not in (None, 0) or mirror:
                raise ValueError("beam search, reranking and mirroring choose the best caption; they do not "
                                 "sample: give beams (rerank, mirror) or a temperature, not both")
            beams, rerank, mirror = 1, 0.0, False
        beams = self.defaults["beams"] if beams is None else beams
        rerank = (self.defaults["rerank"] if beams > 1 else 0.0) if rerank is None else rerank
        mirror = (self.defaults["mirror"] and beams > 1) if mirror is None else mirror
        check_caption_options(beams, rerank)
        self.check_mirror(mirror, beams)
        if rerank > 0 and "draw" not in self.tasks:
            raise ValueError("reranking reads the image back through the drawing direction, which this model "
                             "was not trained on (no 'draw' task)")
        return {"beams": beams, "rerank": rerank, "mirror": mirror}

    @torch.no_grad()
    def __call__(self, images, temperature: float | None = None, top_k: int | None = None,
                 generator: torch.Generator | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                 beams: int | None = None, rerank: float | None = None, mirror: bool | None = None) -> CaptionOutput:
        """One caption per image. ``beams`` > 1: beam search over that many captions
        (``sampling.ar.beam_search_text``), the most likely one, or with ``rerank`` > 0 the best by
        log p(c | x) + rerank * log p(x | c) (module docstring); 1: greedy. None takes the checkpoint's
        ``caption_defaults`` (greedy when it has none). ``mirror``: score the candidates in the mirrored view
        too (module docstring). ``temperature`` > 0 samples instead (seed it with ``generator``), with no beams."""
        greedy = temperature is None or temperature == 0
        options = self.caption_options(beams, rerank, mirror, sampling=not greedy)
        beams, rerank, mirror = options["beams"], options["rerank"], options["mirror"]
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
            t0 = time.perf_counter()
            captions, records = [], []
            step = max(1, BEAM_ROWS // beams)
            for i in range(0, b, step):
                if mirror:
                    hyps, _, rec = beam_search_text(self.model, start[i:i + step], max_bytes, beams, n_best=True)
                    flipped = self.start_ids(torch.flip(x[i:i + step], dims=[-1]))
                    hyps_m, _, _ = beam_search_text(self.model, flipped, max_bytes, beams, n_best=True)
                    captions += self.choose_mirrored(hyps, hyps_m, start[i:i + step], flipped, rerank)
                elif rerank > 0:
                    hyps, see, rec = beam_search_text(self.model, start[i:i + step], max_bytes, beams, n_best=True)
                    captions += self.rerank(hyps, see, start[i:i + step, 1:-2], rerank)
                else:
                    texts, _, rec = beam_search_text(self.model, start[i:i + step], max_bytes, beams)
                    captions += texts
                records.append(rec)
            record = records[0]
            if rerank > 0:
                record.sampler = f"{record.sampler}-rerank{rerank:g}"
            if mirror:
                record.sampler = f"{record.sampler}-mirror"
            record.batch, record.seconds = b, time.perf_counter() - t0  # reranking included
            written = sum(len(c.encode("utf-8", errors="replace")) for c in captions)
            record.tokens, record.tokens_per_s = written // b, written / max(record.seconds, 1e-9)
            record.forward_passes = sum(r.forward_passes for r in records)
        else:
            captions, record = sample_text(self.model, start, max_bytes, opts, generator, greedy=greedy)
        return CaptionOutput(captions, record.to_dict())

    @torch.no_grad()
    def draw_log_probs(self, captions: list[str], image_ids: torch.Tensor) -> torch.Tensor:
        """log p(image ids | caption) under the drawing direction: captions (n,), unified image ids (n, N) ->
        (n,). A caption the sentence encoder cannot read (empty, or longer than the prefix holds) gets -inf."""
        vocab, model = self.model.vocab, self.model
        lo, hi = vocab.range("image")
        readable = [bool(c.strip()) for c in captions]
        if any(readable):
            lengths = self.text_encoder.lengths([c for c, r in zip(captions, readable) if r])
            it = iter(lengths)
            readable = [r and next(it) <= model.config.max_cond_tokens for r in readable]
        out = torch.full((len(captions),), float("-inf"))
        keep = [i for i, r in enumerate(readable) if r]
        for a in range(0, len(keep), TEACHER_FORCED_ROWS):
            rows = keep[a:a + TEACHER_FORCED_ROWS]
            cond = self.text_encoder([captions[i] for i in rows])
            prefix = model.prefix(cond.states, cond.mask)
            x = image_ids[rows]
            boi = torch.full((len(rows), 1), vocab.special("<boi>"), dtype=torch.long, device=x.device)
            logp = torch.log_softmax(model.image_logits(prefix, boi, x)[..., lo:hi].float(), -1)
            out[rows] = logp.gather(-1, (x - lo)[..., None])[..., 0].sum(-1).cpu()
        return out

    def rerank(self, hyps: list[list[str]], see: torch.Tensor, image_ids: torch.Tensor, weight: float) -> list[str]:
        """Each image's beam-search captions (b lists of k), their log p(c | x) (b, k) and the image's ids
        (b, N) -> the caption maximising log p(c | x) + weight * log p(x | c)."""
        b, k = see.shape
        flat = [c for row in hyps for c in row]
        draw = self.draw_log_probs(flat, image_ids.repeat_interleave(k, 0)).view(b, k)
        score = see.float().cpu() + weight * draw
        score = torch.where(torch.isfinite(score), score, see.float().cpu() - 1e9)  # unreadable ones last
        best = score.argmax(-1).tolist()
        return [row[j] for row, j in zip(hyps, best)]

    @torch.no_grad()
    def see_log_probs(self, captions: list[str | None], start_ids: torch.Tensor) -> torch.Tensor:
        """log p(caption | image) teacher-forced, over bytes and ``<eot>`` as captioning writes them: captions
        (n,) (None: -inf) after rows ``start_ids`` (n, s) -> (n,)."""
        vocab, model = self.model.vocab, self.model
        lo, hi = vocab.range("byte")
        eot, pad = vocab.special("<eot>"), vocab.special("<pad>")
        out = torch.full((len(captions),), float("-inf"))
        keep = [i for i, c in enumerate(captions) if c is not None]
        for a in range(0, len(keep), TEACHER_FORCED_ROWS):
            rows = keep[a:a + TEACHER_FORCED_ROWS]
            follow = [[lo + b for b in captions[i].encode("utf-8")] + [eot] for i in rows]
            n = max(map(len, follow))
            target = torch.full((len(rows), n), -1, dtype=torch.long)
            for r, f in enumerate(follow):
                target[r, :len(f)] = torch.tensor(f)
            # right-padded, so padding never reaches an earlier position through causal attention
            seq = torch.cat([start_ids[rows], target[:, :-1].masked_fill(target[:, :-1] < 0, pad)], 1)
            logits = model(torch.zeros(len(rows), 0, model.config.hidden_size, device=seq.device), seq)
            logits = logits[:, start_ids.shape[1] - 1:].float()
            allowed = torch.full((logits.shape[-1],), float("-inf"), device=logits.device)
            allowed[lo:hi] = 0.0
            allowed[eot] = 0.0
            logp = torch.log_softmax(logits + allowed, -1).gather(-1, target.clamp(min=0)[..., None])[..., 0]
            out[rows] = logp.masked_fill(target < 0, 0.0).sum(-1).cpu()
        return out

    def choose_mirrored(self, hyps: list[list[str]], hyps_m: list[list[str]], start: torch.Tensor,
                        start_m: torch.Tensor, weight: float) -> list[str]:
        """Mirror test-time augmentation: each image's beam captions and its mirror's (mapped back), in the form
        the model writes, each scored log p(c | x) + weight log p(x | c) in the original view plus the same for
        the mirrored caption in the mirrored view; the best total wins. Captions that do not parse cannot be
        mirrored: they compete only if no candidate parses (then the original view's most likely beam)."""
        reading, mirrored = MIRROR_WORLDS[self.world]
        cands = []
        for own, other in zip(hyps, hyps_m):
            row = list(dict.fromkeys([c for c in map(reading, own) if c is not None]
                                     + [c for c in map(mirrored, other) if c is not None]))
            cands.append(row)
        flat = [(j, c) for j, row in enumerate(cands) for c in row]
        if not flat:
            return [h[0] for h in hyps]
        idx = torch.tensor([j for j, _ in flat])
        texts = [c for _, c in flat]
        texts_m = [mirrored(c) for c in texts]
        score = self.see_log_probs(texts, start[idx]) + self.see_log_probs(texts_m, start_m[idx])
        if weight > 0:
            score += weight * (self.draw_log_probs(texts, start[idx, 1:-2])
                               + self.draw_log_probs([c or "" for c in texts_m], start_m[idx, 1:-2]))
        out, k = [], 0
        for j, row in enumerate(cands):
            if not row:
                out.append(hyps[j][0])
                continue
            s = score[k:k + len(row)]
            out.append(row[int(s.argmax())] if torch.isfinite(s).any() else hyps[j][0])
            k += len(row)
        return out
