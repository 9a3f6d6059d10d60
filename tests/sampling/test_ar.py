import pytest
import torch

from mmgen.sampling.ar import SamplingOptions, filter_logits, guided, sample_ar, sample_next
from tests.conftest import make_debug_model


def _setup(b=2):
    model = make_debug_model(64)
    g = torch.Generator().manual_seed(1)
    states, mask = torch.randn(b, 12, 384, generator=g), torch.ones(b, 12, dtype=torch.bool)
    prefix = model.prefix(states, mask)
    null = model.prefix(None, None, batch=b)
    boi = torch.full((b, 1), model.vocab.special("<boi>"))
    return model, prefix, null, boi


def _run(model, prefix, null, boi, seed, **kw):
    opts = SamplingOptions(**{"guidance_scale": 3.0, **{k: v for k, v in kw.items() if k != "force_cfg"}})
    gen = [torch.Generator().manual_seed(seed + i) for i in range(prefix.shape[0])]
    return sample_ar(model, prefix, null, boi, 20, model.vocab.range("image"), opts, gen,
                     force_cfg=kw.get("force_cfg", False))


def test_same_seed_same_ids_and_ids_in_range():
    model, prefix, null, boi = _setup()
    a, rec = _run(model, prefix, null, boi, 0)
    b, _ = _run(model, prefix, null, boi, 0)
    c, _ = _run(model, prefix, null, boi, 100)
    assert torch.equal(a, b) and not torch.equal(a, c)
    lo, hi = model.vocab.range("image")
    assert a.min() >= lo and a.max() < hi
    assert rec.forward_passes == 20 and rec.tokens == 20 and rec.batch == 2 and rec.kv_cache_bytes > 0


def test_guidance_one_equals_conditional_only():
    model, prefix, null, boi = _setup()
    cond_only, _ = _run(model, prefix, null, boi, 5, guidance_scale=1.0)
    doubled, _ = _run(model, prefix, null, boi, 5, guidance_scale=1.0, force_cfg=True)
    assert torch.equal(cond_only, doubled)


def test_batch_equals_single_with_per_image_generators():
    model, prefix, null, boi = _setup(b=3)
    batch, _ = _run(model, prefix, null, boi, 7)
    single, _ = _run(model, prefix[1:2], null[1:2], boi[1:2], 8)  # row 1 of the batch was seeded 7 + 1
    assert torch.equal(batch[1:2], single)


def test_top_k_one_is_greedy():
    model, prefix, null, boi = _setup(b=1)
    ids, _ = _run(model, prefix, null, boi, 0, guidance_scale=1.0, top_k=1)
    lo, hi = model.vocab.range("image")
    ref = model(prefix, torch.cat([boi, ids[:, :-1]], 1))[:, :, lo:hi].argmax(-1) + lo
    assert torch.equal(ids, ref)


def test_filters_and_guidance_math():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    c, u = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.equal(guided(c, u, 1.0), c) and torch.equal(guided(c, u, 0.0), u)


def test_min_p_cuts_the_tail_where_the_model_is_sure_and_not_where_it_is_not():
    sure = torch.log(torch.tensor([[0.94, 0.03, 0.02, 0.01]]))
    unsure = torch.log(torch.tensor([[0.3, 0.28, 0.25, 0.17]]))
    assert (~torch.isinf(filter_logits(sure, 0, 1.0, 0.1))).tolist() == [[True, False, False, False]]
    assert not torch.isinf(filter_logits(unsure, 0, 1.0, 0.1)).any()
    assert (~torch.isinf(filter_logits(unsure, 0, 1.0, 0.6))).tolist() == [[True, True, True, False]]
    assert torch.equal(filter_logits(sure, 0, 1.0, 0.0), sure)  # 0 is off
    # the kept ids (here those at least 0.4 x 0.5 likely) are drawn in their own proportions
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    ids = sample_next(torch.log(probs).expand(20000, -1), SamplingOptions(min_p=0.4), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert freq[2:].sum() == 0 and torch.allclose(freq[:2], torch.tensor([0.625, 0.375]), atol=0.015)
    assert SamplingOptions.from_dict({"min_p": 0.1}).min_p == 0.1


def test_plausibility_keeps_guidance_from_raising_what_the_prompt_rules_out():
    # id 2 is nearly impossible with the prompt and far more so without it: guidance extrapolates it upwards
    cond = torch.log(torch.tensor([[0.899999, 0.1, 1e-6]]))
    uncond = torch.log(torch.tensor([[0.9, 0.1, 1e-16]]))
    plain = guided(cond, uncond, 3.0).softmax(-1)
    assert plain[0, 2] > 0.5 * plain[0, 0]
    kept = guided(cond, uncond, 3.0, plausibility=0.01)
    assert torch.isinf(kept[0, 2]) and torch.equal(kept[0, :2], guided(cond, uncond, 3.0)[0, :2])
    assert torch.equal(guided(cond, uncond, 3.0, plausibility=0.0), guided(cond, uncond, 3.0))


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(top_p=0.0), dict(top_k=-1), dict(guidance_scale=-1),
                                 dict(min_p=1.0), dict(min_p=-0.1), dict(plausibility=1.0)])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingOptions(**bad).validate()


def test_sampling_frequencies_match_the_distribution():
    from mmgen.sampling.ar import sample_next

    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    logits = torch.log(probs).expand(20000, -1)
    ids = sample_next(logits, SamplingOptions(), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / ids.numel()
    assert torch.allclose(freq, probs, atol=0.015)  # about 4 standard errors
    assert freq[3] == 0  # a zero-probability id is never drawn
