"""Training for the SEED stack, each part from its recipe, through accelerate like every mmgen trainer:

1. ``train_clip``: the small open_clip CLIP on shapes-world (image, caption) pairs (contrastive).
2. ``train_seed_tokenizer``: SEED's two stages on the frozen CLIP vision tower (stage 1: the causal
   Q-Former's final embedding aligned with the caption; stage 2: the codebook and the reconstruction of the
   causal embeddings and of the CLIP image embedding), one run, the stage switching at ``stage1_steps``.
3. ``train_seed_decoder``: the latent-diffusion decoder conditioned on the quantised SEED embedding.

All of them write atomic training state every ``save_every`` steps and ``--resume`` from it.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from mmgen.data.shapes_data import contrastive_batches, world_batches
from mmgen.train.common import (MetricsLog, cosine_lr, load_train_state, past_time_limit,
                                 read_yaml, save_train_state, should_resume, shuffled_passes)

log = logging.getLogger(__name__)


def _accelerator():
    from accelerate import Accelerator, DistributedDataParallelKwargs

    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def run_loop(name: str, module: torch.nn.Module, params, recipe: dict, out: Path,
             batches: Callable[[int, int], Iterator], loss_fn: Callable, save: Callable[[torch.nn.Module], None],
             steps: int | None, resume: bool, progress: bool, on_step: Callable | None = None,
             max_minutes: float | None = None) -> int:
    """The shared loop: cosine LR, AdamW on ``params``, gradient clipping, metrics, atomic resumable state.

    ``batches(seed, rank)`` gives endless batches; ``loss_fn(prepared_module, batch, step)`` returns
    (loss, metrics dict); ``save(module)`` writes the result part; ``on_step(module, step)`` runs after each
    optimiser step (stage switches); ``max_minutes`` stops early (and saves). Returns the final step."""
    tr = recipe.get("training", {})
    steps = steps or int(tr.get("steps", 1000))
    seed = int(tr.get("seed", 0))
    acc = _accelerator()
    torch.manual_seed(seed)
    lr = float(tr.get("lr", 1e-3))
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=float(tr.get("weight_decay", 0.0)))
    state_dir = out / "train_state"
    step, extra = 0, {}
    if should_resume(state_dir, resume):
        step, extra = load_train_state(state_dir, module, opt)
        log.info("resumed %s from step %d", name, step)
        if on_step is not None:
            on_step(module, step)
    model, opt = acc.prepare(module, opt)
    unwrapped = acc.unwrap_model(model)
    data = batches(seed * 7919 + step, acc.process_index)  # a resumed run continues on fresh samples
    metrics = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process)
    minutes0 = float(extra.get("minutes", 0.0))
    save_every, log_every = int(tr.get("save_every", 100)), int(tr.get("log_every", 10))
    bar = tqdm(total=steps, initial=step, disable=not (progress and acc.is_main_process), desc=name)
    while step < steps:
        for g in opt.param_groups:  # a group may scale the schedule (``lr_scale``)
            g["lr"] = cosine_lr(step, steps, lr, int(tr.get("warmup", 50))) * g.get("lr_scale", 1.0)
        loss, row = loss_fn(model, next(data), step)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        step += 1
        if on_step is not None:
            on_step(unwrapped, step)
        if step % log_every == 0:
            metrics.log(step, minutes0, loss=loss.item(), lr=opt.param_groups[0]["lr"], **row)
            bar.set_postfix(loss=f"{loss.item():.3f}", **{k: f"{float(v):.3f}" for k, v in row.items()})
        bar.update(1)
        out_of_time = past_time_limit(acc, metrics.start, max_minutes)
        if acc.is_main_process and (step % save_every == 0 or step == steps or out_of_time):
            save_train_state(state_dir, unwrapped, opt, step, {"minutes": minutes0 + (time.time() - metrics.start) / 60})
            save(unwrapped)
        acc.wait_for_everyone()
        if out_of_time:
            log.info("stopping %s at step %d: %s minutes reached", name, step, max_minutes)
            break
    bar.close()
    return step


def _shapes_batches(batch_size: int, image_size: int = 64):
    return lambda seed, rank: world_batches(batch_size, seed, image_size, paraphrase=True, rank=rank)


def _contrastive_batches(batch_size: int, image_size: int, hard_negatives: bool, paraphrase: bool = True,
                         negative_kinds: dict | None = None):
    if not hard_negatives:
        if negative_kinds is not None:
            raise ValueError("hard_negative_kinds is set but hard_negatives is false: it would be unused")
        return lambda seed, rank: ((x, c, None, None, None) for x, c in world_batches(batch_size, seed, image_size,
                                                                                paraphrase=paraphrase, rank=rank))
    from mmgen.data.shapes_data import negative_kind_table

    negative_kind_table(negative_kinds)  # a bad table fails before the model is built, not in the first batch
    return lambda seed, rank: contrastive_batches(batch_size, seed, image_size, rank, paraphrase=paraphrase,
                                                  negative_kinds=negative_kinds)


def build_clip(recipe: dict):
    from mmgen.tokenizers.clip_shapes import CLIP_CONFIGS, ShapesCLIP

    arch = recipe.get("architecture", {})
    cfg = arch.get("open_clip_config") or CLIP_CONFIGS[arch.get("size", "base")]
    return ShapesCLIP(cfg)


def train_clip(recipe_path: str, output: str, steps: int | None = None, resume: bool = False,
               progress: bool = True, max_minutes: float | None = None) -> Path:
    recipe = read_yaml(recipe_path)
    out = Path(output)
    tr = recipe.get("training", {})
    clip = build_clip(recipe)
    if tr.get("init_from"):  # continue from a trained CLIP (e.g. add hard negatives to a finished run)
        from mmgen.tokenizers.clip_shapes import ShapesCLIP

        clip.load_state_dict(ShapesCLIP.from_pretrained(tr["init_from"]).state_dict())
    batch = int(tr.get("batch_size", 128))

    def loss_fn(model, data, step):
        x, captions, negatives, _, _ = data
        loss, acc = model(x, captions, negatives)
        return loss, {"acc": acc.item()}

    run_loop("clip", clip, clip.parameters(), recipe, out,
             _contrastive_batches(batch, clip.image_size, bool(tr.get("hard_negatives", True)),
                                  negative_kinds=tr.get("hard_negative_kinds")), loss_fn,
             lambda m: m.save_pretrained(out / "clip"), steps, resume, progress, max_minutes=max_minutes)
    return out / "clip"


def build_seed(recipe: dict, clip_dir: str, vae_dir: str | None = None, with_decoder: bool = False):
    from dataclasses import asdict

    from mmgen.tokenizers.clip_shapes import ShapesCLIP
    from mmgen.tokenizers.seed import SEED_CONFIGS, SEEDConfig, SEEDTokenizer
    from mmgen.tokenizers.vq_image import VQImageTokenizer

    arch = dict(recipe.get("architecture", {}))
    base = SEED_CONFIGS[arch.pop("size", "base")]
    try:
        cfg = SEEDConfig(**{**asdict(base), **arch, **recipe.get("codebook", {}), **recipe.get("decoder", {})})
    except TypeError as e:
        raise ValueError(f"recipe has an unknown SEED setting: {e}") from e
    if isinstance(cfg.unet_channels, list):
        cfg.unet_channels = tuple(cfg.unet_channels)
    vae = VQImageTokenizer.from_pretrained(vae_dir) if vae_dir else None
    return SEEDTokenizer(cfg, ShapesCLIP.from_pretrained(clip_dir), vae, with_decoder=with_decoder)


def train_seed_tokenizer(recipe_path: str, clip_dir: str, output: str, steps: int | None = None,
                         resume: bool = False, progress: bool = True, max_minutes: float | None = None,
                         init: str | None = None) -> Path:
    """SEED stages 1 and 2 in one run: alignment only for ``stage1_steps``, then codebook + reconstruction.

    ``init``: a trained SEED tokenizer folder to start from (``init_seed_tokenizer``), with a fresh optimizer
    and schedule; its CLIP must be the one given."""
    recipe = read_yaml(recipe_path)
    tr = recipe.get("training", {})
    out = Path(output)
    tok = build_seed(recipe, clip_dir)
    if init and not resume:  # a resumed run takes its weights from its own training state
        init_seed_tokenizer(tok, init)
    tok.caption_slots.set_weights(tr.get("slot_weights"))
    tok.set_caption_loss_weights(tr.get("caption_loss_weights"))
    stage1 = int(tr.get("stage1_steps", 300))
    restart_every = int(tr.get("restart_every", 20))
    batch = int(tr.get("batch_size", 128))
    gen = torch.Generator().manual_seed(int(tr.get("seed", 0)) + 1)
    last_codes: dict = {}

    def restarts_after(step: int) -> bool:
        """Dead codes restart after this optimiser step: every ``restart_every`` in stage 2, and after its first
        step, when every code is seeded from real latents (not for a trained codebook from ``init``)."""
        return step > stage1 and ((step == stage1 + 1 and not init) or step % restart_every == 0)

    def loss_fn(model, data, step):
        x, captions, negatives, described, scenes = data
        stage = 1 if step < stage1 else 2
        if step == stage1 and not init:  # the usage window starts empty: the first restart seeds every code
            tok.quantizer.window_hits.zero_()  # (a trained codebook from ``init`` keeps its codes)
        loss, row = model(x, captions, stage, negatives, described, scenes)
        if restarts_after(step + 1):  # latents for the dead-code restart on_step runs after this step
            with torch.no_grad():
                last_codes["z"] = tok.to_code(tok.causal_embeddings(x[:32])).detach()
        return loss, row

    def on_step(module, step):
        if restarts_after(step) and "z" in last_codes:
            from einops import rearrange

            module.quantizer.restart_dead_codes(rearrange(last_codes["z"], "b n d -> b d 1 n"), gen)

    gate_scale = float(tr.get("gate_lr_scale", 1.0))  # the crop gates' learning rate, times the schedule's
    named = [(n, p) for n, p in tok.named_parameters() if not n.startswith("clip.")]
    trainable = [{"params": [p for n, p in named if not n.endswith("crop_gate")]},
                 {"params": [p for n, p in named if n.endswith("crop_gate")], "lr_scale": gate_scale}]
    trainable = [g for g in trainable if g["params"]]
    run_loop("seed-tokenizer", tok, trainable, recipe, out,
             _contrastive_batches(batch, tok.config.image_size, bool(tr.get("hard_negatives", True)),
                                  bool(tr.get("paraphrase", False)), tr.get("hard_negative_kinds")), loss_fn,
             lambda m: m.save_pretrained(out / "tokenizer"), steps, resume, progress, on_step, max_minutes)
    return out / "tokenizer"


def train_seed_decoder(recipe_path: str, tokenizer_dir: str, vae_dir: str, output: str, steps: int | None = None,
                       resume: bool = False, progress: bool = True, max_minutes: float | None = None,
                       init: str | None = None) -> Path:
    """The latent-diffusion decoder on the frozen SEED tokenizer and VAE; writes a complete SEED tokenizer.

    ``init``: a SEED tokenizer folder whose trained decoder (of the recipe's shape) to start from, with a fresh
    optimizer and schedule; with ``training.cache_seed`` the run can continue it on scenes it has never seen."""
    from mmgen.tokenizers.seed import SEEDTokenizer
    from mmgen.tokenizers.vq_image import VQImageTokenizer

    recipe = read_yaml(recipe_path)
    tr = recipe.get("training", {})
    out = Path(output)
    base = SEEDTokenizer.from_pretrained(tokenizer_dir, with_decoder=False)
    for k, v in recipe.get("decoder", {}).items():
        if not hasattr(base.config, k):
            raise ValueError(f"recipe has an unknown decoder setting {k!r}")
        setattr(base.config, k, tuple(v) if isinstance(v, list) else v)
    tok = SEEDTokenizer(base.config, base.clip, VQImageTokenizer.from_pretrained(vae_dir), with_decoder=True)
    tok.load_state_dict({**tok.state_dict(), **base._own_state()})
    if init and not resume:  # a resumed run takes its weights from its own training state
        init_decoder(tok, init)
    for n, p in tok.named_parameters():
        p.requires_grad_(n.startswith("diffusion."))
    batch = int(tr.get("batch_size", 32))
    cache = int(tr.get("cache_images", 0))
    if cache and cache < batch:
        raise ValueError(f"training.cache_images ({cache}) must be 0 (fresh images every step) or >= batch_size ({batch})")
    gen = torch.Generator().manual_seed(int(tr.get("seed", 0)) + 2)

    class Wrapper(torch.nn.Module):  # forward = the decoder loss, so DDP syncs it
        def __init__(self, t):
            super().__init__()
            self.t = t

        def forward(self, ids, vae_ids):
            return self.t.decoder_loss_from_ids(ids, vae_ids, gen)

    def loss_fn(model, data, step):
        return model(*data), {}

    def targets(size: int):  # world scenes -> (SEED ids, VAE ids) batches
        return lambda seed, rank: (tok.decoder_targets(x) for x, _ in
                                   _shapes_batches(size, tok.config.image_size)(seed, rank))

    def cached(seed, rank):
        """``cache_images`` scenes encoded once (the same ones after a resume), then shuffled batches of them."""
        chunks = targets(64)(int(tr.get("cache_seed", int(tr.get("seed", 0)) * 7919 + 104729)), rank)
        pairs = [next(chunks) for _ in tqdm(range(-(-cache // 64)), desc="seed-decoder cache", disable=not progress)]
        ids, vae_ids = (torch.cat(part)[:cache] for part in zip(*pairs))
        for idx in shuffled_passes(cache, batch, seed):
            idx = idx.to(ids.device)
            yield ids[idx], vae_ids[idx]

    wrapper = Wrapper(tok)
    run_loop("seed-decoder", wrapper, list(tok.diffusion.parameters()), recipe, out,
             cached if cache else targets(batch), loss_fn,
             lambda m: m.t.save_pretrained(out / "tokenizer"), steps, resume, progress, max_minutes=max_minutes)
    return out / "tokenizer"


def init_seed_tokenizer(tok, init_dir: str) -> None:
    """Copy a trained SEED tokenizer's own weights (Q-Former, codebook, code decoder, caption heads; not the
    diffusion decoder) into ``tok``, which must be the same apart from more CLIP views (``clip_crops``). Each
    crop's Q-Former position embedding starts as the trained one at the image position its patch covers,
    each block's crop cross-attention as a copy of its trained cross-attention, its gate at 0: the tokenizer
    starts out giving the trained one's ids. A larger codebook (``codebook_size``, the same ``code_dim``) keeps
    the trained codes as its first entries; each new one starts as a trained code plus a little noise, its
    usage at 0, so it splits a trained code's cell (dead-code restarts move the ones no latent picks). The CLIPs
    must match."""
    from mmgen.tokenizers.base import CheckpointError
    from mmgen.tokenizers.seed import SEEDTokenizer

    src = SEEDTokenizer.from_pretrained(init_dir, with_decoder=False)
    if any(not torch.equal(a, b.to(a.dtype)) for a, b in zip(tok.clip.state_dict().values(),
                                                           src.clip.state_dict().values())):
        raise CheckpointError(f"the CLIP in {init_dir} is not the one given with --clip")
    if src.config.clip_crops or src.config.clip_class_token != tok.config.clip_class_token:
        raise ValueError(f"{init_dir} must read the image alone, with the recipe's clip_class_token")
    mine, theirs = tok._own_state(), {k: v.float() for k, v in src._own_state().items()}
    theirs.update(grown_codebook(theirs, mine))
    crop_part = (".crop_attn.", ".ln_crop.", ".crop_gate")
    new = {k for k in mine if any(p in k for p in crop_part)}
    differ = sorted((set(mine) - new) ^ set(theirs)) or [k for k in theirs if mine[k].shape != theirs[k].shape
                                                         and k != "qformer.feat_pos"]
    if differ:
        raise ValueError(f"the SEED tokenizer in {init_dir} is not the recipe's: it differs in {differ[:5]}")
    theirs["qformer.feat_pos"] = crop_positions(theirs["qformer.feat_pos"], tok.config.clip_crops,
                                                tok.clip.image_size, tok.config.clip_class_token)
    for k in new:  # each crop cross-attention starts as a copy of its block's trained one, its gate shut
        if k.endswith(".crop_gate"):
            theirs[k] = torch.zeros(())
        else:
            theirs[k] = theirs[k.replace(".crop_attn.", ".cross_attn.").replace(".ln_crop.", ".ln2.")]
    tok.load_state_dict({**tok.state_dict(), **theirs})
    log.info("SEED tokenizer started from %s", init_dir)


def grown_codebook(theirs: dict, mine: dict) -> dict:
    """The trained quantizer's tensors grown to ``mine``'s codebook size (``init_seed_tokenizer``); {} when the
    sizes match. Refuses a smaller codebook or another code width: the trained ids would not survive them."""
    key, usage = "quantizer.embedding.weight", "quantizer.usage"
    if key not in theirs or key not in mine:
        return {}  # not a SEED quantizer: the caller's key check names what differs
    old, new = theirs[key], mine[key]
    if old.shape == new.shape:
        return {}
    if old.shape[1] != new.shape[1] or new.shape[0] < old.shape[0]:
        raise ValueError(f"a codebook of {tuple(old.shape)} can grow to more codes of the same width, "
                         f"not to {tuple(new.shape)}")
    g = torch.Generator().manual_seed(0)
    extra = new.shape[0] - old.shape[0]
    pick = torch.randint(0, old.shape[0], (extra,), generator=g)
    unit = torch.nn.functional.normalize(old[pick], dim=-1)
    grown = torch.cat([old, unit + 0.05 * torch.randn(extra, old.shape[1], generator=g)])
    log.info("codebook grown from %d to %d codes", old.shape[0], new.shape[0])
    return {key: grown, usage: torch.cat([theirs[usage], torch.zeros(extra)])}


def crop_positions(pos: torch.Tensor, crops: int, image_size: int, class_token: bool) -> torch.Tensor:
    """A single view's position embedding (class token first if ``class_token``, then a square grid of
    patches) -> one for the image and its ``crops`` x ``crops`` views (``ShapesCLIP.crop_views``): each crop
    patch takes the row of the image patch under its centre; a crop's class token the image's."""
    if crops == 0:
        return pos
    lead = int(class_token)
    grid = int(round((pos.shape[0] - lead) ** 0.5))
    if grid * grid + lead != pos.shape[0]:
        raise ValueError(f"a position embedding of {pos.shape[0]} rows is no square grid")
    from mmgen.tokenizers.clip_shapes import crop_boxes

    side, starts = crop_boxes(image_size, crops)
    cell = image_size / grid                      # image pixels per patch
    centres = (torch.arange(grid) + 0.5) * side / grid  # crop patch centres, in image pixels from the crop's edge
    views = [pos]
    for y0 in starts:
        for x0 in starts:
            r = ((y0 + centres) / cell).long().clamp(max=grid - 1)
            c = ((x0 + centres) / cell).long().clamp(max=grid - 1)
            rows = (r[:, None] * grid + c[None, :]).flatten() + lead
            views.append(torch.cat([pos[:lead], pos[rows]]))
    return torch.cat(views)


DECODER_FIELDS = ("unet_channels", "unet_heads", "latent_scale", "train_timesteps", "sample_steps", "guidance_scale",
                  "cond_drop")


def attach_decoder(tok, decoder_dir: str):
    """``tok`` (a SEED tokenizer, with or without a decoder) with the trained diffusion decoder and VAE of the
    SEED tokenizer folder ``decoder_dir``: its UNet, condition projection, null condition and decoder settings,
    untrained further. For a tokenizer whose stage 2 ran on after its decoder was trained: the decoder reads
    the rebuilt causal embeddings and the generation embedding, not the ids, so it can carry over; whether it
    decodes as well over the new ids is for shapes-eval of reconstructions to say (docs/seed.md, tenth look).
    The CLIPs and the embedding width must match."""
    from mmgen.tokenizers.base import CheckpointError
    from mmgen.tokenizers.seed import SEEDTokenizer

    src = SEEDTokenizer.from_pretrained(decoder_dir)
    if src.diffusion is None or src.vae is None:
        raise CheckpointError(f"{decoder_dir} has no trained diffusion decoder to take")
    if (src.config.width, src.config.embed_dim, src.config.num_queries) != (
            tok.config.width, tok.config.embed_dim, tok.config.num_queries):
        raise ValueError(f"the decoder in {decoder_dir} reads embeddings of another shape than this tokenizer's")
    mine, theirs = tok.clip.state_dict(), src.clip.state_dict()
    if mine.keys() != theirs.keys() or any(not torch.equal(mine[k].half(), theirs[k].half()) for k in mine):
        raise CheckpointError(f"the CLIP in {decoder_dir} is not this tokenizer's")  # (either may be stored fp16)
    cfg = copy.deepcopy(tok.config)
    for k in DECODER_FIELDS:
        setattr(cfg, k, getattr(src.config, k))
    out = SEEDTokenizer(cfg, tok.clip, src.vae, with_decoder=True)
    out.load_state_dict({**out.state_dict(), **{k: v for k, v in tok._own_state().items()
                                                if not k.startswith("diffusion.")}})
    _copy_decoder(out, src, decoder_dir)
    return out.eval()


def init_decoder(tok, init_dir: str) -> None:
    """Copy a trained SEED decoder (UNet, condition projection, null condition) into ``tok``'s decoder, which
    must have the same shape (any difference is an error naming the weights)."""
    from mmgen.tokenizers.seed import SEEDTokenizer

    _copy_decoder(tok, SEEDTokenizer.from_pretrained(init_dir), init_dir)
    log.info("decoder started from %s", init_dir)


def _copy_decoder(tok, src, where: str) -> None:
    """``src``'s trained diffusion decoder (loaded from ``where``) into ``tok``'s, which must have its shape."""
    from mmgen.tokenizers.base import CheckpointError

    if src.diffusion is None:
        raise CheckpointError(f"{where} has no trained diffusion decoder to take")
    mine, theirs = tok.diffusion.state_dict(), src.diffusion.state_dict()
    differ = sorted(set(mine) ^ set(theirs)) or [k for k in mine if mine[k].shape != theirs[k].shape]
    if differ:
        raise ValueError(f"the decoder in {where} is not this tokenizer's: it differs in {differ[:5]}")
    tok.diffusion.load_state_dict({k: v.float() for k, v in theirs.items()})
