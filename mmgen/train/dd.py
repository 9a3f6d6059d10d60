"""``mmgen train dd``: distil a text-to-image checkpoint's AR transformer into a one/two-step student.

Phase 1 writes (prompt, noise sequence, token sequence) triples with the teacher and its flow map
(mmgen/sampling/distilled.py), streaming to ``output/pairs/shard_NNNNN.safetensors``; shards are written
atomically and a rerun continues after the last complete one. No training images are used: the prompts come
from the shapes world's caption distribution (paraphrased, held-out colour-shape pairs excluded), the images
from the teacher. Phase 2 trains the student (initialised from the teacher) with cross-entropy on the
teacher's tokens: half the batches as one-step inputs (all noise), half as second-step inputs (the teacher's
tokens before a split as data vectors, noise after it). Of the second-step batches, ``sampler_split_share``
(half) split where the two-step sampler does (half the positions, ``sample_dd``), the rest at a uniformly
random position, so the student learns the split it is asked for most while still seeing every split.
Periodic atomic training state, ``--resume``, metrics.jsonl, and at every save a complete pipeline folder (the
teacher's parts plus ``student/``). The teacher samples with its checkpoint's sampling defaults
(``model_index.json``), and the pairs record them: pairs written under other defaults are refused.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mmgen.model.dd_student import DDStudent, codebook_fingerprint, weights_fingerprint
from mmgen.pipelines.text_to_image import TextToImagePipeline
from mmgen.sampling.distilled import noise_like, split_mask, teacher_tokens
from mmgen.tokenizers.base import CheckpointError
from mmgen.train.common import (MetricsLog, cosine_lr, load_train_state, past_time_limit, save_train_state,
                                 should_resume)
from mmgen.worlds import shapes

log = logging.getLogger(__name__)
SHARD = 64  # pairs per shard


def make_pairs(pipe: TextToImagePipeline, folder: Path, count: int, seed: int = 0, batch: int = 32,
               progress: bool = True) -> int:
    """Write ``count`` teacher pairs into folder (resumable). Returns the number of pairs on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    opts = pipe.options()
    codebook = pipe.tokenizer.code_vectors()
    origin = teacher_signature(pipe)
    n_tok, dim = pipe.tokenizer.layout.num_tokens, codebook.shape[1]
    lo, hi = pipe.model.vocab.range("image")
    boi_id = pipe.model.vocab.special("<boi>")
    shards = (count + SHARD - 1) // SHARD
    done = sum(1 for i in range(shards) if (folder / f"shard_{i:05d}.safetensors").is_file())
    bar = tqdm(total=shards, initial=done, disable=not progress, desc="teacher pairs")
    for i in range(shards):
        path = folder / f"shard_{i:05d}.safetensors"
        if path.is_file():
            _check_origin(path, origin)
            continue
        samples = list(shapes.generate(SHARD, seed=seed * 100_003 + i, paraphrase=True,
                                       exclude_combos=shapes.HELD_OUT_COMBOS))
        prompts = teacher_prompts(samples, pipe.text_encoder)
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + i * SHARD + j) for j in range(SHARD)]
        noise = noise_like(SHARD, n_tok, dim, gens)
        tokens = []
        for j in range(0, SHARD, batch):
            chunk = prompts[j:j + batch]
            prefix = pipe.encode_prompts(chunk)
            null = pipe.model.prefix(None, None, batch=len(chunk))
            boi = torch.full((len(chunk), 1), boi_id, dtype=torch.long)
            ids, _ = teacher_tokens(pipe.model, prefix, null, boi, noise[j:j + batch], (lo, hi), codebook, opts)
            tokens.append(ids - lo)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"noise": noise.contiguous(), "tokens": torch.cat(tokens).to(torch.int32)}, str(tmp),
                  metadata={"prompts": json.dumps(prompts), "teacher": json.dumps(origin)})
        tmp.replace(path)
        bar.update(1)
    bar.close()
    return shards * SHARD


def teacher_prompts(samples, encoder) -> list[str]:
    """The samples' (paraphrased) captions, each one the encoder cannot take whole (a rare training paraphrase
    over its ``max_tokens`` word pieces) replaced by the same scene's canonical caption: the teacher is asked for
    what the scene shows, and no caption is cut."""
    lengths = encoder.lengths([s.caption for s in samples])
    return [s.caption if n <= encoder.max_tokens else s.canonical_caption for s, n in zip(samples, lengths)]


def teacher_signature(pipe: TextToImagePipeline) -> dict:
    """What the pairs depend on: the teacher's weights, its codebook and its sampling options."""
    return {"model": weights_fingerprint(pipe.model), "codebook": codebook_fingerprint(pipe.tokenizer.code_vectors()),
            "sampling": pipe.options().__dict__}


def _check_origin(path: Path, origin: dict) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as h:
        stored = json.loads(h.metadata().get("teacher", "{}"))
    if stored != origin:
        raise CheckpointError(f"{path} was written by another teacher or other sampling options ({stored}); "
                              f"use a fresh --output folder")


def load_pairs(folder: Path, count: int | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    from safetensors import safe_open

    prompts, noise, tokens = [], [], []
    files = sorted(folder.glob("shard_*.safetensors"))
    if count is not None:
        files = files[:(count + SHARD - 1) // SHARD]
    if not files:
        raise CheckpointError(f"no teacher pairs in {folder}")
    for f in files:
        with safe_open(str(f), "pt") as h:
            prompts += json.loads(h.metadata()["prompts"])
        t = load_file(str(f))
        noise.append(t["noise"])
        tokens.append(t["tokens"].long())
    return prompts, torch.cat(noise), torch.cat(tokens)


def train_dd(teacher: str, output: str, pairs: int = 4096, steps: int = 1500, batch_size: int = 16,
             lr: float = 3e-4, two_step_share: float = 0.5, sampler_split_share: float = 0.5, seed: int = 0,
             resume: bool = False,
             save_every: int = 250, max_minutes: float | None = None, progress: bool = True) -> Path:
    """Returns the pipeline folder (output/pipeline) holding the teacher's parts and the student."""
    from accelerate import Accelerator

    out = Path(output)
    state_dir = out / "train_state"
    load_state = should_resume(state_dir, resume)  # refused before minutes of pair writing, not after
    pipe = TextToImagePipeline.from_pretrained(teacher)
    make_pairs(pipe, out / "pairs", pairs, seed, progress=progress)
    prompts, noise, tokens = load_pairs(out / "pairs", pairs)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(seed)
    codebook = pipe.tokenizer.code_vectors().to(acc.device)
    student = DDStudent.from_teacher(pipe.model, codebook, pipe.options().__dict__)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, extra = 0, {}
    if load_state:
        step, extra = load_train_state(state_dir, student, opt)
        log.info("resumed from step %d", step)
    wrapped, opt = acc.prepare(student, opt)
    lo, _ = pipe.model.vocab.range("image")
    boi_id = pipe.model.vocab.special("<boi>")
    positions = tokens.shape[1] // pipe.model.tokens_per_step
    gen = torch.Generator().manual_seed(seed + 17 + step)
    metrics = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process)
    minutes0, t_start = float(extra.get("minutes", 0.0)), time.time()

    def save():
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(wrapped)
            save_train_state(state_dir, unwrapped, opt, step, {"minutes": minutes0 + (time.time() - t_start) / 60})
            unwrapped.eval()
            TextToImagePipeline(pipe.tokenizer, pipe.model, pipe.text_encoder, pipe.defaults,
                                unwrapped, pipe.tasks, pipe.world).save_pretrained(out / "pipeline", dtype=None)
            unwrapped.train()
        acc.wait_for_everyone()

    bar = tqdm(total=steps, initial=step, disable=not (progress and acc.is_main_process), desc="dd student")
    while step < steps:
        idx = torch.randint(0, len(prompts), (batch_size,), generator=gen)
        with torch.no_grad():
            cond = pipe.text_encoder([prompts[i] for i in idx.tolist()])
        tok, nz = tokens[idx].to(acc.device), noise[idx].to(acc.device)
        unwrapped = acc.unwrap_model(wrapped)
        is_data = torch.zeros_like(tok, dtype=torch.bool)
        if torch.rand((), generator=gen) < two_step_share:
            split = (positions // 2 if torch.rand((), generator=gen) < sampler_split_share
                     else int(torch.randint(1, positions, (), generator=gen)))
            is_data = split_mask(unwrapped.model, batch_size, tok.shape[1], split, tok.device)
        vectors = torch.where(is_data[..., None], codebook[tok], nz)
        prefix = unwrapped.model.prefix(cond.states, cond.mask)
        boi = torch.full((batch_size, 1), boi_id, dtype=torch.long, device=acc.device)
        logits = wrapped(prefix, boi, vectors, is_data)
        # data positions are given, not predicted (the sampler keeps them): no loss there
        per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), (tok + lo).reshape(-1), reduction="none")
        keep = (~is_data).reshape(-1).float()
        loss = (per_token * keep).sum() / keep.sum()
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, min(100, steps // 10))
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 20 == 0 or step == steps:
            hit = logits.detach()[..., lo:lo + codebook.shape[0]].argmax(-1) == tok
            acc_tok = hit[~is_data].float().mean().item()
            metrics.log(step, minutes0, loss=loss.item(), token_accuracy=acc_tok, lr=opt.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc_tok:.2f}")
        bar.update(1)
        out_of_time = past_time_limit(acc, t_start, max_minutes)
        if step % save_every == 0 or step == steps or out_of_time:
            save()
        if out_of_time:
            log.info("stopping at step %d: %s minutes reached", step, max_minutes)
            break
    bar.close()
    return out / "pipeline"
