"""Train an image tokenizer from a recipe (tokenizers/*.yaml) through accelerate: one CPU, several
processes or several GPUs run the same code. Periodic atomic training state, --resume, metrics.jsonl."""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmgen.data.shapes_data import folder_batches, training_batches
from mmgen.tokenizers.binary_text import BINARY_TEXT_CONFIGS, BinaryTextConfig, BinaryTextTokenizer
from mmgen.tokenizers.vq_image import VQ_IMAGE_CONFIGS, VQImageConfig, VQImageTokenizer
from mmgen.train.common import (MetricsLog, check_sections, check_time_schedule, cosine_lr, load_train_state,
                                past_time_limit, read_yaml, save_train_state, should_resume, time_progress)
from mmgen.train.decoder_post import generated_ids

log = logging.getLogger(__name__)
TOKENIZER_TYPES = {"vq_image": (VQ_IMAGE_CONFIGS, VQImageConfig, VQImageTokenizer),
                   "binary_text": (BINARY_TEXT_CONFIGS, BinaryTextConfig, BinaryTextTokenizer)}


def edge_weights(x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """Per-pixel loss weights: 1 everywhere, 1 + edge_weight within one pixel of a colour edge."""
    gray = x.mean(1, keepdim=True)
    gx = (gray[..., :, 1:] - gray[..., :, :-1]).abs()
    gy = (gray[..., 1:, :] - gray[..., :-1, :]).abs()
    edge = torch.zeros_like(gray)
    edge[..., :, 1:] += gx
    edge[..., :, :-1] += gx
    edge[..., 1:, :] += gy
    edge[..., :-1, :] += gy
    edge = F.max_pool2d((edge > 0.02).float(), 3, stride=1, padding=1)
    return 1 + edge_weight * edge


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, edge_weight: float,
                        l1_weight: float = 1.0) -> torch.Tensor:
    """Edge-weighted ``l1_weight`` * L1 + L2 per pixel. L1 pulls a pixel the model is unsure of to the median
    of what it could be: right for the shapes world's solid regions, but on thin glyph strokes (a fifth of a
    text crop's pixels) the median is the background, and training sits there (with L1 + L2, the strided-conv
    text tokenizer's crops stayed near the background-only PSNR for 2,400 steps). The text recipes use L2
    alone, whose mean moves towards strokes as soon as the latents say anything about them."""
    w = edge_weights(target, edge_weight)
    err = recon - target
    return (w * (l1_weight * err.abs() + err.pow(2))).sum() / (w.sum() * 3)


def gradient_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean L1 distance between the horizontal and vertical pixel differences of ``recon`` and ``target``
    (the gradient-difference loss of Mathieu et al., 2016). Where the target is flat (blank card) any seam or
    texture in the reconstruction is penalised linearly: a 5-level step costs 0.02 here and 0.0004 in L2, so
    faint block texture that L2 leaves alone is pushed out, and glyph edges are asked to be as sharp as drawn."""
    dx = (recon[..., :, 1:] - recon[..., :, :-1]) - (target[..., :, 1:] - target[..., :, :-1])
    dy = (recon[..., 1:, :] - recon[..., :-1, :]) - (target[..., 1:, :] - target[..., :-1, :])
    return 0.5 * (dx.abs().mean() + dy.abs().mean())


def check_crop(crop: int, align: int, size: int) -> None:
    if crop % align or not align <= crop <= size:
        raise ValueError(f"training.crop must be a multiple of the downsample {align} between {align} and {size}, "
                         f"got {crop}")


def content_crops(x: torch.Tensor, crop: int, align: int, gen: torch.Generator, candidates: int = 4):
    """Random ``crop`` x ``crop`` windows of a batch, one per image, top-left corners on the token grid
    (multiples of ``align``): of ``candidates`` random corners per image the one with the most colour edges
    wins, so text images train on glyphs rather than on empty background -> (crops, corners in tokens (b, 2)).

    Training on crops makes a step about (H / crop)^2 cheaper; the tokenizer's layers are convolutions plus
    (the binary tokenizer) a projector that is given each crop's positions in the full grid."""
    b, _, h, w = x.shape
    check_crop(crop, align, min(h, w))
    slots = (h - crop) // align + 1
    corners = torch.randint(0, slots, (b, candidates, 2), generator=gen)
    edges = edge_weights(x, 1.0) - 1  # 1 within a pixel of an edge
    # edge count in every window, from a summed-area table
    sat = F.pad(edges[:, 0].cumsum(1).cumsum(2), (1, 0, 1, 0))
    y0, x0 = corners[..., 0] * align, corners[..., 1] * align
    idx = torch.arange(b)[:, None]
    count = (sat[idx, y0 + crop, x0 + crop] - sat[idx, y0, x0 + crop] - sat[idx, y0 + crop, x0] + sat[idx, y0, x0])
    best = corners[torch.arange(b), count.argmax(1)]
    crops = torch.stack([x[i, :, r * align:r * align + crop, c * align:c * align + crop]
                         for i, (r, c) in enumerate(best.tolist())])
    return crops, best


TOKENIZER_RECIPE_SECTIONS = {"type": None, "architecture": None, "codebook": None,  # checked by the config class
                             "data": {"world"},
                             "training": {"steps", "batch_size", "lr", "warmup", "weight_decay", "edge_weight",
                                          "l1_weight", "gradient_weight", "crop", "crop_candidates", "restart_every",
                                          "unquantized_warmup", "save_every", "log_every", "seed", "train_only",
                                          "generator", "generated_share", "generator_sampling"}}


def tokenizer_type(recipe: dict) -> tuple:
    """The recipe's (configs, config class, tokenizer class); a SEED or CLIP recipe is told its command."""
    kind = recipe.get("type", "vq_image")
    if kind not in TOKENIZER_TYPES:
        hint = {"seed": "mmgen train seed-tokenizer or seed-decoder",
                "open_clip_shapes": "mmgen train clip"}.get(kind)
        raise ValueError(f"unknown tokenizer type {kind!r}; expected one of {sorted(TOKENIZER_TYPES)}"
                         + (f" (a {kind} recipe trains with {hint})" if hint else ""))
    return TOKENIZER_TYPES[kind]


def build_tokenizer(recipe: dict):
    configs, config_cls, tokenizer_cls = tokenizer_type(recipe)
    arch = dict(recipe.get("architecture", {}))
    base = configs[arch.pop("size", "base")]
    try:
        cfg = config_cls(**{**asdict(base), **arch, **recipe.get("codebook", {})})
    except TypeError as e:
        raise ValueError(f"recipe has an unknown tokenizer setting: {e}") from e
    return tokenizer_cls(cfg)


# config fields that weigh the loss rather than shape the network, and the decoder's padding mode (the same
# weights, other values at the border, which training then adapts to): a run started with --init may change them
INIT_MAY_DIFFER = {"beta", "commit_weight", "entropy_weight", "diversity_gamma", "entropy_group_bits",
                   "decoder_padding"}

# parts a run started with --init may add to a tokenizer that lacks them: config field -> the weights it adds
INIT_ADDED_PARTS = {"decoder_context": "decoder.context."}


def init_from(tok, directory: str) -> None:
    """Copy a trained tokenizer's weights into ``tok``; its type and architecture must equal ``tok``'s (the
    fields in ``INIT_MAY_DIFFER`` may differ, and a part in ``INIT_ADDED_PARTS`` that it lacks may be added:
    it keeps its fresh initialisation, which leaves the output unchanged)."""
    from mmgen.pipelines.text_to_image import load_tokenizer

    src = load_tokenizer(directory)
    theirs, ours = asdict(src.config), asdict(tok.config)
    diff = {k: (theirs.get(k), ours.get(k)) for k in ours if k not in INIT_MAY_DIFFER and theirs.get(k) != ours.get(k)}
    added = {k for k, (a, b) in diff.items() if k in INIT_ADDED_PARTS and not a and b}
    refused = {k: v for k, v in diff.items() if k not in added}
    if type(src) is not type(tok) or refused:
        raise ValueError(f"--init {directory} is a {src.type_name} tokenizer that differs from the recipe's "
                         f"{tok.type_name}: " + (", ".join(f"{k} {a!r} vs {b!r}" for k, (a, b) in refused.items())
                                                 or "another type"))
    missing, unexpected = tok.load_state_dict({k: v.float() for k, v in src.state_dict().items()}, strict=False)
    prefixes = tuple(INIT_ADDED_PARTS[k] for k in added)
    wrong = [k for k in missing if not (prefixes and k.startswith(prefixes))] + list(unexpected)
    if wrong:
        raise ValueError(f"--init {directory}: weights that do not match the recipe's tokenizer: {wrong[:8]}")


def trainable_parameters(tok, train_only: str | None) -> list:
    """The parameters a run updates: all, or with ``training.train_only: decoder`` the decoder's alone. The
    encoder, projector and bits then stay as they are, so every image keeps its ids, and an AR model trained
    over them draws with the new decoder unchanged; the frozen part builds no autograd graph."""
    if train_only is None:
        return list(tok.parameters())
    if train_only != "decoder":
        raise ValueError(f"training.train_only must be 'decoder' (or absent: train everything), got {train_only!r}")
    if not hasattr(tok, "decoder"):
        raise ValueError(f"training.train_only: decoder needs a tokenizer with a decoder; "
                         f"{type(tok).__name__} has none")
    for name, p in tok.named_parameters():
        p.requires_grad_(name.startswith("decoder."))
    return list(tok.decoder.parameters())


def post_training_setup(tr: dict, tok, crop: int | None, batch: int, device: torch.device):
    """``training.generator`` (a text-to-image pipeline folder trained over this tokenizer's ids): post-train the
    decoder on the ids that pipeline's model writes (``mmgen/train/decoder_post.py``) for a share
    ``training.generated_share`` of each batch's pages, drawn with the pipeline's sampling defaults updated by
    ``training.generator_sampling``; the pipeline runs on ``device``, beside the decoder it teaches. Refused, before
    any work, where it cannot mean what it says."""
    if "generator" not in tr:
        if "generated_share" in tr or "generator_sampling" in tr:
            raise ValueError("training.generated_share and generator_sampling need training.generator")
        return None
    from mmgen.pipelines.text_to_image import TextToImagePipeline
    from mmgen.sampling.ar import SamplingOptions

    if tr.get("train_only") != "decoder":
        raise ValueError("training.generator post-trains the decoder on the ids a trained generator writes: set "
                         "training.train_only: decoder, so the ids (and the generator trained over them) stay valid")
    if crop is not None:
        raise ValueError("training.generator decodes the generator's whole pages: set training.crop: 0")
    share = float(tr.get("generated_share", 0.5))
    count = round(share * batch)
    if not 0.0 < share < 1.0 or not 1 <= count < batch:
        raise ValueError(f"training.generated_share must give at least one page of a batch of {batch} generated ids "
                         f"and keep at least one on its true ids, got {share}")
    pipe = TextToImagePipeline.from_pretrained(tr["generator"])
    for part in (pipe.model, pipe.tokenizer, pipe.text_encoder):
        part.to(device).eval()
    if (pipe.tokenizer.vocab_size != tok.vocab_size or pipe.tokenizer.layout.grid != tok.layout.grid
            or pipe.tokenizer.config.image_size != tok.config.image_size):
        raise ValueError(f"the generator {tr['generator']} draws {pipe.tokenizer.layout.grid} grids of "
                         f"{pipe.tokenizer.vocab_size} ids at {pipe.tokenizer.config.image_size} px; this tokenizer "
                         f"has {tok.layout.grid} of {tok.vocab_size} at {tok.config.image_size}")
    overrides = tr.get("generator_sampling") or {}
    if not isinstance(overrides, dict):
        raise ValueError(f"training.generator_sampling must map sampling options to values, e.g. {{min_p: 0.1}}, "
                         f"got {overrides!r}")
    options = SamplingOptions.from_dict({**pipe.defaults, **overrides}, "training.generator_sampling")
    return pipe, count, options


def decode_generated(tok, post, x: torch.Tensor, captions: list[str], gen: torch.Generator, check: bool):
    """The batch's first pages decoded from the ids the generator writes for them (see ``post_training_setup``)
    -> (those reconstructions, the share of their ids that differ from the true ones). ``check``: the
    generator's own tokenizer must give these pages the same ids (else it was trained over other ids, and its
    tokens mean something else to this decoder)."""
    pipe, count, options = post
    with torch.no_grad():
        codes = tok.encode(x[:count])
        if check and not torch.equal(pipe.tokenizer.encode(x[:count].to(pipe.tokenizer.device)).to(codes.device),
                                     codes):
            raise ValueError("training.generator's tokenizer gives these pages other ids than this tokenizer: its "
                             "model was trained over other ids (start this run with --init from its tokenizer)")
        drawn = generated_ids(pipe, captions[:count], codes, options, gen)
    h, w = tok.layout.grid
    fake = (tok.decoder(tok.quantizer.embed(drawn.view(count, h, w))) + 1) / 2
    return fake, float((drawn != codes).float().mean())


def train_tokenizer(recipe_path: str, output: str, steps: int | None = None, resume: bool = False,
                    data: str | None = None, seed: int | None = None, save_every: int | None = None,
                    progress: bool = True, max_minutes: float | None = None, init: str | None = None,
                    data_workers: int = 0, time_schedule: bool = False) -> Path:
    """Train the recipe's tokenizer into ``output``. ``time_schedule``: the cosine follows the share of
    ``max_minutes`` used when that is further along than the steps (as in ``train_ar``). ``init``: a trained
    tokenizer folder to start from (its weights; the optimizer and the learning-rate schedule start afresh),
    which must match the recipe's architecture but for ``INIT_MAY_DIFFER`` and ``INIT_ADDED_PARTS`` (see
    ``init_from``); refused together with ``resume``, which continues a run's own state instead."""
    from accelerate import Accelerator, DistributedDataParallelKwargs

    recipe = read_yaml(recipe_path)
    tokenizer_type(recipe)  # before the key check: a SEED or CLIP recipe has other keys
    check_sections(recipe, TOKENIZER_RECIPE_SECTIONS, f"recipe {recipe_path}")
    tr = recipe.get("training", {})
    steps = steps or int(tr.get("steps", 6000))
    seed = seed if seed is not None else int(tr.get("seed", 0))
    save_every = save_every or int(tr.get("save_every", 250))
    out = Path(output)
    check_time_schedule(time_schedule, max_minutes, resume)
    # the codebook sits out the unquantized warm-up, so DDP must allow unused parameters
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if acc.device.type == "cuda":  # TF32 convolutions and matmuls on a GPU (the CPU computes plain fp32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    tok = build_tokenizer(recipe)
    if int(tr.get("crop", 0)) and getattr(tok.config, "decoder_context", 0):
        raise ValueError("architecture.decoder_context summarises the whole page, so it must train on whole pages "
                         "(training.crop: 0), not on crops it would summarise instead")
    if init is not None:
        if resume:
            raise ValueError("--init starts a new run from a tokenizer's weights; --resume continues a run: "
                             "give one of them")
        init_from(tok, init)
    trained = trainable_parameters(tok, tr.get("train_only"))
    # None, or (the generator pipeline, pages per batch decoded from its ids, its sampling options)
    post = post_training_setup(tr, tok, int(tr.get("crop", 0)) or None, int(tr.get("batch_size", 16)), acc.device)
    if post is not None and acc.num_processes > 1:
        raise ValueError("training.generator post-trains in one process (its generated pages are decoded outside the "
                         "distributed wrapper): run it without accelerate launch")
    checked = False  # the generator's ids, checked on the first batch
    opt = torch.optim.AdamW(trained, lr=float(tr.get("lr", 2e-3)), betas=(0.9, 0.99),
                            weight_decay=float(tr.get("weight_decay", 0.0)))
    state_dir = out / "train_state"
    step, extra = 0, {}
    if should_resume(state_dir, resume):
        step, extra = load_train_state(state_dir, tok, opt)
        log.info("resumed from step %d", step)
    model, opt = acc.prepare(tok, opt)
    size = tok.config.image_size
    batch = int(tr.get("batch_size", 16))
    data_seed = seed + step  # a resumed run continues on fresh samples
    batches = (folder_batches(data, batch, data_seed, size, acc.process_index, acc.num_processes) if data
               else training_batches(recipe.get("data", {}).get("world", "shapes"), batch, data_seed, size,
                                     acc.process_index, paraphrase=False, exclude_combos=(), workers=data_workers))
    metrics = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process)
    minutes0 = float(extra.get("minutes", 0.0))
    from_init = init is not None or bool(extra.get("from_init"))  # a resumed --init run is one still
    edge_w = float(tr.get("edge_weight", 4.0))
    l1_w = float(tr.get("l1_weight", 1.0))
    grad_w = float(tr.get("gradient_weight", 0.0))  # see gradient_loss
    if grad_w < 0:
        raise ValueError(f"training.gradient_weight must be at least 0, got {grad_w}")
    restart_every = int(tr.get("restart_every", 20))
    if tr.get("train_only") and not from_init:
        raise ValueError("training.train_only: decoder fine-tunes a trained tokenizer's decoder: start it with --init")
    # the VQ's codebook (the binary quantiser has none); frozen with the encoder under train_only, so no restarts
    has_codebook = hasattr(tok.quantizer, "restart_dead_codes") and not tr.get("train_only")
    # a codebook warms up unquantised and is then reseeded from the latents; one started from trained weights
    # (--init) is already in use, and reseeding every code one batch missed would throw much of it away
    warm = int(tr.get("unquantized_warmup", 300 if has_codebook and not from_init else 0))
    log_every = int(tr.get("log_every", 25))
    crop = int(tr.get("crop", 0)) or None  # train on content-weighted crops of this side (see content_crops)
    # random corners per crop, the one with the most edges kept: 1 draws crops uniformly, blank page included
    candidates = int(tr.get("crop_candidates", 4))
    if candidates < 1:
        raise ValueError(f"training.crop_candidates must be at least 1, got {candidates}")
    align = tok.config.downsample
    if crop is not None:
        check_crop(crop, align, size)
    t_start = time.time()
    bar = tqdm(total=steps, initial=step, disable=not (progress and acc.is_main_process), desc="tokenizer")
    gen = torch.Generator().manual_seed(seed + 1 + acc.process_index + 1009 * step)  # resumed: new crops
    unwrapped = acc.unwrap_model(model)
    while step < steps:
        x, captions = next(batches)
        offset = None
        if crop is not None and crop < size:
            x, offset = content_crops(x, crop, align, gen, candidates)
        x = x.to(acc.device)
        lr_now = cosine_lr(step, steps, float(tr.get("lr", 2e-3)), int(tr.get("warmup", 100)),
                           progress=time_progress(acc, t_start, max_minutes) if time_schedule else None)
        for g in opt.param_groups:
            g["lr"] = lr_now
        quantize = step >= warm
        if step == warm and has_codebook and not from_init:  # empty usage window: the restart below seeds every code
            unwrapped.quantizer.window_hits.zero_()
        changed = None
        if post is not None:  # the first pages decoded from the ids the generator writes, each against its true page
            fake, changed = decode_generated(unwrapped, post, x, captions, gen, check=not checked)
            checked = True
            recon, q, z = model(x[len(fake):], quantize=quantize)
            recon = torch.cat([fake, recon])
        elif offset is not None and hasattr(unwrapped, "positions"):  # the binary tokenizer's projector
            recon, q, z = model(x, quantize=quantize, offset=offset.to(acc.device))
        else:
            recon, q, z = model(x, quantize=quantize)
        rec = reconstruction_loss(recon, x, edge_w, l1_w)
        grad = gradient_loss(recon, x) if grad_w else None
        loss = rec + grad_w * grad if grad is not None else rec
        loss = loss + q.loss if quantize else loss
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if has_codebook and ((step == warm + 1 and not from_init) or (step > warm and step % restart_every == 0)):
            restarted = unwrapped.quantizer.restart_dead_codes(z.detach(), gen)
            if acc.num_processes > 1:  # every process must keep the same codebook: take rank 0's
                torch.distributed.broadcast(unwrapped.quantizer.embedding.weight.data, src=0)
        else:
            restarted = None
        if step % log_every == 0:
            with torch.no_grad():
                psnr = -10 * torch.log10(F.mse_loss(recon.clamp(0, 1), x))
            row = dict(loss=loss.item(), rec=rec.item(), vq=q.loss.item(), psnr=psnr.item(),
                       perplexity=q.perplexity.item(), lr=opt.param_groups[0]["lr"])
            if grad is not None:
                row["grad"] = grad.item()
            if restarted is not None:
                row["restarted"] = restarted
            if changed is not None:
                row["generated_changed"] = changed
            metrics.log(step, minutes0, **row)
            bar.set_postfix(psnr=f"{psnr.item():.1f}", ppl=f"{q.perplexity.item():.0f}")
        bar.update(1)
        out_of_time = past_time_limit(acc, t_start, max_minutes)
        if acc.is_main_process and (step % save_every == 0 or step == steps or out_of_time):
            save_train_state(state_dir, unwrapped, opt, step,
                             {"minutes": minutes0 + (time.time() - metrics.start) / 60, "from_init": from_init})
            unwrapped.save_pretrained(out / "tokenizer")
        acc.wait_for_everyone()
        if out_of_time:
            log.info("stopping at step %d: %s minutes reached", step, max_minutes)
            break
    bar.close()
    return out / "tokenizer"
