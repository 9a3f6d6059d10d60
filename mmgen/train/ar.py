"""Train the AR transformer on (caption, image tokens) pairs through accelerate.

Images come from the shapes world (paraphrased captions, held-out colour-shape pairs excluded) or a user
folder, are tokenized on the fly by a frozen tokenizer, and captions pass through the frozen sentence
encoder; 10 % of conditions are dropped to the null prefix so classifier-free guidance works. Loss:
cross-entropy on the image tokens and the end-of-image token. Periodic atomic state, --resume, metrics.jsonl,
and a complete pipeline folder (model_index.json + parts) written at every save.

``training.see_batch`` > 0 also trains the other direction in the same model and vocabulary (SEED's "see"):
rows ``<boi> image tokens <eoi> <bot> caption bytes <eot>`` with no prefix, the loss on the caption bytes and
``<eot>``. The caption is the canonical one with objects in reading order (cell order), so it is a function
of the image; held-out colour-shape pairs are excluded here too.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmgen.data.shapes_data import folder_batches, training_batches
from mmgen.model.transformer import AR_CONFIGS, ARConfig, MMGenTransformer
from mmgen.model.vocab import Vocabulary
from mmgen.pipelines.text_to_image import TextToImagePipeline, load_tokenizer
from mmgen.text.encoder import SentenceEncoder
from mmgen.text.quoted import split_prompts
from mmgen.train.common import (MetricsLog, check_sections, check_time_schedule, cosine_lr, load_train_state,
                                 past_time_limit, read_yaml, save_train_state, should_resume, shuffled_passes,
                                 time_progress)
from mmgen.worlds import shapes

log = logging.getLogger(__name__)


AR_RECIPE_SECTIONS = {"architecture": None,  # checked by ARConfig
                      "training": {"steps", "batch_size", "lr", "warmup", "weight_decay", "cond_dropout", "save_every",
                                   "log_every", "seed", "world", "exclude_combos", "sampling_defaults", "see_batch",
                                   "image_size", "cache_images", "glyph_weight", "init_over_retrained_tokenizer"}}

# model settings that carry no weights: a run started with --init may change them (a longer sequence, a larger
# Token-Shuffle grid for a larger canvas); every other setting must match the model it starts from
INIT_FREE_FIELDS = {"max_positions", "shuffle_grid"}
# parts a run started with --init may add to a model that lacks them (they start fresh): setting -> weight prefix
INIT_ADDED_PARTS = {"glyph_head": "glyph_head.", "byte_index": "byte_index_embed."}


def build_model(recipe: dict, tokenizer) -> MMGenTransformer:
    arch = dict(recipe.get("architecture", {}))
    base = AR_CONFIGS[arch.pop("size", "base")]
    vocab = Vocabulary.build({"image": tokenizer.vocab_size})
    if int(arch.get("shuffle_window", 1)) > 1:
        if tokenizer.layout.kind != "grid2d":
            raise ValueError(f"Token-Shuffle needs a 2-D token grid, the tokenizer's layout is {tokenizer.layout.kind}")
        arch["shuffle_grid"] = tuple(tokenizer.layout.grid)
    if arch.get("image_head") == "bitwise":  # one logit per bit: only where the id is the bit pattern
        bits = getattr(getattr(tokenizer, "config", None), "bits", None)
        if tokenizer.type_name != "binary_text" or not bits:
            raise ValueError(f"image_head: bitwise needs a binary tokenizer (the id is its bit pattern); "
                             f"this one is {tokenizer.type_name!r}")
        arch["image_bits"] = int(bits)
    try:
        cfg = ARConfig(**{**asdict(base), **arch, "vocab": vocab.to_dict()})
    except TypeError as e:
        raise ValueError(f"recipe has an unknown model setting: {e}") from e
    return MMGenTransformer(cfg)


def check_same_tokenizer(trained, tokenizer, where: str, retrained: bool = False) -> None:
    """The run's tokenizer must be the one the --init model was trained over (on any canvas): the same type,
    configuration and weights, apart from the canvas and what the canvas resamples (``_state_at``).
    ``retrained`` (``training.init_over_retrained_tokenizer``): that tokenizer trained further is allowed
    too, the same type, vocabulary and id layout with other weights; the model relearns the ids that moved."""
    if type(trained) is not type(tokenizer):
        raise ValueError(f"--init {where}: its model was trained over a {type(trained).__name__}, the run's "
                         f"tokenizer is a {type(tokenizer).__name__}")
    if retrained:
        if trained.vocab_size != tokenizer.vocab_size or trained.layout != tokenizer.layout:
            raise ValueError(f"--init {where}: its model's tokenizer has {trained.vocab_size} ids in "
                             f"{trained.layout}, the run's {tokenizer.vocab_size} in {tokenizer.layout}")
        return
    a, b = asdict(trained.config), asdict(tokenizer.config)
    differ = sorted(k for k in a if k != "image_size" and a[k] != b.get(k))
    mine = tokenizer.state_dict()
    differ += sorted(k for k, v in trained.at_image_size(tokenizer.config.image_size).state_dict().items()
                     if k not in mine or mine[k].shape != v.shape
                     or not torch.allclose(mine[k].float(), v.float(), rtol=1e-3, atol=1e-4))  # fp16 copies pass
    if differ:
        raise ValueError(f"--init {where}: the run's --tokenizer is not the tokenizer its model was trained over "
                         f"(differs in {', '.join(differ[:5])}); give that pipeline's tokenizer folder")


def init_model_from(model: MMGenTransformer, directory: str, tokenizer=None, retrained: bool = False) -> None:
    """Copy a trained model's weights (a pipeline folder, or its model/ part) into ``model``, e.g. a 256x256
    run into the same model on 512x512 pages. ``model`` may have parts the trained one lacks
    (``INIT_ADDED_PARTS``: the glyph head, the byte index embedding); they keep their fresh initialisation.
    Raises ValueError when the architectures differ otherwise, or (given a pipeline and ``tokenizer``) when
    the run's tokenizer is not the one the model was trained over."""
    folder = Path(directory)
    if (folder / "model_index.json").is_file():
        if tokenizer is not None:
            check_same_tokenizer(load_tokenizer(folder / "tokenizer"), tokenizer, directory, retrained)
        folder = folder / "model"
    src = MMGenTransformer.from_pretrained(folder)
    a, b = asdict(src.config), asdict(model.config)
    added = {k for k in INIT_ADDED_PARTS if not a.get(k) and b.get(k)}
    differ = sorted(k for k in a if k not in INIT_FREE_FIELDS | added and a[k] != b.get(k))
    if differ:
        raise ValueError(f"--init {directory}: its model differs from the recipe's in {', '.join(differ)} "
                         f"(only {', '.join(sorted(INIT_FREE_FIELDS))} may change, and "
                         f"{', '.join(sorted(INIT_ADDED_PARTS))} may be added)")
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    new = tuple(INIT_ADDED_PARTS[k] for k in added)
    if unexpected or any(not k.startswith(new) for k in missing):
        raise ValueError(f"--init {directory}: weights do not match the recipe's model (missing {missing}, "
                         f"unexpected {unexpected})")


def caption_batches(batch_size: int, seed: int, size: int, rank: int, exclude_combos):
    """Endless (images (b, 3, H, W) in [0, 1], reading-order canonical captions) from the shapes world."""
    import itertools

    import numpy as np

    stream = shapes.generate(None, seed=seed * 1000 + rank + 17, size=size, exclude_combos=exclude_combos)
    while True:
        chunk = list(itertools.islice(stream, batch_size))
        arr = np.stack([np.asarray(s.image) for s in chunk])
        yield (torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0,
               [shapes.reading_order_caption(s.objects, s.background) for s in chunk])


def caption_sequences(image_ids: torch.Tensor, captions: list[str], vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Unified image ids (b, n) + captions -> (input ids, targets) for ``<boi> image <eoi> <bot> bytes <eot>``,
    right-padded; targets are -100 except on the caption bytes and <eot>."""
    boi, eoi, bot, eot, pad = (vocab.special(t) for t in ("<boi>", "<eoi>", "<bot>", "<eot>", "<pad>"))
    rows = [torch.cat([torch.tensor([boi]), image_ids[i], torch.tensor([eoi, bot]),
                       vocab.to_unified("byte", torch.tensor(list(c.encode("utf-8")), dtype=torch.long)),
                       torch.tensor([eot])]) for i, c in enumerate(captions)]
    length = max(len(r) for r in rows)
    full = torch.full((len(rows), length), pad, dtype=torch.long)
    target = torch.full((len(rows), length - 1), -100, dtype=torch.long)
    first = image_ids.shape[1] + 3  # index of the first caption byte
    for i, r in enumerate(rows):
        full[i, :len(r)] = r
        target[i, first - 1:len(r) - 1] = r[first:]
    return full[:, :-1], target


def cached_codes(batches, tokenizer, cache: int, batch: int, seed: int, device, progress: bool = True):
    """``cache`` images of ``batches`` encoded once, then endless shuffled batches of (local ids (b, N), captions).

    For a tokenizer whose encoder costs as much as the model's step (the binary text tokenizer's 16 pages take
    about as long to encode as the bitwise model's step on them): each page is encoded once and revisited, at the
    price of fewer distinct pages. ``batches`` must be seeded by the run's seed alone, so a resumed run rebuilds
    the same cache; the order of each pass is drawn from ``seed``."""
    codes, captions = [], []
    bar = tqdm(total=cache, desc="ar cache (encode)", disable=not progress)
    while len(captions) < cache:
        images, caps = next(batches)
        with torch.no_grad():
            codes.append(tokenizer.encode(images.to(device)).to(torch.int32).cpu())
        captions += list(caps)
        bar.update(len(caps))
    bar.close()
    codes, captions = torch.cat(codes)[:cache], captions[:cache]
    for idx in shuffled_passes(cache, batch, seed):
        yield codes[idx].long(), [captions[j] for j in idx.tolist()]


def write_profile(profiler, path: Path, device_type: str) -> None:
    """Stop ``profiler`` and write its operator tables: by self device time (on an accelerator), by self host
    time."""
    profiler.stop()
    table = profiler.key_averages()
    parts = ([f"# by self {device_type} time\n" + table.table(sort_by=f"self_{device_type}_time_total", row_limit=30)]
             if device_type == "cuda" else [])
    parts.append("# by self host time\n" + table.table(sort_by="self_cpu_time_total", row_limit=30))
    path.write_text("\n\n".join(parts) + "\n")
    log.info("profile of five steps written to %s", path)


def check_glyph_setup(model: MMGenTransformer, weight: float, tr: dict, data: str | None, tokenizer) -> int:
    """The glyph head's training needs: ``training.glyph_weight`` > 0 exactly when the model has the head, the
    text world's pages rendered each step (their glyph maps come with them), and Token-Shuffle's image path.
    Returns the glyph maps' cell in pixels (one image token's), 0 without the head."""
    if weight < 0:
        raise ValueError(f"training.glyph_weight must be at least 0, got {weight}")
    if not model.config.glyph_head:
        if weight:
            raise ValueError("training.glyph_weight weighs the glyph head's loss: set architecture.glyph_head: true")
        return 0
    if not weight:
        raise ValueError("architecture.glyph_head is trained by its loss: set training.glyph_weight above 0")
    if data or tr.get("world", "shapes") != "text" or int(tr.get("cache_images", 0)):
        raise ValueError("the glyph head learns from the text world's layouts: training.world: text, rendered each "
                         "step (no --data, no training.cache_images)")
    if model.shuffle is None:
        raise ValueError("the glyph head is trained through Token-Shuffle's image path: shuffle_window > 1")
    (h, w), size = tokenizer.layout.grid, tokenizer.config.image_size
    if h != w or size % w:
        raise ValueError(f"the glyph maps need a square grid of square cells; the tokenizer's is {h}x{w} tokens "
                         f"on {size} px")
    return size // w


def train_ar(recipe_path: str, tokenizer_dir: str, output: str, steps: int | None = None, resume: bool = False,
             data: str | None = None, seed: int | None = None, save_every: int | None = None,
             progress: bool = True, max_minutes: float | None = None, init: str | None = None,
             data_workers: int = 0, precision: str = "no", time_schedule: bool = False,
             profile: bool = False) -> Path:
    """Returns the pipeline folder (output/pipeline). ``max_minutes`` stops (and saves) early. ``init``: a
    trained pipeline whose model weights start this run (fresh optimizer and schedule; ``INIT_ADDED_PARTS`` may
    be added to it); ``training.image_size`` runs the tokenizer on another canvas
    (``GridImageTokenizer.at_image_size``). ``data_workers``: render the world in that many processes (see
    ``training_batches``). ``precision``: ``no`` (fp32) or ``bf16`` autocast
    (for an accelerator; on this CPU bf16 runs several times slower). ``time_schedule``: the cosine follows the
    share of ``max_minutes`` used when that is further along than the steps, so a run cut by the clock ends
    annealed. ``profile``: torch.profiler over five steps after the tenth (or the resumed step), its tables
    of operator times (by device time, then host time) in output/profile.txt.

    On an accelerator the step's own code reads nothing back from the device: the pages (uint8) and the ids
    reach it by non-blocking copies and the image codes stay there, so the host can prepare the next step
    while the device runs this one (a blocking copy or a read-back is a barrier that serialises the two). The
    sentence encoder's attention mask (transformers) may still be one such barrier. ``data_wait_s`` in
    metrics.jsonl is the host's mean time per step spent waiting for the next batch of pages (or of cached
    codes), the encoding not included."""
    from accelerate import Accelerator

    recipe = read_yaml(recipe_path)
    check_sections(recipe, AR_RECIPE_SECTIONS, f"recipe {recipe_path}")
    tr = recipe.get("training", {})
    steps = steps or int(tr.get("steps", 10000))
    seed = seed if seed is not None else int(tr.get("seed", 0))
    save_every = save_every or int(tr.get("save_every", 200))
    out = Path(output)
    if precision not in ("no", "bf16"):
        raise ValueError(f"precision must be 'no' (fp32) or 'bf16', got {precision!r}")
    check_time_schedule(time_schedule, max_minutes, resume)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    # bf16 by autocast around the loss here rather than Accelerator(mixed_precision=...): accelerate's state is one
    # per process, and a second run in the same process (the tests, a notebook) could not change it
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if acc.device.type == "cuda" and precision == "bf16":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 parts (the tokenizer, the sentence encoder)
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    tokenizer = load_tokenizer(tokenizer_dir).to(acc.device)
    if tr.get("image_size") is not None:
        tokenizer = tokenizer.at_image_size(int(tr["image_size"]))
    for p in tokenizer.parameters():
        p.requires_grad_(False)
    model = build_model(recipe, tokenizer)
    if int(tr.get("see_batch", 0)) and model.config.byte_index:
        raise ValueError("architecture.byte_index numbers the quoted text's bytes; the see task writes captions as "
                         "bytes, which it would number too: use one of them")
    glyph_w = float(tr.get("glyph_weight", 0.0))
    glyph_cell = check_glyph_setup(model, glyph_w, tr, data, tokenizer)
    state_dir = out / "train_state"
    if init is not None:
        if resume:
            raise ValueError("--init starts a new run from a model's weights; --resume continues a run: "
                             "give one of them")
        init_model_from(model, init, tokenizer, bool(tr.get("init_over_retrained_tokenizer", False)))
    text = SentenceEncoder(model.config.max_cond_tokens).to(acc.device)
    lr = float(tr.get("lr", 1e-3))
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "norm" in n or "embed" in n or "null" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": float(tr.get("weight_decay", 0.05))},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    step, extra = 0, {}
    if should_resume(state_dir, resume):
        step, extra = load_train_state(state_dir, model, opt)
        log.info("resumed from step %d", step)
    wrapped, opt = acc.prepare(model, opt)
    batch = int(tr.get("batch_size", 16))
    cache = int(tr.get("cache_images", 0))
    if cache and cache < batch:
        raise ValueError(f"training.cache_images ({cache}) must be 0 (fresh images every step) "
                         f"or >= batch_size ({batch})")
    held = [tuple(c) for c in tr.get("exclude_combos", shapes.HELD_OUT_COMBOS)]
    data_seed = seed if cache else seed + step  # a cache is the same pages after --resume; else fresh ones
    batches = (folder_batches(data, batch, data_seed, tokenizer.config.image_size, acc.process_index,
                              acc.num_processes) if data
               else training_batches(tr.get("world", "shapes"), batch, data_seed, tokenizer.config.image_size,
                                     acc.process_index, paraphrase=True, exclude_combos=held, workers=data_workers,
                                     device=acc.device, glyph_cell=glyph_cell))
    if cache:  # batches of codes, encoded once
        coded = cached_codes(batches, tokenizer, cache, batch, seed + 31 + step + 1009 * acc.process_index,
                             acc.device, progress and acc.is_main_process)
    else:  # batches of pages, encoded each step
        coded = batches
    vocab = model.vocab
    text_bytes = model.config.text_bytes
    boi, eoi = vocab.special("<boi>"), vocab.special("<eoi>")
    drop_p = float(tr.get("cond_dropout", 0.1))
    shuffled = model.tokens_per_step > 1
    metrics = MetricsLog(out / "metrics.jsonl", enabled=acc.is_main_process)
    minutes0 = float(extra.get("minutes", 0.0))
    gen = torch.Generator().manual_seed(seed + 7 + step + acc.process_index)
    bar = tqdm(total=steps, initial=step, disable=not (progress and acc.is_main_process), desc="ar")
    warmup = int(tr.get("warmup", 200))
    log_every = int(tr.get("log_every", 20))
    t_start = time.time()
    tokens_seen, data_wait, profiler = 0, 0.0, None
    profile_at = step + 10

    def save():
        if acc.is_main_process:
            unwrapped = acc.unwrap_model(wrapped)
            save_train_state(state_dir, unwrapped, opt, step, {"minutes": minutes0 + (time.time() - t_start) / 60})
            pipe = TextToImagePipeline(tokenizer, unwrapped, text, tr.get("sampling_defaults"),
                                       tasks=["draw", "see"] if see_batch else ["draw"],
                                       world=None if data else tr.get("world", "shapes"))
            pipe.save_pretrained(out / "pipeline", dtype=None)
        acc.wait_for_everyone()

    see_batch = int(tr.get("see_batch", 0))
    see_data = caption_batches(see_batch, seed + 100 + step, tokenizer.config.image_size, acc.process_index,
                               held) if see_batch else None
    while step < steps:
        if profile and acc.is_main_process and step == profile_at:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                              + ([torch.profiler.ProfilerActivity.CUDA]
                                                 if acc.device.type == "cuda" else []))
            profiler.start()
        t_data = time.perf_counter()
        item, captions, *glyphs = next(coded)  # the glyph maps with glyph_head (check_glyph_setup)
        data_wait += time.perf_counter() - t_data
        with torch.no_grad():
            codes = item if cache else tokenizer.encode(item.to(acc.device, non_blocking=True))
        drop_cpu = torch.rand(len(captions), generator=gen) < drop_p
        drop = drop_cpu.to(acc.device, non_blocking=True)
        start = torch.full((len(captions), 1), boi)
        if text_bytes:  # quoted text as bytes (dropped with the condition), the encoder reads the rest
            captions, slot, empty = split_prompts(captions, vocab, text_bytes)
            start = torch.cat([torch.where(drop_cpu[:, None], empty, slot), start], 1)
        with torch.no_grad():
            dev_codes = codes.to(acc.device, non_blocking=True)
            ids = torch.cat([start.to(acc.device, non_blocking=True), vocab.to_unified("image", dev_codes, check=False),
                             torch.full((len(captions), 1), eoi, device=acc.device)], 1)
            cond = text(captions, too_long="drop")  # a rare paraphrase over the prefix trains unconditioned
        n_start = start.shape[1]
        lr_now = cosine_lr(step, steps, lr, warmup,
                           progress=time_progress(acc, t_start, max_minutes) if time_schedule else None)
        for g in opt.param_groups:
            g["lr"] = lr_now
        unwrapped = acc.unwrap_model(wrapped)
        if see_data is not None:  # encoded outside autocast: the tokenizer's ids stay those of fp32
            see_images, see_captions = next(see_data)
            with torch.no_grad():
                see_codes = vocab.to_unified("image", tokenizer.encode(see_images.to(acc.device)).cpu())
            see_ids, see_target = caption_sequences(see_codes, see_captions, vocab)
        with autocast:
            prefix = unwrapped.prefix(cond.states, cond.mask, drop=drop)
            if glyphs:  # and the letter under each token's cell from the state that draws it (MMGenTransformer.forward)
                # not asked where the condition was dropped: there no byte names the letter
                letters = torch.where(drop[:, None, None], 0, glyphs[0])
                image_loss, glyph_loss = wrapped(prefix, ids[:, :n_start], image_ids=ids[:, n_start:-1],
                                                 target=ids[:, n_start:-1], glyph_target=letters)
                loss = image_loss + glyph_w * glyph_loss
            elif shuffled:  # Token-Shuffle: every image token from its window's position; the length is fixed, no <eoi>
                loss = wrapped(prefix, ids[:, :n_start], image_ids=ids[:, n_start:-1], target=ids[:, n_start:-1])
            else:  # loss on the image tokens and <eoi> only: the start ids (bytes, <boi>) are given
                target = ids[:, 1:].clone()
                target[:, :n_start - 1] = -100
                loss = wrapped(prefix, ids[:, :-1], target=target)
            if see_data is not None:
                empty = torch.zeros(len(see_captions), 0, model.config.hidden_size, device=acc.device)
                see_loss = wrapped(empty, see_ids.to(acc.device), target=see_target.to(acc.device))
                loss = loss + see_loss
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(wrapped.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += ids.numel()
        if step % log_every == 0:
            el = time.time() - t_start
            extra_row = {"see_loss": see_loss.item()} if see_data is not None else {}
            if glyphs:  # loss stays what runs without the head log (image tokens, + see task)
                extra_row.update(glyph_loss=glyph_loss.item(), total_loss=loss.item())
                loss = loss - glyph_w * glyph_loss
            metrics.log(step, minutes0, loss=loss.item(), lr=opt.param_groups[0]["lr"],
                        tokens_per_s=tokens_seen * acc.num_processes / max(el, 1e-9),
                        data_wait_s=data_wait / log_every, **extra_row)
            data_wait = 0.0
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        if profiler is not None and step == profile_at + 5:
            write_profile(profiler, out / "profile.txt", acc.device.type)
            profiler = None
        out_of_time = past_time_limit(acc, t_start, max_minutes)
        if step % save_every == 0 or step == steps or out_of_time:
            save()
        if out_of_time:
            log.info("stopping at step %d: %s minutes reached", step, max_minutes)
            break
    bar.close()
    if profiler is not None:  # the run ended inside the profiled steps
        write_profile(profiler, out / "profile.txt", acc.device.type)
    return out / "pipeline"
