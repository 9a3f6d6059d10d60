import pytest
import torch

from mmgen.model.token_shuffle import TokenShuffle
from mmgen.model.transformer import MMGenTransformer
from mmgen.sampling.ar import SamplingOptions, guidance_at, sample_ar
from tests.conftest import make_debug_model


def _shuffled_model(s: int, grid=(8, 8), seed: int = 0) -> MMGenTransformer:
    base = make_debug_model(64, seed)
    cfg = type(base.config)(**{**base.config.__dict__, "shuffle_window": s, "shuffle_grid": grid})
    torch.manual_seed(seed)
    model = MMGenTransformer(cfg).eval()
    with torch.no_grad():
        model.modality_embed.weight.normal_(0, 0.1)
        for p in model.shuffle.parameters():  # fresh residual blocks are the identity; make them matter
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(model, b=2, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefix = model.prefix(torch.randn(b, 10, 384, generator=g), torch.ones(b, 10, dtype=torch.bool))
    lo, hi = model.vocab.range("image")
    boi = torch.full((b, 1), model.vocab.special("<boi>"))
    return prefix, boi, torch.randint(lo, hi, (b, n), generator=g)


def test_window_order_round_trip_and_content():
    ts = TokenShuffle(32, 2, (4, 6))
    raster = torch.arange(24).view(1, 24)
    w = ts.to_windows(raster)
    assert w.shape == (1, 6, 4)
    assert w[0, 0].tolist() == [0, 1, 6, 7] and w[0, 1].tolist() == [2, 3, 8, 9] and w[0, 3].tolist() == [12, 13, 18, 19]
    assert torch.equal(ts.to_raster(w), raster)
    feats = torch.randn(2, 24, 5)
    assert torch.equal(ts.to_raster(ts.to_windows(feats)), feats)
    with pytest.raises(ValueError):
        TokenShuffle(32, 4, (4, 6))  # grid not divisible by the window
    with pytest.raises(ValueError):
        TokenShuffle(30, 2, (4, 4))  # hidden size not divisible by s^2


@torch.no_grad()
def test_window_one_is_the_plain_model():
    plain = make_debug_model(64)
    cfg = type(plain.config)(**{**plain.config.__dict__, "shuffle_window": 1, "shuffle_grid": (8, 8)})
    torch.manual_seed(0)
    one = MMGenTransformer(cfg).eval()
    assert one.shuffle is None and one.tokens_per_step == 1
    assert one.state_dict().keys() == plain.state_dict().keys()
    one.load_state_dict(plain.state_dict())
    prefix, boi, ids = _inputs(plain)
    ref = plain(prefix, torch.cat([boi, ids[:, :-1]], 1))
    assert torch.equal(one.image_logits(prefix, boi, ids), ref)


@torch.no_grad()
@pytest.mark.parametrize("s", [2, 4])
def test_cached_window_decode_equals_teacher_forced(s):
    model = _shuffled_model(s)
    prefix, boi, ids = _inputs(model)
    ref = model.image_logits(prefix, boi, ids)                       # (b, 64, vocab), raster order
    ref_w = model.shuffle.to_windows(ref)                              # (b, windows, s*s, vocab)
    windows = model.shuffle.to_windows(ids)
    cache = model.new_cache(2, prefix.shape[1] + 1 + windows.shape[1])
    logits = model.prefill(prefix, boi, cache)
    for j in range(windows.shape[1]):
        assert logits.shape == (2, s * s, model.vocab.size)
        assert torch.allclose(logits, ref_w[:, j], atol=1e-5)
        if j + 1 < windows.shape[1]:
            logits = model.decode_step(windows[:, j], cache)


@torch.no_grad()
def test_windows_are_causal():
    model = _shuffled_model(2)
    prefix, boi, ids = _inputs(model)
    ref = model.shuffle.to_windows(model.image_logits(prefix, boi, ids))
    changed = model.shuffle.to_windows(ids).clone()
    lo, hi = model.vocab.range("image")
    changed[:, 5] = lo + (changed[:, 5] - lo + 7) % (hi - lo)         # rewrite window 5
    out = model.shuffle.to_windows(model.image_logits(prefix, boi, model.shuffle.to_raster(changed)))
    assert torch.allclose(out[:, :6], ref[:, :6], atol=1e-6)            # windows 0..5 never see window 5's tokens
    assert not torch.allclose(out[:, 6:], ref[:, 6:], atol=1e-4)


def test_sampler_writes_a_window_per_pass_and_save_load(tmp_path):
    model = _shuffled_model(2)
    prefix, boi, _ = _inputs(model)
    null = model.prefix(None, None, batch=2)
    opts = SamplingOptions(guidance_scale=2.0, cfg_schedule="linear")
    run = lambda m, seed: sample_ar(m, prefix, null, boi, 64, m.vocab.range("image"), opts,
                                    [torch.Generator().manual_seed(seed + i) for i in range(2)])
    a, rec = run(model, 0)
    assert a.shape == (2, 64) and rec.forward_passes == 16 and rec.tokens == 64
    lo, hi = model.vocab.range("image")
    assert a.min() >= lo and a.max() < hi
    assert torch.equal(a, run(model, 0)[0]) and not torch.equal(a, run(model, 9)[0])
    one, _ = sample_ar(model, prefix[1:], null[1:], boi[1:], 64, (lo, hi), opts, [torch.Generator().manual_seed(1)])
    assert torch.equal(one, a[1:])                                     # a batch gives what each prompt gives alone
    model.save_pretrained(tmp_path / "m")
    loaded = MMGenTransformer.from_pretrained(tmp_path / "m")
    assert loaded.config.shuffle_grid == (8, 8) and loaded.tokens_per_step == 4
    assert torch.equal(run(loaded, 0)[0], a)


def test_linear_cfg_schedule():
    assert guidance_at(3.0, "constant", 0, 10) == 3.0
    ramp = [guidance_at(3.0, "linear", i, 10) for i in range(10)]
    assert ramp == sorted(ramp) and ramp[-1] == 3.0 and 1.0 < ramp[0] < 1.5
    assert all(guidance_at(1.0, "linear", i, 10) == 1.0 for i in range(10))
    with pytest.raises(ValueError):
        SamplingOptions(cfg_schedule="cosine").validate()
