"""Autoregressive sampling: prefill + KV-cached decode, classifier-free guidance by doubling the batch,
temperature, top-k, top-p, min-p, and ``generator=`` seeding. A pure function of (model, conditioning, options,
generator) that returns the token ids and a record of what it did."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm


CFG_SCHEDULES = ("constant", "linear")


def guidance_at(scale: float, schedule: str, index: int, total: int) -> float:
    """Guidance for the token at ``index`` of ``total``. "linear" ramps it up with the token index, from
    nearly 1 at the first token to ``scale`` at the last (Token-Shuffle's finding: strong guidance on the
    first tokens of an image hurts, later tokens need it)."""
    if schedule == "constant" or total <= 1:
        return scale
    return 1.0 + (scale - 1.0) * (index + 1) / total


@dataclass
class SamplingOptions:
    guidance_scale: float = 3.0
    temperature: float = 1.0
    top_k: int = 0        # 0: off
    top_p: float = 1.0    # 1.0: off
    min_p: float = 0.0    # 0.0: off; else drop ids less likely than min_p x the most likely one (filter_logits)
    plausibility: float = 0.0  # 0.0: off; under guidance, only ids the conditional finds plausible (guided)
    cfg_schedule: str = "constant"  # "constant", or "linear": guidance ramps from 1 to guidance_scale

    @classmethod
    def from_dict(cls, values: dict, where: str = "sampling options") -> "SamplingOptions":
        """Checked construction from a mapping (a checkpoint's defaults, ``mmgen pack --defaults``): unknown
        keys and wrongly typed values are a ValueError that names them, not a later crash mid-generation."""
        if not isinstance(values, dict):
            raise ValueError(f"{where} must be a JSON object like {{\"guidance_scale\": 3.0}}, got {values!r}")
        fields = cls.__dataclass_fields__
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(fields)}")
        typed = {}
        for key, value in values.items():
            want = {"cfg_schedule": str, "top_k": int}.get(key, float)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (isinstance(value, str) if want is str else number and (want is float or float(value).is_integer())):
                raise ValueError(f"{where}: {key} must be {want.__name__}, got {value!r}")
            typed[key] = want(value)
        return cls(**typed).validate()

    def validate(self) -> "SamplingOptions":
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        if not (0.0 <= self.guidance_scale <= 50.0):
            raise ValueError(f"guidance_scale must lie in [0, 50], got {self.guidance_scale}")
        if not (0.0 < self.temperature <= 10.0):
            raise ValueError(f"temperature must lie in (0, 10], got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must lie in [0, 1) (0 turns it off), got {self.min_p}")
        if not (0.0 <= self.plausibility < 1.0):
            raise ValueError(f"plausibility must lie in [0, 1) (0 turns it off), got {self.plausibility}")
        return self


@dataclass
class SamplingRecord:
    sampler: str = "ar"
    batch: int = 0
    tokens: int = 0             # tokens written per image
    forward_passes: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0   # tokens written (all images) per second
    kv_cache_bytes: int = 0
    guidance_scale: float = 1.0
    zipvl: dict | None = None   # ZipVL: tau, kv bits, kept ratio per layer, KV bytes against a dense cache
    decode_steps: int = 0       # denoising steps of a diffusion decoder after the tokens (SEED); 0: none
    candidates: int = 1         # images drawn per image returned (CLIP reranking); seconds cover them all
    judge_scores: list | None = None  # with candidates > 1: the judge's CLIP score of each image returned

    def to_dict(self) -> dict:
        return asdict(self)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Set logits outside the top-k, outside the top-p nucleus and (min-p sampling, Nguyen et al. 2024) those
    of ids less likely than ``min_p`` times the most likely id to -inf (b, v). Min-p cuts deep where the model
    is sure and little where it is not: on a text page's blank card one id holds nearly all the mass, and the
    long tail that top-k 5 leaves open (a stray id of ink, or of another card colour) is what draws the
    isolated specks that a page's layout checks read as text."""
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, opts: SamplingOptions, generator) -> torch.Tensor:
    """Sample one id per row by inverting the cumulative distribution with one uniform draw per row.

    logits (b, v) -> ids (b,), or (b, k, v) -> (b, k) (k tokens per row, e.g. a Token-Shuffle window).
    ``generator`` is one torch.Generator for the batch, or a list with one per row (then each row's draws
    depend only on its own generator: a batch gives what each prompt alone gives). One uniform per row is
    much cheaper than torch.multinomial, which draws a random number per vocabulary entry."""
    if logits.dim() == 3:
        b, k, v = logits.shape
        if isinstance(generator, (list, tuple)):
            u = torch.cat([torch.rand(1, k, generator=g) for g in generator])
        else:
            u = torch.rand(b, k, generator=generator)
        return _invert_cdf(logits.reshape(b * k, v), opts, u.reshape(b * k, 1)).view(b, k)
    if isinstance(generator, (list, tuple)):
        u = torch.cat([torch.rand(1, 1, generator=g) for g in generator])
    else:
        u = torch.rand(logits.shape[0], 1, generator=generator)
    return _invert_cdf(logits, opts, u)


def _invert_cdf(logits: torch.Tensor, opts: SamplingOptions, u: torch.Tensor) -> torch.Tensor:
    if opts.temperature != 1.0:
        logits = logits / opts.temperature
    probs = filter_logits(logits, opts.top_k, opts.top_p, opts.min_p).softmax(-1)
    cdf = probs.cumsum(-1)
    ids = torch.searchsorted(cdf, u.to(cdf.device) * cdf[:, -1:], right=True).clamp_max_(cdf.shape[1] - 1)
    # u can round up to the total: step back over trailing zero-probability ids
    last_possible = ((probs > 0) * torch.arange(cdf.shape[1], device=cdf.device)).argmax(-1, keepdim=True)
    return torch.where(torch.gather(probs, 1, ids) > 0, ids, last_possible).squeeze(1)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale, plausibility: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance on logits: uncond + scale * (cond - uncond).

    ``plausibility`` > 0: contrastive decoding's adaptive plausibility constraint (Li et al. 2023) on the
    guided logits: an id whose conditional probability is below ``plausibility`` times that of the
    conditional's most likely id is set to -inf. Guidance extrapolates: an id nearly impossible under both
    branches, but far less likely without the condition, can come out of it with real probability. Measured on
    checkpoints/text: an id of white card on a black page, below 0.001 of the best id's probability in either
    branch, came out of guidance (scale 1.4, temperature 0.7) at 0.15 of it and was drawn as a speck on the
    blank card (its model card has the measurements)."""
    out = uncond + scale * (cond - uncond)
    if plausibility > 0.0:  # p_i < alpha * p_max, read on the logits: no softmax in the sampling loop
        out = out.masked_fill(cond - cond.amax(-1, keepdim=True) < math.log(plausibility), float("-inf"))
    return out


@torch.inference_mode()
def sample_ar(model, prefix: torch.Tensor, null_prefix: torch.Tensor | None, start_ids: torch.Tensor,
              num_tokens: int, token_range: tuple[int, int], options: SamplingOptions | None = None,
              generator: torch.Generator | None = None, progress: bool = False,
              force_cfg: bool = False, choose=None, zipvl=None, context_ids: torch.Tensor | None = None,
              null_start_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, SamplingRecord]:
    """Write ``num_tokens`` ids in ``token_range`` after prefix (b, p, d) + start_ids (b, s).

    With guidance_scale != 1 (or ``force_cfg``) the batch is doubled with the null prefix and logits are
    guided. ``choose(logits (b, k, range), step) -> local ids (b, k)`` replaces the random draw (Distilled
    Decoding's flow map uses it). ``zipvl`` (``ZipVLOptions``) runs the prefill sparse and the cache in mixed
    precision. ``context_ids`` (b, c): the first c image tokens (unified ids, raster order) are given, the
    rest is written (continuing an image). ``null_start_ids``: the unconditional branch's start ids when they
    differ (an empty quoted-text slot); default ``start_ids``. Returns unified ids (b, num_tokens) and the record."""
    opts = (options or SamplingOptions()).validate()
    b = prefix.shape[0]
    if isinstance(generator, (list, tuple)) and len(generator) != b:
        raise ValueError(f"got {len(generator)} generators for a batch of {b}")
    cfg = force_cfg or opts.guidance_scale != 1.0
    if cfg and null_prefix is None:
        raise ValueError("guidance needs the unconditional prefix")
    t0 = time.perf_counter()
    if cfg:
        null_start = start_ids if null_start_ids is None else null_start_ids
        if null_start.shape != start_ids.shape:
            raise ValueError(f"null_start_ids {tuple(null_start.shape)} must match start_ids {tuple(start_ids.shape)}")
        prefix, start_ids = torch.cat([prefix, null_prefix]), torch.cat([start_ids, null_start])
    lo, hi = token_range
    k = getattr(model, "tokens_per_step", 1)
    if num_tokens % k:
        raise ValueError(f"{num_tokens} tokens do not split into steps of {k}")
    total = num_tokens // k
    given = 0 if context_ids is None else context_ids.shape[1]
    if context_ids is not None and (context_ids.shape[0] != b or given % k or given >= num_tokens):
        raise ValueError(f"context_ids must be (batch={b}, c) with c < {num_tokens} a multiple of {k}, "
                         f"got {tuple(context_ids.shape)}")
    steps = total - given // k
    cache = model.new_cache(prefix.shape[0], prefix.shape[1] + start_ids.shape[1] + total, zipvl=zipvl)
    ctx = None if context_ids is None else (torch.cat([context_ids, context_ids]) if cfg else context_ids)
    logits = model.prefill(prefix, start_ids, cache, image_ids=ctx)
    out = torch.empty(b, total, k, dtype=torch.long, device=prefix.device)
    if given:
        out[:, :given // k] = (model.shuffle.to_windows(context_ids, partial=True) if k > 1
                               else context_ids[..., None])
    for i in tqdm(range(steps), disable=not progress, desc="tokens", leave=False):
        step = logits[..., lo:hi].reshape(logits.shape[0], k, hi - lo)
        if cfg:
            scale = guidance_at(opts.guidance_scale, opts.cfg_schedule, total - steps + i, total)
            step = guided(step[:b], step[b:], scale, opts.plausibility)
        tok = (choose(step, i) if choose is not None else sample_next(step, opts, generator)) + lo  # (b, k)
        out[:, total - steps + i] = tok
        if i + 1 < steps:
            nxt = tok if k > 1 else tok[:, 0]
            logits = model.decode_step(torch.cat([nxt, nxt]) if cfg else nxt, cache)
    out = model.shuffle.to_raster(out) if k > 1 else out.view(b, num_tokens)
    seconds = time.perf_counter() - t0
    record = SamplingRecord("ar", b, num_tokens - given, steps, seconds,
                            b * (num_tokens - given) / max(seconds, 1e-9), cache.nbytes, opts.guidance_scale,
                            cache.stats() if hasattr(cache, "stats") else None)
    return out, record


@torch.inference_mode()
def sample_text(model, start_ids: torch.Tensor, max_bytes: int, options: SamplingOptions | None = None,
                generator: torch.Generator | None = None, greedy: bool = True) -> tuple[list[str], SamplingRecord]:
    """Write UTF-8 text as byte tokens after ``start_ids`` (b, s) (no prefix), until ``<eot>`` or ``max_bytes``.

    Only byte ids and ``<eot>`` can be drawn. ``greedy`` takes the most likely id (the captioning default);
    otherwise ``options`` (temperature, top-k, top-p) and ``generator`` sample. Returns the decoded strings
    (invalid UTF-8 replaced) and the record."""
    opts = (options or SamplingOptions()).validate()
    vocab = model.vocab
    lo, hi = vocab.range("byte")
    eot = vocab.special("<eot>")
    b = start_ids.shape[0]
    t0 = time.perf_counter()
    cache = model.new_cache(b, start_ids.shape[1] + max_bytes + 1)
    d = model.config.hidden_size
    logits = model.prefill(torch.zeros(b, 0, d, device=start_ids.device), start_ids, cache)
    allowed = torch.full((logits.shape[-1],), float("-inf"), device=logits.device)
    allowed[lo:hi] = 0.0
    allowed[eot] = 0.0
    out = torch.full((b, max_bytes), eot, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool)
    steps = 0
    for i in range(max_bytes):
        step_logits = logits + allowed
        tok = step_logits.argmax(-1) if greedy else sample_next(step_logits[:, None], opts, generator)[:, 0]
        tok = torch.where(done, torch.full_like(tok, eot), tok.cpu())
        out[:, i] = tok
        done |= tok == eot
        steps += 1
        if bool(done.all()):
            break
        logits = model.decode_step(tok, cache)
    texts = []
    for row in out.tolist():
        row = row[:row.index(eot)] if eot in row else row  # only byte ids come before <eot>
        texts.append(bytes(t - lo for t in row).decode("utf-8", errors="replace"))
    seconds = time.perf_counter() - t0
    written = int((out != eot).sum())
    record = SamplingRecord("ar-text", b, written // max(b, 1), steps, seconds, written / max(seconds, 1e-9), cache.nbytes,
                            1.0, None)
    return texts, record


def check_beams(beams) -> None:
    if not isinstance(beams, int) or not 1 <= beams <= 16:
        raise ValueError(f"beams must be an integer in [1, 16], got {beams!r}")


@torch.no_grad()
def beam_search_text(model, start_ids: torch.Tensor, max_bytes: int, beams: int = 4, n_best: bool = False
                     ) -> tuple[list, torch.Tensor, SamplingRecord]:
    """The most likely UTF-8 text after ``start_ids`` (b, s) by beam search over byte tokens: ``beams``
    hypotheses per row, ranked by the summed log-probability of their bytes and ``<eot>`` (a caption's
    probability, no length penalty). Greedy byte decoding commits to a first byte by the mass of every word
    that starts with it ("s" for "square" and "star" together), which can outweigh the single most likely
    word; the beam keeps the alternatives until the word is written. ``beams=1`` is greedy decoding exactly.
    Stops when every row's ``beams`` best hypotheses have ended (no open one can still overtake them: log
    probabilities only fall) or after ``max_bytes``. Returns (texts, their log-probabilities (b,), record);
    ``n_best=True``: every row's ``beams`` final hypotheses, best first, (list of b lists, log-probabilities
    (b, beams), record), for reranking."""
    check_beams(beams)
    vocab = model.vocab
    lo, hi = vocab.range("byte")
    eot = vocab.special("<eot>")
    b, k = start_ids.shape[0], beams
    t0 = time.perf_counter()
    rows = start_ids.repeat_interleave(k, 0)  # (b*k, s): row i*k+j is hypothesis j of input i
    cache = model.new_cache(b * k, start_ids.shape[1] + max_bytes + 1)
    logits = model.prefill(torch.zeros(b * k, 0, model.config.hidden_size, device=rows.device), rows, cache)
    v = logits.shape[-1]
    allowed = torch.full((v,), float("-inf"), device=logits.device)
    allowed[lo:hi] = 0.0
    allowed[eot] = 0.0
    ended_row = torch.full((v,), float("-inf"), device=logits.device)  # an ended hypothesis only repeats <eot>
    ended_row[eot] = 0.0
    scores = torch.full((b, k), float("-inf"), device=logits.device)
    scores[:, 0] = 0.0  # the k copies start as one hypothesis
    out = torch.full((b * k, max_bytes), eot, dtype=torch.long)
    done = torch.zeros(b * k, dtype=torch.bool, device=logits.device)
    base = (torch.arange(b, device=logits.device) * k)[:, None]
    steps = 0
    for i in range(max_bytes):
        logp = torch.log_softmax(logits.float() + allowed, -1)
        logp = torch.where(done[:, None], ended_row, logp)
        cand = (scores[:, :, None] + logp.view(b, k, v)).view(b, k * v)
        scores, idx = cand.topk(k, -1)
        src = (base + idx // v).view(-1)  # the hypothesis each new one extends
        tok = (idx % v).view(-1)
        out = out[src.cpu()]
        out[:, i] = tok.cpu()
        done = done[src] | (tok == eot)
        steps += 1
        if bool(done.all()):
            break
        n = cache.length
        cache.keys[:, :, :, :n] = cache.keys[:, src, :, :n]
        cache.values[:, :, :, :n] = cache.values[:, src, :, :n]
        logits = model.decode_step(tok, cache)
    best = scores.argmax(-1)

    def text(row: list[int]) -> str:
        row = row[:row.index(eot)] if eot in row else row
        return bytes(t - lo for t in row).decode("utf-8", errors="replace")

    texts = [text(row) for row in out[(base[:, 0] + best).cpu()].tolist()]
    seconds = time.perf_counter() - t0
    written = sum(len(t.encode("utf-8", errors="replace")) for t in texts)
    record = SamplingRecord(f"ar-text-beam{k}", b, written // max(b, 1), steps, seconds,
                            written / max(seconds, 1e-9), cache.nbytes, 1.0, None)
    if n_best:  # topk leaves each row's hypotheses sorted, best first
        rows = out.view(b, k, -1).tolist()
        return [[text(r) for r in hyps] for hyps in rows], scores, record
    return texts, scores.gather(1, best[:, None])[:, 0], record
