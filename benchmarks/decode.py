"""Decode speed: the mmgen sampler (``sample_ar``: preallocated KV cache, ``prefill``/``decode_step``) against
transformers' ``generate()`` on the very same weights, at batch 1 and batch 16, tokens/s side by side.

What is measured
    One image-token generation run per call: prefill of the conditioning prefix (the null prefix,
    ``model.prefix(None, None, batch=b)``) plus ``<boi>``, then N new tokens, all sampled inside the image
    range with plain sampling (temperature 1, no top-k, no top-p, guidance 1.0 so mmgen does no CFG batch
    doubling). tokens/s = batch * N / seconds of the whole call (prefill included), timed with
    ``time.perf_counter``; each path is warmed up once first, then the median of the repeats is reported
    (3 repeats in full mode, 2 with --quick).

    The HF side is a ``transformers.LlamaForCausalLM`` whose ``.model`` *is* ``model.llama`` and whose
    ``.lm_head`` *is* ``model.lm_head`` (shared modules, no copies). It gets the same prefix as
    ``inputs_embeds`` and a logits processor that masks ids outside ``model.vocab.range("image")`` (mmgen
    samples only inside that range, so both draw from the same distribution). HF's ``generate`` embeds the
    tokens it writes with ``embed_tokens`` alone, without mmgen's modality embedding; that embedding is
    zero-initialised, so for the default random model both paths compute the same function (asserted). For a
    trained ``--checkpoint`` the modality embedding is generally non-zero: the HF path then omits it, the
    comparison is of speed only, and ``greedy_match`` is not expected to hold (``hf_omits_modality_embed``
    says so in the JSON).

    Correctness is checked once: greedy decoding (top_k=1 for mmgen, do_sample=False for HF) at batch 1
    over 32 tokens must give the same ids on both paths (``greedy_match``).

Model
    Default: ARConfig(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=704)
    with a ~16k vocabulary (Vocabulary.build({"image": 16384 - 272})), random init from a fixed seed.
    ``--checkpoint DIR`` benchmarks ``TextToImagePipeline.from_pretrained(DIR).model`` instead.

Run
    .venv/bin/python benchmarks/decode.py --quick              # 128 tokens, 2 repeats (make bench)
    .venv/bin/python benchmarks/decode.py                      # 256 tokens, 3 repeats, median
    .venv/bin/python benchmarks/decode.py --quick --threads 1  # pin torch to one CPU thread
    .venv/bin/python benchmarks/decode.py --checkpoint checkpoints/shapes --tokens 256

Output: a small table, then exactly one JSON line (the last line) with tokens_per_s_mmgen_b1,
tokens_per_s_hf_b1, tokens_per_s_mmgen_b16, tokens_per_s_hf_b16, speedup_b1, speedup_b16, greedy_match and
model size information.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import transformers  # noqa: E402
from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList  # noqa: E402

from mmgen.model.transformer import ARConfig, MMGenTransformer  # noqa: E402
from mmgen.model.vocab import Vocabulary  # noqa: E402
from mmgen.sampling.ar import SamplingOptions, sample_ar  # noqa: E402

BATCHES = (1, 16)
GREEDY_TOKENS = 32
SEED = 0


class RangeMask(LogitsProcessor):
    """Keep logits of ids in [lo, hi), -inf elsewhere: what mmgen's sampler does by slicing the logits."""

    def __init__(self, lo: int, hi: int):
        self.lo, self.hi = lo, hi

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        out[:, self.lo:self.hi] = scores[:, self.lo:self.hi]
        return out


def build_model(checkpoint: str | None) -> MMGenTransformer:
    if checkpoint:
        from mmgen.pipelines.text_to_image import TextToImagePipeline

        return TextToImagePipeline.from_pretrained(checkpoint).model.eval()
    torch.manual_seed(SEED)
    vocab = Vocabulary.build({"image": 16384 - 272})
    cfg = ARConfig(hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4, intermediate_size=704,
                   vocab=vocab.to_dict())
    return MMGenTransformer(cfg).eval()


def hf_wrapper(model: MMGenTransformer) -> LlamaForCausalLM:
    """A LlamaForCausalLM sharing model.llama and model.lm_head (built on the meta device, then swapped in, so
    no throwaway weights are allocated)."""
    with torch.device("meta"):
        hf = LlamaForCausalLM(model.llama_config)
    hf.model = model.llama
    hf.lm_head = model.lm_head
    hf.eval()
    own = {id(p) for p in model.parameters()}
    assert all(id(p) in own for p in hf.parameters()), "the HF wrapper must share mmgen's parameters"
    assert hf.model is model.llama and hf.lm_head is model.lm_head
    return hf


def inputs(model: MMGenTransformer, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prefix (b, p, d), boi ids (b, 1), HF inputs_embeds (b, p + 1, d)) -- the same conditioning for both."""
    with torch.no_grad():
        prefix = model.prefix(None, None, batch=b).contiguous()
        boi = torch.full((b, 1), model.vocab.special("<boi>"), dtype=torch.long)
        embeds = torch.cat([prefix, model.embed(boi)], dim=1)
    return prefix, boi, embeds


def run_mmgen(model, prefix, boi, n, token_range, top_k=0, seed=SEED) -> torch.Tensor:
    opts = SamplingOptions(guidance_scale=1.0, temperature=1.0, top_k=top_k, top_p=1.0)
    ids, _ = sample_ar(model, prefix, None, boi, n, token_range, opts, torch.Generator().manual_seed(seed))
    return ids


def run_hf(hf, embeds, n, token_range, pad_id, do_sample=True, seed=SEED) -> torch.Tensor:
    torch.manual_seed(seed)
    b, p, _ = embeds.shape
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if do_sample else dict(do_sample=False)
    out = hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(b, p, dtype=torch.long),
                      max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=pad_id,
                      logits_processor=LogitsProcessorList([RangeMask(*token_range)]), **kw)
    assert out.shape == (b, n) or out.shape[1] >= n, f"unexpected generate output {tuple(out.shape)}"
    return out[:, -n:]


def timed(fn, repeats: int) -> tuple[float, list[float]]:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="128 new tokens and 2 repeats (default: 256 and 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's own)")
    ap.add_argument("--checkpoint", default=None, help="benchmark TextToImagePipeline.from_pretrained(DIR).model")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per row (default 128 quick / 256 full)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    n = args.tokens if args.tokens is not None else (128 if args.quick else 256)
    if n < 1:
        ap.error("--tokens must be >= 1")
    repeats = 2 if args.quick else 3
    warnings.filterwarnings("ignore", module="transformers")
    transformers.logging.set_verbosity_error()

    model = build_model(args.checkpoint)
    if model.tokens_per_step > 1:
        ap.error("this checkpoint uses Token-Shuffle (several tokens per position); transformers' generate() "
                 "cannot run it, so there is nothing to compare against")
    for p in model.parameters():
        p.requires_grad_(False)
    hf = hf_wrapper(model)
    token_range = model.vocab.range("image")
    pad_id = model.vocab.special("<pad>")
    need = model.config.max_cond_tokens + 1 + max(n, GREEDY_TOKENS)
    if need > model.config.max_positions:
        ap.error(f"{need} positions exceed the model's max_positions={model.config.max_positions}")
    image_row = 1 + list(model.vocab.ranges).index("image")
    modality_zero = bool(model.modality_embed.weight[image_row].eq(0).all())
    if not args.checkpoint:
        assert modality_zero, "a fresh model's modality embedding must be zero for the HF path to match it"
    elif not modality_zero:
        print("note: the checkpoint's image modality embedding is non-zero; HF generate() omits it, so this "
              "compares speed only (greedy_match is not expected to hold)", file=sys.stderr)

    # correctness: greedy at batch 1 must give the same ids on both paths
    prefix, boi, embeds = inputs(model, 1)
    g_mm = run_mmgen(model, prefix, boi, GREEDY_TOKENS, token_range, top_k=1)
    g_hf = run_hf(hf, embeds, GREEDY_TOKENS, token_range, pad_id, do_sample=False)
    greedy_match = bool(torch.equal(g_mm, g_hf))
    diff = (g_mm != g_hf).nonzero()
    first_mismatch = int(diff[0, 1]) if len(diff) else None

    figures, detail = {}, {}
    for b in BATCHES:
        prefix, boi, embeds = inputs(model, b)
        ids = run_mmgen(model, prefix, boi, n, token_range)
        assert ids.shape == (b, n) and bool(((ids >= token_range[0]) & (ids < token_range[1])).all())
        ids = run_hf(hf, embeds, n, token_range, pad_id)
        assert ids.shape == (b, n) and bool(((ids >= token_range[0]) & (ids < token_range[1])).all())
        for name, fn in (("mmgen", lambda: run_mmgen(model, prefix, boi, n, token_range)),
                         ("hf", lambda: run_hf(hf, embeds, n, token_range, pad_id))):
            med, times = timed(fn, repeats)
            figures[f"tokens_per_s_{name}_b{b}"] = round(b * n / med, 1)
            detail[f"seconds_{name}_b{b}"] = [round(t, 4) for t in times]
            detail[f"ms_per_step_{name}_b{b}"] = round(1000 * med / n, 3)
    speedup = {f"speedup_b{b}": round(figures[f"tokens_per_s_mmgen_b{b}"] / figures[f"tokens_per_s_hf_b{b}"], 2)
               for b in BATCHES}

    print(f"decode benchmark: {n} new tokens, prefix {model.config.max_cond_tokens}+1, "
          f"{'quick' if args.quick else 'full'} ({repeats} repeats, median), torch threads {torch.get_num_threads()}")
    print(f"model: hidden {model.config.hidden_size}, {model.config.num_layers} layers, vocab {model.vocab.size}, "
          f"{model.num_parameters() / 1e6:.2f}M params ({model.num_parameters(True) / 1e6:.2f}M non-embedding)")
    print(f"{'batch':>5} | {'mmgen tok/s':>12} | {'HF generate tok/s':>17} | {'speedup':>7} | "
          f"{'mmgen ms/step':>13} | {'HF ms/step':>10}")
    for b in BATCHES:
        print(f"{b:>5} | {figures[f'tokens_per_s_mmgen_b{b}']:>12.1f} | {figures[f'tokens_per_s_hf_b{b}']:>17.1f} | "
              f"{speedup[f'speedup_b{b}']:>6.2f}x | {detail[f'ms_per_step_mmgen_b{b}']:>13.3f} | "
              f"{detail[f'ms_per_step_hf_b{b}']:>10.3f}")
    print(f"greedy check (batch 1, {GREEDY_TOKENS} tokens): {'ids match' if greedy_match else 'MISMATCH'}"
          + ("" if greedy_match else f" (first at token {first_mismatch})"))

    result = {
        **figures, **speedup, "greedy_match": greedy_match, "greedy_first_mismatch": first_mismatch,
        "greedy_tokens": GREEDY_TOKENS, "new_tokens": n, "batches": list(BATCHES), "repeats": repeats,
        "quick": args.quick, "threads": torch.get_num_threads(),
        "model": {"source": args.checkpoint or f"random init (seed {SEED})",
                  "hidden_size": model.config.hidden_size, "num_layers": model.config.num_layers,
                  "num_heads": model.config.num_heads, "num_kv_heads": model.config.num_kv_heads,
                  "intermediate_size": model.config.intermediate_size, "vocab_size": model.vocab.size,
                  "prefix_tokens": model.config.max_cond_tokens,
                  "params": model.num_parameters(), "params_non_embedding": model.num_parameters(True)},
        "hf_omits_modality_embed": not modality_zero, **detail,
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
