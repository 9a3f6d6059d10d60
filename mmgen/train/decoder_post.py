"""Decoder post-training on the generator's own tokens, after RobusTok ("Image Tokenizer Needs Post-Training",
Qiu et al. 2025): a decoder trained on true ids meets, at generation time, ids the AR model wrote, some of them
ones no real page has there (a stray id of ink, or of the other card colour, on blank card). The decoder paints
them as they are (isolated specks that a page's layout checks read as ink). Post-training shows the decoder
pages whose ids the trained AR model wrote and asks for the true page back, so it learns what the generator
meant where an id is out of place.

How the generated ids are made here (simplified; the paper builds its post-training inputs from its own
generator's sampling, and its details are not reproduced): every image token of the page is drawn from the
generator's teacher-forced distribution, i.e. given the true tokens before it, with the checkpoint's own
sampling options (guidance, its schedule and plausibility constraint, temperature, top-k, top-p, min-p). So
the errors are the ones the generator makes one step at a time, not the drift of a whole free-running
sample; the decoder's target is the page those true tokens encode. Only the decoder trains
(``training.train_only: decoder``), so the ids, and the generator trained over them, stay valid. One process
only (the generated pages are decoded outside the distributed wrapper).

Measured once (stage 4e, ``checkpoints/text_tokenizer/README.md``): reconstructions read better, generated
pages no better; the errors that decide the checks there come from guidance, which teacher forcing with the
true tokens before each one shows only in part.
"""
from __future__ import annotations

import torch

from mmgen.sampling.ar import SamplingOptions, guidance_at, guided, sample_next
from mmgen.text.quoted import split_prompts


def window_index(model, num_tokens: int) -> torch.Tensor:
    """(N,) the sampling step at which each raster-order image token is written (its Token-Shuffle window, or
    itself without a shuffle): what the guidance schedule ramps over."""
    if model.shuffle is None:
        return torch.arange(num_tokens)
    windows = model.shuffle.to_windows(torch.arange(num_tokens)[None])[0]  # (steps, k) raster indices
    step = torch.empty(num_tokens, dtype=torch.long)
    step[windows.reshape(-1)] = torch.arange(windows.shape[0]).repeat_interleave(windows.shape[1])
    return step


@torch.no_grad()
def generated_ids(pipe, captions: list[str], codes: torch.Tensor, options: SamplingOptions,
                  generator: torch.Generator) -> torch.Tensor:
    """Local ids (b, N) that ``pipe``'s model draws for each token of the pages ``codes`` (b, N) (local ids,
    raster order) given the true tokens before it and the page's caption, with ``options`` as sampling would
    use them (guidance through the unconditional branch, which drops the whole condition)."""
    model, vocab = pipe.model, pipe.model.vocab
    opts = options.validate()
    b, n = codes.shape
    image_ids = vocab.to_unified("image", codes)
    boi = torch.full((b, 1), vocab.special("<boi>"), dtype=torch.long, device=codes.device)
    if model.config.text_bytes:
        rest, slot, empty = split_prompts(captions, vocab, model.config.text_bytes)
        start, null_start = torch.cat([slot.to(codes.device), boi], 1), torch.cat([empty.to(codes.device), boi], 1)
    else:
        rest, start, null_start = captions, boi, boi
    lo, hi = vocab.range("image")
    logits = model.image_logits(pipe.encode_prompts(rest), start, image_ids)[..., lo:hi]
    if opts.guidance_scale != 1.0:
        free = model.image_logits(model.prefix(None, None, batch=b), null_start, image_ids)[..., lo:hi]
        steps = window_index(model, n)
        total = int(steps.max()) + 1
        per_step = [guidance_at(opts.guidance_scale, opts.cfg_schedule, i, total) for i in range(total)]
        scale = torch.tensor(per_step, dtype=logits.dtype, device=logits.device)[steps.to(logits.device)]
        logits = guided(logits, free, scale[None, :, None], opts.plausibility)
    return sample_next(logits, opts, generator)
