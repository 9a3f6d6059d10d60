"""ZipVL: sparse prefill and the mixed-precision KV cache, checked against the dense model."""
import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from mmgen.model.zipvl import (ATTENTION_NAME, ZipVLOptions, _pack, _unpack, important_mask,
                               probe_positions, quantize_keys, quantize_values, received_mass,
                               sparse_causal_attention)
from mmgen.sampling.ar import SamplingOptions, sample_ar
from tests.conftest import make_debug_model
from tests.model.test_token_shuffle import _inputs, _shuffled_model


def _model_and_inputs(b=2, n=80, seed=0):
    model = make_debug_model(64, seed)
    prefix, boi, ids = _inputs(model, b, n, seed)
    return model, prefix, torch.cat([boi, ids], 1)


def test_attention_and_mask_are_registered_together():
    assert ATTENTION_NAME in AttentionInterface._global_mapping
    assert ATTENTION_NAME in AttentionMaskInterface._global_mapping


def test_tau_one_is_the_dense_model():
    model, prefix, ids = _model_and_inputs()
    dense = model.new_cache(2, 200)
    ref = model.prefill(prefix, ids, dense)
    # tau = 1 keeps every token: the prefill logits are the dense ones whatever the KV bits
    z = model.new_cache(2, 200, zipvl=ZipVLOptions(tau=1.0))
    assert torch.allclose(model.prefill(prefix, ids, z), ref, atol=1e-5)
    assert z.stats()["kept_ratio_per_layer"] == [1.0] * model.config.num_layers
    # and with full-precision KV the whole decode matches, step after step
    z = model.new_cache(2, 200, zipvl=ZipVLOptions(tau=1.0, high_bits=16, low_bits=16))
    model.prefill(prefix, ids, z)
    lo, hi = model.vocab.range("image")
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        tok = torch.randint(lo, hi, (2,), generator=g)
        assert torch.allclose(model.decode_step(tok, z), model.decode_step(tok, dense), atol=1e-5)


def test_kept_ratio_never_falls_as_tau_rises():
    torch.manual_seed(0)
    scores = torch.rand(3, 200) ** 4
    sizes = [important_mask(scores, t).sum(-1) for t in (0.5, 0.9, 0.95, 0.975, 0.999, 1.0)]
    for a, b in zip(sizes, sizes[1:]):
        assert (a <= b).all()
    assert (sizes[-1] == 200).all()
    # the set reaches tau and is the smallest that does: dropping its least-scored member falls short
    keep = important_mask(scores, 0.9)
    share = scores / scores.sum(-1, keepdim=True)
    assert ((share * keep).sum(-1) >= 0.9 - 1e-6).all()
    weakest = torch.where(keep, share, torch.inf).min(-1).values
    assert ((share * keep).sum(-1) - weakest < 0.9).all()
    # end to end: per layer, the same probes, more tau -> no fewer tokens
    model, prefix, ids = _model_and_inputs()
    ratios = []
    for tau in (0.8, 0.9, 0.975, 1.0):
        z = model.new_cache(2, 200, zipvl=ZipVLOptions(tau=tau))
        model.prefill(prefix, ids, z)
        ratios.append(z.stats()["kept_ratio_per_layer"])
    for a, b in zip(ratios, ratios[1:]):
        assert all(x <= y for x, y in zip(a, b))


def test_sparse_attention_is_causal_among_kept_tokens():
    g = torch.Generator().manual_seed(0)
    b, h, kvh, n, hd = 2, 4, 2, 40, 8
    q, k, v = (torch.randn(b, x, n, hd, generator=g) for x in (h, kvh, kvh))
    keep = torch.rand(b, n, generator=g) < 0.6
    keep[:, -1] = True
    out = sparse_causal_attention(q, k, v, keep, hd ** -0.5, chunk=16)  # chunks of 16: three, the last short
    # reference: every query attends to the kept keys at or before it (none visible: zeros)
    kk, vv = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
    causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
    mask = causal[None] & keep[:, None, :]                                  # (b, n, n)
    scores = (q @ kk.transpose(-1, -2)) * hd ** -0.5
    ref = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1).nan_to_num() @ vv
    assert torch.allclose(out, ref, atol=1e-5)
    # changing what comes later never changes an earlier output
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 30:] += 5.0
    v2[:, :, 30:] -= 3.0
    out2 = sparse_causal_attention(q, k2, v2, keep, hd ** -0.5, chunk=16)
    assert torch.allclose(out[:, :, :30], out2[:, :, :30], atol=1e-6)
    assert not torch.allclose(out[:, :, 30:], out2[:, :, 30:])


def test_received_mass_counts_only_visible_probes():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 50, 8, generator=g), torch.randn(1, 2, 50, 8, generator=g)
    probes = probe_positions(50, 0.05, torch.Generator().manual_seed(0))
    assert probes.tolist() == sorted(set(probes.tolist())) and probes[-1] == 49 and len(probes) == 6
    mass = received_mass(q, k, probes, 8 ** -0.5)
    assert mass.shape == (1, 50) and (mass >= 0).all()
    assert torch.allclose(received_mass(q, k, probes, 8 ** -0.5, chunk=2), mass, atol=1e-6)  # chunking changes nothing
    # a probe's probabilities sum to one over the keys it sees: the unnormalised total is probes x heads
    counts = (torch.arange(50)[None] <= probes[:, None]).sum(0)
    assert torch.isclose((mass * counts * 2).sum(), torch.tensor(float(len(probes) * 2)), atol=1e-4)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantisation_error_within_the_bit_width_bound(bits):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 37, 16, generator=g) * torch.linspace(0.1, 4, 16)  # uneven channels
    codes = torch.randint(0, 2 ** bits, (5, 16), generator=g)
    assert torch.equal(_unpack(_pack(codes, bits), bits, 16).long(), codes)
    qk = quantize_keys(x, bits)
    bound = (x.amax(-2, keepdim=True) - x.amin(-2, keepdim=True)) / (2 * (2 ** bits - 1))
    assert ((qk.dequantize() - x).abs() <= bound + 1e-5).all()
    assert qk.codes.dtype == torch.uint8 and qk.codes.shape[-1] == 16 * bits // 8
    qv = quantize_values(x, bits)
    y = x / qv.channel
    bound = (y.amax(-1, keepdim=True) - y.amin(-1, keepdim=True)) / (2 * (2 ** bits - 1)) * qv.channel
    assert ((qv.dequantize() - x).abs() <= bound + 1e-5).all()


def test_cache_compresses_to_under_half_and_recompresses_the_recent_buffer():
    model, prefix, ids = _model_and_inputs(n=200)
    z = model.new_cache(2, 400, zipvl=ZipVLOptions(tau=0.95, recent=16))
    model.prefill(prefix, ids, z)
    lo, hi = model.vocab.range("image")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        model.decode_step(torch.randint(lo, hi, (2,), generator=g), z)
    layer = z.layers[0]
    assert layer.buf_k.shape[2] == 4  # 16 compressed after 16 steps, 4 since
    assert z.get_seq_length() == prefix.shape[1] + ids.shape[1] + 20
    s = z.stats()
    assert s["kv_bytes"] < 0.5 * s["dense_kv_bytes"]
    with pytest.raises(ValueError, match="one prefill"):
        model.prefill(prefix, ids, z)


def test_bad_options_are_refused():
    for bad in (dict(tau=0.0), dict(tau=1.5), dict(high_bits=3), dict(high_bits=2, low_bits=4), dict(recent=0)):
        with pytest.raises(ValueError, match="ZipVL"):
            ZipVLOptions(**bad).validate()
    for text in ("4-2", "4/3", "x/y", ""):
        with pytest.raises(ValueError, match="ZipVL"):
            ZipVLOptions.parse_bits(text)
    assert ZipVLOptions.parse_bits("8/2") == (8, 2)


@pytest.mark.parametrize("window", [1, 2])
def test_sampling_with_zipvl_and_an_image_to_continue(window):
    model = make_debug_model(64) if window == 1 else _shuffled_model(2)
    prefix, boi, ids = _inputs(model, 2, 64)
    null = model.prefix(None, None, batch=2)
    opts = SamplingOptions(guidance_scale=2.0, temperature=1.0)
    rng = model.vocab.range("image")
    context = ids[:, :32]  # the top half of an 8x8 grid
    out, rec = sample_ar(model, prefix, null, boi, 64, rng, opts, torch.Generator().manual_seed(0),
                         zipvl=ZipVLOptions(tau=0.9), context_ids=context)
    assert torch.equal(out[:, :32], context) and out.shape == (2, 64)
    assert ((out >= rng[0]) & (out < rng[1])).all()
    assert rec.tokens == 32 and rec.forward_passes == 32 // window ** 2
    assert rec.zipvl["tau"] == 0.9 and len(rec.zipvl["kept_ratio_per_layer"]) == model.config.num_layers
    # tau = 1 with full-precision KV writes exactly what the dense sampler writes
    dense, _ = sample_ar(model, prefix, null, boi, 64, rng, opts, torch.Generator().manual_seed(0), context_ids=context)
    same, _ = sample_ar(model, prefix, null, boi, 64, rng, opts, torch.Generator().manual_seed(0),
                        zipvl=ZipVLOptions(tau=1.0, high_bits=16, low_bits=16), context_ids=context)
    assert torch.equal(dense, same)
    with pytest.raises(ValueError, match="context_ids"):
        sample_ar(model, prefix, null, boi, 64, rng, opts, None, context_ids=ids if window == 1 else ids[:, :6])


def test_pipeline_switches(debug_pipeline):
    g = torch.Generator().manual_seed(0)
    out = debug_pipeline("a red circle", num_images=2, generator=g, zipvl_tau=0.9, kv_bits="4/2")
    assert out.record["zipvl"]["kv_bits"] == "4/2" and len(out.images) == 2
    img = debug_pipeline("a red circle", generator=torch.Generator().manual_seed(1)).images[0]
    out = debug_pipeline(["a red circle", "a blue star"], image=img, keep_rows=2, generator=g)
    assert out.record["tokens"] == debug_pipeline.tokenizer.layout.num_tokens - 2 * debug_pipeline.tokenizer.layout.grid[1]
    with pytest.raises(ValueError, match="keep_rows"):
        debug_pipeline("a red circle", image=img, keep_rows=0)
    with pytest.raises(ValueError, match="ZipVL"):
        debug_pipeline("a red circle", kv_bits="5/1")
