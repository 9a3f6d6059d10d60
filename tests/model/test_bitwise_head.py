"""The bitwise image head (``image_head: bitwise``): its closed-form loss is the cross-entropy of its own logits,
its image softmax factorises into independent bits, and it trains, saves, loads and samples like the full head."""
import pytest
import torch
import torch.nn.functional as F
import yaml

from mmgen.model.transformer import MMGenTransformer
from mmgen.model.vocab import Vocabulary
from mmgen.sampling.ar import SamplingOptions, sample_ar
from tests.conftest import make_debug_model


def _model(bits: int = 6, shuffle: int = 1, grid=(8, 8), head: str = "bitwise", seed: int = 0) -> MMGenTransformer:
    base = make_debug_model(2 ** bits, seed)
    cfg = type(base.config)(**{**base.config.__dict__, "image_head": head, "image_bits": bits if head == "bitwise" else 0,
                               "shuffle_window": shuffle, "shuffle_grid": grid})
    torch.manual_seed(seed)
    model = MMGenTransformer(cfg).eval()
    with torch.no_grad():
        model.modality_embed.weight.normal_(0, 0.1)
        if model.shuffle is not None:  # fresh residual blocks are the identity; make them matter
            for p in model.shuffle.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        if head == "bitwise":  # a fresh bit head is near zero: every id nearly equally likely
            model.bit_head.weight.normal_(0, 0.5)
            model.bit_head.bias.normal_(0, 0.5)
    return model


def _prefix(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return model.prefix(torch.randn(b, 10, 384, generator=g), torch.ones(b, 10, dtype=torch.bool))


@pytest.mark.parametrize("head", ["bitwise", "full"])
def test_loss_is_the_cross_entropy_of_the_logits(head):
    model = _model(head=head)
    g = torch.Generator().manual_seed(1)
    states = torch.randn(3, 40, model.config.hidden_size, generator=g)
    lo, hi = model.vocab.range("image")
    target = torch.randint(lo, hi, (3, 40), generator=g)
    target[0, :5] = torch.tensor([0, 3, 17, 100, model.vocab.size - 1])  # specials, bytes, the last image id
    target[1, :7] = -100
    want = F.cross_entropy(model.logits(states).reshape(-1, model.vocab.size), target.reshape(-1))
    got = model.loss(states, target)
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    # gradients too: the loss is the same function of the weights
    model.zero_grad()
    model.loss(states, target).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    F.cross_entropy(model.logits(states).reshape(-1, model.vocab.size), target.reshape(-1)).backward()
    assert all(torch.allclose(a, p.grad, atol=1e-5) for a, p in zip(grads, [p for p in model.parameters()
                                                                        if p.grad is not None]))


@pytest.mark.parametrize("shuffle", [1, 2])
def test_forward_with_a_target_returns_the_loss_of_its_logits(shuffle):
    model = _model(shuffle=shuffle)
    prefix = _prefix(model)
    lo, hi = model.vocab.range("image")
    image = torch.randint(lo, hi, (2, 64), generator=torch.Generator().manual_seed(2))
    boi = torch.full((2, 1), model.vocab.special("<boi>"))
    with torch.no_grad():
        logits = model(prefix, boi, image_ids=image)
        assert logits.shape == (2, 64, model.vocab.size)
        want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), image.reshape(-1))
        assert torch.allclose(model(prefix, boi, image_ids=image, target=image), want, atol=1e-5)


def test_the_image_softmax_factorises_into_bits():
    model = _model(bits=5)
    states = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    lo, hi = model.vocab.range("image")
    with torch.no_grad():
        p_image = model.logits(states)[:, lo:hi].softmax(-1)           # (4, 32), renormalised over the range
        p_bit = torch.sigmoid(model.bit_head(states))                   # (4, 5): p(bit j = 1)
    ids = torch.arange(hi - lo)
    bits = (ids[:, None] >> torch.arange(5)) & 1                        # least significant bit first
    product = torch.where(bits[None].bool(), p_bit[:, None], 1 - p_bit[:, None]).prod(-1)
    assert torch.allclose(p_image, product, atol=1e-6)


def test_a_bitwise_head_needs_a_power_of_two_range_and_a_binary_tokenizer():
    base = make_debug_model(48)
    with pytest.raises(ValueError, match="2\\^image_bits"):
        MMGenTransformer(type(base.config)(**{**base.config.__dict__, "image_head": "bitwise", "image_bits": 6}))
    with pytest.raises(ValueError, match="image_head must be"):
        MMGenTransformer(type(base.config)(**{**base.config.__dict__, "image_head": "bits"}))
    from mmgen.train.ar import build_model
    from tests.conftest import make_debug_tokenizer

    with pytest.raises(ValueError, match="needs a binary tokenizer"):
        build_model({"architecture": {"size": "debug", "image_head": "bitwise"}}, make_debug_tokenizer())


def test_bitwise_model_saves_loads_and_samples(tmp_path):
    model = _model(shuffle=2)
    model.save_pretrained(tmp_path / "m")
    again = MMGenTransformer.from_pretrained(tmp_path / "m")
    states = torch.randn(2, model.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(model.logits(states), again.logits(states))
    prefix = _prefix(model)
    boi = torch.full((2, 1), model.vocab.special("<boi>"))
    opts = SamplingOptions(guidance_scale=2.0, temperature=1.0, top_k=4)
    lo, hi = again.vocab.range("image")
    a, _ = sample_ar(again, prefix, again.prefix(None, None, batch=2), boi, 64, (lo, hi), opts,
                     generator=torch.Generator().manual_seed(0))
    b, _ = sample_ar(again, prefix, again.prefix(None, None, batch=2), boi, 64, (lo, hi), opts,
                     generator=torch.Generator().manual_seed(0))
    assert a.shape == (2, 64) and torch.equal(a, b)
    assert int(a.min()) >= lo and int(a.max()) < hi


def test_a_bitwise_run_trains_over_a_binary_tokenizer(tmp_path):
    """A debug binary text tokenizer and a Token-Shuffle model with the bitwise head: the run trains on the text
    world, its loss falls on a repeated batch, and the saved pipeline draws."""
    from mmgen.pipelines.text_to_image import TextToImagePipeline
    from mmgen.tokenizers.binary_text import BINARY_TEXT_CONFIGS, BinaryTextTokenizer
    from mmgen.train.ar import build_model, train_ar

    torch.manual_seed(0)
    tok = BinaryTextTokenizer(BINARY_TEXT_CONFIGS["debug"]).eval()
    tok.save_pretrained(tmp_path / "tok")
    arch = {"size": "debug", "image_head": "bitwise", "shuffle_window": 2, "text_bytes": 256}
    recipe = tmp_path / "ar.yaml"
    recipe.write_text(yaml.safe_dump({"architecture": arch,
                                      "training": {"world": "text", "steps": 2, "batch_size": 2, "warmup": 1}}))
    out = train_ar(str(recipe), str(tmp_path / "tok"), str(tmp_path / "ar"), progress=False)
    pipe = TextToImagePipeline.from_pretrained(out)
    assert pipe.model.config.image_head == "bitwise" and pipe.model.config.image_bits == 6
    img = pipe('a white card with the text "Hi" in large blue serif letters, center aligned',
               generator=torch.Generator().manual_seed(0))
    assert img.images[0].size == (64, 64)
    # the closed-form loss trains: a few steps on one batch lower it
    model = build_model({"architecture": arch}, tok).train()
    lo, hi = model.vocab.range("image")
    image = torch.randint(lo, hi, (2, 64), generator=torch.Generator().manual_seed(4))
    boi = torch.full((2, 1), model.vocab.special("<boi>"))
    prefix_states = torch.randn(2, 10, 384)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        prefix = model.prefix(prefix_states, torch.ones(2, 10, dtype=torch.bool))
        loss = model(prefix, boi, image_ids=image, target=image)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
