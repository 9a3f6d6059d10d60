"""Binary (lookup-free) text tokenizer at debug size: ids are bit patterns, round trips, gradients, training."""
import json

import pytest
import torch
import yaml

from mmgen.pipelines.text_to_image import load_tokenizer
from mmgen.tokenizers.base import CheckpointError
from mmgen.tokenizers.binary_text import BINARY_TEXT_CONFIGS, BinaryTextTokenizer
from mmgen.tokenizers.quantizers import BinaryQuantizer


def _tok(seed=0):
    torch.manual_seed(seed)
    return BinaryTextTokenizer(BINARY_TEXT_CONFIGS["debug"]).eval()


def test_ids_are_the_sign_bits_read_as_integers():
    q = BinaryQuantizer(bits=4)
    z = torch.tensor([0.5, -1.0, 2.0, -0.1]).view(1, 4, 1, 1)   # bits 1, 0, 1, 0 -> 1 + 4 = 5
    out = q(z)
    assert out.ids.item() == 5
    assert torch.equal(out.quantized, torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1))
    assert torch.equal(q.embed(out.ids), out.quantized)
    book = q.codebook()
    assert book.shape == (16, 4) and torch.equal(q(book.T.reshape(1, 4, 16, 1)).ids.flatten(), torch.arange(16))
    with pytest.raises(ValueError):
        q.embed(torch.tensor([[[16]]]))


def test_encode_decode_layout_and_round_trip(tmp_path):
    tok = _tok()
    x = torch.rand(2, 3, 64, 64)
    ids = tok.encode(x)
    assert ids.shape == (2, 64) and tok.layout.grid == (8, 8) and tok.vocab_size == 64
    assert ids.min() >= 0 and ids.max() < 64
    assert tok.decode(ids).shape == (2, 3, 64, 64)
    # decoding the ids is decoding the quantised latents
    recon, q, _ = tok(x)
    assert torch.allclose(tok.decode(ids), recon.clamp(0, 1), atol=1e-5)
    tok.save_pretrained(tmp_path / "t")
    again = load_tokenizer(tmp_path / "t")
    assert isinstance(again, BinaryTextTokenizer) and torch.equal(again.encode(x), ids)
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    cfg["bits"] = 7
    (tmp_path / "t" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "t")
    with pytest.raises(ValueError, match="64x64"):
        tok.encode(torch.rand(1, 3, 32, 32))


def test_straight_through_gradient_and_entropy_terms():
    tok = _tok().train()
    x = torch.rand(2, 3, 64, 64)
    recon, q, z = tok(x)
    ((recon - x) ** 2).mean().add(q.loss).backward()
    assert tok.encoder.net[0].weight.grad.abs().sum() > 0 and tok.to_bits.weight.grad.abs().sum() > 0
    # the batch-entropy term rewards using both signs of a bit; the per-sample term rewards decided latents
    q = BinaryQuantizer(bits=2, commit_weight=0.0, entropy_weight=1.0)
    even = torch.tensor([[3.0, 3.0], [-3.0, -3.0]]).view(2, 2, 1, 1)
    same = torch.tensor([[3.0, 3.0], [3.0, 3.0]]).view(2, 2, 1, 1)
    undecided = torch.zeros(2, 2, 1, 1)
    assert q(even).loss < q(same).loss and q(even).loss < q(undecided).loss


def test_batch_entropy_sees_bits_that_copy_one_another():
    import math

    torch.manual_seed(0)
    one = torch.sigmoid(4 * torch.randn(2000, 1, 1, 1) * 5)
    copies, independent = one.repeat(1, 6, 1, 1), torch.sigmoid(4 * torch.randn(2000, 6, 1, 1) * 5)
    grouped, per_bit = BinaryQuantizer(bits=6, group_bits=6).eval(), BinaryQuantizer(bits=6, group_bits=1).eval()
    # six copies of one balanced bit: two codes in use, and only the grouped entropy says so
    assert grouped.batch_entropy(copies) < 2.5 * math.log(2) < 5.5 * math.log(2) < per_bit.batch_entropy(copies)
    assert grouped.batch_entropy(independent) > 5.5 * math.log(2)
    # groups of 4 + 2 bits while training (random split), exact within each
    assert BinaryQuantizer(bits=6, group_bits=4).train().batch_entropy(independent) > 5.5 * math.log(2)


def test_trains_on_the_text_world_and_resumes(tmp_path):
    from mmgen.train.tokenizer import train_tokenizer

    recipe = tmp_path / "bt.yaml"
    recipe.write_text(yaml.safe_dump({"type": "binary_text", "architecture": {"size": "debug"},
                                      "data": {"world": "text"},
                                      "training": {"steps": 3, "batch_size": 2, "save_every": 3, "warmup": 1,
                                                   "log_every": 1, "crop": 32}}))
    out = train_tokenizer(str(recipe), str(tmp_path / "bt"), progress=False)
    assert isinstance(load_tokenizer(out), BinaryTextTokenizer)
    train_tokenizer(str(recipe), str(tmp_path / "bt"), steps=4, resume=True, progress=False)
    assert json.loads((tmp_path / "bt" / "train_state" / "state.json").read_text())["step"] == 4
    rows = [json.loads(l) for l in (tmp_path / "bt" / "metrics.jsonl").read_text().splitlines()]
    assert all("psnr" in r and "perplexity" in r for r in rows)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"type": "hexagons", "training": {"steps": 1}}))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        train_tokenizer(str(bad), str(tmp_path / "bad"), progress=False)


def test_a_crop_gets_the_positions_it_has_in_the_full_grid():
    tok = _tok()
    x = torch.rand(1, 3, 64, 64)
    # the 4x4 token window at (2, 3): pos rows of the full 8x8 grid, in row-major order
    pos = tok.positions(4, 4, torch.tensor([[2, 3]]))
    want = torch.stack([tok.pos[r * 8 + c] for r in range(2, 6) for c in range(3, 7)])
    assert torch.equal(pos[0], want)
    assert torch.equal(tok.positions(8, 8), tok.pos[None])
    # the encoder is convolutional: a crop's latents come from its pixels and the full grid's positions
    crop = x[..., 16:48, 24:56]
    recon, _, z = tok(crop, offset=torch.tensor([[2, 3]]))
    assert recon.shape == crop.shape and z.shape[-2:] == (4, 4)
    with pytest.raises(ValueError, match="needs crop offsets"):
        tok.latents(crop)
    with pytest.raises(ValueError, match="outside"):
        tok.latents(crop, torch.tensor([[5, 0]]))


@pytest.mark.parametrize("window,h,w", [(1, 4, 5), (2, 6, 6), (0, 3, 4), (4, 3, 3), (2, 11, 13), (4, 16, 16)])
def test_neighbourhood_projector_equals_a_dense_masked_transformer(window, h, w):
    from torch import nn

    from mmgen.tokenizers.projector import LocalProjector, window_mask

    torch.manual_seed(0)
    local = LocalProjector(16, 4, 2, 32).eval()
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
    dense = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    dense.load_state_dict(local.state_dict())  # the same parameter names: weights move either way
    x = torch.randn(3, h * w, 16, requires_grad=True)
    mask = window_mask(h, w, window) if window else None
    ours, theirs = local(x, h, w, window), dense(x, mask=mask)
    assert torch.allclose(ours, theirs, atol=1e-5)
    # and the gradients, to the input and to every weight (padded tile rows must not leak into them)
    grads = [torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(),
                                 [x, *net.parameters()]) for out, net in ((ours, local), (theirs, dense))]
    assert all(torch.allclose(a, b, atol=1e-4) and torch.isfinite(a).all() for a, b in zip(*grads))
    x = x.detach()
    # a token's output ignores a token outside its window
    far = x.clone()
    far[:, -1] += 5.0 * torch.randn(16)  # the last row and column (not a constant: LayerNorm would remove it)
    with torch.no_grad():
        same = local(far, h, w, window)[:, 0], local(x, h, w, window)[:, 0]
    assert torch.allclose(*same, atol=1e-6) == (0 < window < max(h, w) - 1)


def test_encoding_in_chunks_changes_nothing():
    tok = _tok()
    x = torch.rand(5, 3, 64, 64)
    assert torch.equal(tok.encode(x, chunk=2), tok.encode(x, chunk=5))


def test_content_crops_prefer_ink_and_sit_on_the_token_grid():
    from mmgen.train.tokenizer import content_crops

    x = torch.ones(3, 3, 64, 64)
    x[:, :, 40:56, 8:24] = 0.0  # one dark square: the only edges
    crops, corners = content_crops(x, 16, 8, torch.Generator().manual_seed(0), candidates=64)
    assert crops.shape == (3, 3, 16, 16) and corners.shape == (3, 2)
    for crop, (r, c) in zip(crops, corners.tolist()):
        assert torch.equal(crop, x[0, :, r * 8:r * 8 + 16, c * 8:c * 8 + 16])
        assert crop.min() == 0.0  # with 64 candidates, a window with the square's edges wins
    with pytest.raises(ValueError, match="multiple of the downsample"):
        content_crops(x, 12, 8, torch.Generator())
    with pytest.raises(ValueError, match="between"):
        content_crops(x, 128, 8, torch.Generator())


def test_channel_norm_is_per_pixel_so_a_crop_decodes_as_in_the_full_image():
    from dataclasses import replace

    torch.manual_seed(0)
    tok = BinaryTextTokenizer(replace(BINARY_TEXT_CONFIGS["debug"], norm="channel", projector_window=0)).eval()
    assert any(type(m).__name__ == "ChannelNorm" for m in tok.decoder.modules())
    ids = torch.randint(0, tok.vocab_size, (1, 8, 8))
    full = tok.decode(ids)
    # a pixel far from the crop's border depends only on nearby ids, whatever the rest of the grid holds
    # (GroupNorm would mix in statistics of the whole map)
    other = ids.clone()
    other[:, :, 4:] = torch.randint(0, tok.vocab_size, (1, 8, 4))
    assert torch.allclose(tok.decode(other)[..., :8, :8], full[..., :8, :8], atol=1e-6)
    with pytest.raises(ValueError, match="norm must be"):
        BinaryTextTokenizer(replace(BINARY_TEXT_CONFIGS["debug"], norm="batch"))


def test_training_can_start_from_a_trained_tokenizer(tmp_path):
    from mmgen.train.tokenizer import build_tokenizer, init_from, train_tokenizer

    arch = {"size": "debug"}
    recipe = tmp_path / "bt.yaml"
    recipe.write_text(yaml.safe_dump({"type": "binary_text", "architecture": arch, "data": {"world": "text"},
                                      "training": {"steps": 2, "batch_size": 2, "warmup": 1, "crop": 32}}))
    first = train_tokenizer(str(recipe), str(tmp_path / "a"), progress=False)
    fresh = build_tokenizer(yaml.safe_load(recipe.read_text()))
    init_from(fresh, str(first))
    trained = load_tokenizer(first).state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in fresh.state_dict().items())
    again = train_tokenizer(str(recipe), str(tmp_path / "b"), steps=1, init=str(first), progress=False)
    assert json.loads((tmp_path / "b" / "train_state" / "state.json").read_text())["step"] == 1
    # one step on from the trained weights: far nearer to them than to the recipe's fresh initialisation
    moved = load_tokenizer(again).state_dict()
    scratch = build_tokenizer(yaml.safe_load(recipe.read_text())).state_dict()
    gap = {name: sum((m[k] - ref[k]).norm() for k in trained if "pos" not in k)
           for name, m, ref in (("trained", moved, trained), ("fresh", moved, scratch))}
    assert gap["trained"] < 0.2 * gap["fresh"]
    with pytest.raises(ValueError, match="give one of them"):
        train_tokenizer(str(recipe), str(tmp_path / "a"), init=str(first), resume=True, progress=False)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"type": "binary_text", "architecture": {**arch, "bits": 5},
                                     "data": {"world": "text"}, "training": {"steps": 1, "batch_size": 2}}))
    with pytest.raises(ValueError, match="bits 6 vs 5"):
        train_tokenizer(str(other), str(tmp_path / "c"), init=str(first), progress=False)


def test_decoder_only_training_keeps_every_id(tmp_path):
    from mmgen.data.shapes_data import text_world_batches
    from mmgen.train.tokenizer import train_tokenizer

    recipe = {"type": "binary_text", "architecture": {"size": "debug"}, "data": {"world": "text"},
              "training": {"steps": 2, "batch_size": 2, "warmup": 1, "crop": 32}}
    (tmp_path / "bt.yaml").write_text(yaml.safe_dump(recipe))
    first = train_tokenizer(str(tmp_path / "bt.yaml"), str(tmp_path / "a"), progress=False)
    recipe["training"].update(train_only="decoder", steps=3, crop=0, lr=0.01)  # whole pages
    (tmp_path / "dec.yaml").write_text(yaml.safe_dump(recipe))
    tuned = train_tokenizer(str(tmp_path / "dec.yaml"), str(tmp_path / "b"), init=str(first), progress=False)
    before, after = load_tokenizer(first), load_tokenizer(tuned)
    a, b = before.state_dict(), after.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    pages, _ = next(text_world_batches(3, seed=11, size=before.config.image_size))
    assert torch.equal(before.encode(pages), after.encode(pages))  # the AR model's ids are the same
    with pytest.raises(ValueError, match="--init"):
        train_tokenizer(str(tmp_path / "dec.yaml"), str(tmp_path / "c"), progress=False)
    recipe["training"]["train_only"] = "encoder"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="train_only must be"):
        train_tokenizer(str(tmp_path / "bad.yaml"), str(tmp_path / "d"), init=str(first), progress=False)


def test_a_tokenizer_on_a_larger_canvas_keeps_its_codec_and_maps_positions_to_the_same_page_place():
    tok = _tok()  # 64x64 pages, 8x8 grid
    g = 8
    with torch.no_grad():  # a position field that is the token's x coordinate on the page, in [0, 1]
        tok.pos.zero_()
        tok.pos[:, 0] = ((torch.arange(g * g) % g).float() + 0.5) / g
    big = tok.at_image_size(128)
    assert big.config.image_size == 128 and big.layout.grid == (16, 16) and big.pos.shape == (256, tok.pos.shape[1])
    want = ((torch.arange(256) % 16).float() + 0.5) / 16
    inner = (torch.arange(256) % 16 >= 1) & (torch.arange(256) % 16 < 15)  # bilinear is exact on a ramp inside
    assert torch.allclose(big.pos[inner, 0], want[inner], atol=1e-5)
    for name, value in tok.state_dict().items():
        if name != "pos":
            assert torch.equal(big.state_dict()[name], value), name
    ids = big.encode(torch.rand(2, 3, 128, 128))
    assert ids.shape == (2, 256) and big.decode(ids).shape == (2, 3, 128, 128)
    assert tok.at_image_size(64) is tok
    with pytest.raises(ValueError, match="multiple"):
        tok.at_image_size(100)


def test_gradient_loss_sees_faint_texture_that_l2_barely_does(tmp_path):
    from mmgen.train.tokenizer import gradient_loss, reconstruction_loss, train_tokenizer

    card = torch.full((1, 3, 32, 32), 0.9)
    assert gradient_loss(card, card).item() == 0.0
    shifted = card + 0.1  # a flat card one shade off: no texture, so no gradient difference
    assert gradient_loss(shifted, card).item() == pytest.approx(0.0, abs=1e-6)
    checker = (torch.arange(32)[:, None] // 4 + torch.arange(32)[None, :] // 4) % 2  # 4x4 cells
    textured = card + 0.02 * checker.float()  # 5 levels of block texture
    g = gradient_loss(textured, card).item()
    l2 = reconstruction_loss(textured, card, edge_weight=0.0, l1_weight=0.0).item()
    assert g == pytest.approx(0.02 * (8 - 1) / 31, rel=1e-4)  # 7 cell seams of 31 differences per row, each 0.02
    assert g > 10 * l2
    recipe = tmp_path / "g.yaml"
    recipe.write_text(yaml.safe_dump({"type": "binary_text", "architecture": {"size": "debug"},
                                      "data": {"world": "text"},
                                      "training": {"steps": 2, "batch_size": 2, "warmup": 1, "log_every": 1,
                                                   "crop": 32, "gradient_weight": 0.5}}))
    train_tokenizer(str(recipe), str(tmp_path / "g"), progress=False)
    rows = [json.loads(l) for l in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["grad"] > 0 for r in rows)
    recipe.write_text(recipe.read_text().replace("gradient_weight: 0.5", "gradient_weight: -1"))
    with pytest.raises(ValueError, match="gradient_weight"):
        train_tokenizer(str(recipe), str(tmp_path / "bad"), progress=False)


def test_page_context_lets_a_patch_see_the_whole_page():
    from mmgen.tokenizers.vq_image import PatchDecoder, VQImageConfig

    cfg = dict(image_size=128, downsample=8, channels=8, latent_channels=16, res_blocks=1, code_dim=6, arch="patch")
    torch.manual_seed(0)
    z = torch.randn(2, 6, 16, 16)
    far = z.clone()
    far[:, :, 0, 0] = -far[:, :, 0, 0]  # one token in the top-left corner
    for context in (0, 8):
        torch.manual_seed(1)
        dec = PatchDecoder(VQImageConfig(**cfg, decoder_context=context)).eval()
        if context:
            plain = PatchDecoder(VQImageConfig(**cfg)).eval()
            plain.load_state_dict({k: v for k, v in dec.state_dict().items() if not k.startswith("context.")})
            assert torch.equal(dec(z), plain(z))  # the modulation starts at zero: the decoder it extends
            torch.nn.init.normal_(dec.context.film[-1].weight, std=0.1)
        with torch.no_grad():
            moved = (dec(z) - dec(far))[..., -32:, -32:].abs().max()  # the bottom-right patches, 8+ tokens away
        assert (moved > 1e-4) == bool(context)
    with pytest.raises(ValueError, match="arch 'patch'"):
        VQImageConfig(decoder_context=8)
    with pytest.raises(ValueError, match="arch 'patch'"):
        VQImageConfig(decoder_padding="replicate")
    with pytest.raises(ValueError, match="'zeros' or 'replicate'"):
        VQImageConfig(arch="patch", decoder_padding="reflect")
    with pytest.raises(ValueError, match="decoder_context"):
        VQImageConfig(arch="patch", decoder_context=-1)


def test_a_decoder_trained_alone_may_gain_a_page_context_and_keeps_every_id(tmp_path):
    from mmgen.data.shapes_data import text_world_batches
    from mmgen.train.tokenizer import build_tokenizer, init_from, train_tokenizer

    recipe = {"type": "binary_text", "architecture": {"size": "debug", "arch": "patch"}, "data": {"world": "text"},
              "training": {"steps": 2, "batch_size": 2, "warmup": 1, "crop": 0}}
    (tmp_path / "bt.yaml").write_text(yaml.safe_dump(recipe))
    first = train_tokenizer(str(tmp_path / "bt.yaml"), str(tmp_path / "a"), progress=False)
    recipe["architecture"]["decoder_context"] = 8
    recipe["training"].update(train_only="decoder", steps=3, lr=0.01)
    (tmp_path / "ctx.yaml").write_text(yaml.safe_dump(recipe))
    before = load_tokenizer(first)
    pages, _ = next(text_world_batches(3, seed=11, size=before.config.image_size))
    gained = build_tokenizer(recipe)
    init_from(gained, str(first))
    ids = before.encode(pages)
    assert torch.equal(gained.encode(pages), ids) and torch.equal(gained.decode(ids), before.decode(ids))
    # as the shipped stage 4d: the padding changes too (the same weights), and it is kept through save and load
    recipe["architecture"]["decoder_padding"] = "replicate"
    (tmp_path / "ctx.yaml").write_text(yaml.safe_dump(recipe))
    tuned = load_tokenizer(train_tokenizer(str(tmp_path / "ctx.yaml"), str(tmp_path / "b"), init=str(first),
                                           progress=False))
    assert tuned.config.decoder_context == 8 and torch.equal(tuned.encode(pages), ids)
    assert tuned.decoder.context.film[-1].weight.abs().sum() > 0  # it trained
    pads = {m.padding_mode for t in (tuned, tuned.at_image_size(128)) for m in t.decoder.modules()
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)}
    assert pads == {"replicate"}
    # a summary of a crop is not a summary of the page
    recipe["training"]["crop"] = 32
    (tmp_path / "crop.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="whole pages"):
        train_tokenizer(str(tmp_path / "crop.yaml"), str(tmp_path / "c"), init=str(first), progress=False)
    assert not (tmp_path / "c").exists()
    recipe["training"]["crop"] = 0
    # the other way would drop a trained part: refused, as is any other difference
    recipe["architecture"]["decoder_context"] = 0
    with pytest.raises(ValueError, match="decoder_context 8 vs 0"):
        init_from(build_tokenizer(recipe), str(tmp_path / "b" / "tokenizer"))


@pytest.mark.parametrize("padding", ["zeros", "replicate"])
def test_replicate_padding_decodes_a_flat_page_flat_to_its_corners(padding):
    from mmgen.tokenizers.vq_image import PatchDecoder, VQImageConfig

    torch.manual_seed(0)
    dec = PatchDecoder(VQImageConfig(image_size=64, downsample=8, channels=8, latent_channels=16, res_blocks=1,
                                     code_dim=6, arch="patch", decoder_padding=padding)).eval()
    torch.nn.init.normal_(dec.refine[-1].weight, std=0.1)  # a trained refinement, not the identity it starts as
    with torch.no_grad():
        # every token the same code: at the token resolution every patch comes out the same, corners included
        x = dec.net(torch.randn(1, 6, 1, 1).sign().expand(1, 6, 8, 8))
        patches = x.unfold(2, 8, 8).unfold(3, 8, 8).reshape(1, 3, 64, 8, 8)
        spread = (patches - patches[:, :, 27:28]).abs().amax()  # against a patch in the middle
        # a flat colour stays flat through the full-resolution refinement, to the corner pixels
        flat = torch.full((1, 3, 64, 64), 0.3)
        refined = flat + dec.refine(flat)
        corner = (refined - refined[:, :, 32:33, 32:33]).abs().amax()
    assert (spread < 1e-5) == (corner < 1e-5) == (padding == "replicate")
