import json

import pytest
import torch

from mmgen.tokenizers.base import CheckpointError, TokenLayout
from mmgen.tokenizers.quantizers import VectorQuantizer
from mmgen.tokenizers.vq_image import VQImageTokenizer
from tests.conftest import make_debug_tokenizer


def test_encode_decode_shapes_and_layout():
    tok = make_debug_tokenizer()
    x = torch.rand(3, 3, 16, 16)
    ids = tok.encode(x)
    assert tok.layout == TokenLayout("grid2d", (4, 4))
    assert ids.shape == (3, 16) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < tok.vocab_size
    out = tok.decode(ids)
    assert out.shape == (3, 3, 16, 16) and 0 <= out.min() and out.max() <= 1


def test_save_load_round_trip_same_output(tmp_path):
    tok = make_debug_tokenizer()
    x = torch.rand(2, 3, 16, 16)
    tok.save_pretrained(tmp_path / "tok")
    loaded = VQImageTokenizer.from_pretrained(tmp_path / "tok")
    assert torch.equal(tok.encode(x), loaded.encode(x))
    assert torch.allclose(tok.decode(tok.encode(x)), loaded.decode(loaded.encode(x)))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        VQImageTokenizer.from_pretrained(tmp_path / "missing")
    tok = make_debug_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        VQImageTokenizer.from_pretrained(tmp_path / "tok")
    tok.save_pretrained(tmp_path / "tok2")
    cfg = json.loads((tmp_path / "tok2" / "config.json").read_text())
    cfg["codebook_size"] = 32
    (tmp_path / "tok2" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        VQImageTokenizer.from_pretrained(tmp_path / "tok2")


def test_wrong_image_size_and_ids_are_refused():
    tok = make_debug_tokenizer()
    with pytest.raises(ValueError, match="16x16"):
        tok.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="ids per image"):
        tok.decode(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="code ids"):
        tok.decode(torch.full((1, 16), tok.vocab_size, dtype=torch.long))


def test_quantizer_picks_nearest_code_and_restarts_dead_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4).train()
    z = q.codebook()[torch.tensor([3, 5, 3, 7])].t().reshape(1, 4, 2, 2) * 2.5  # scale: cosine lookup
    out = q(z)
    assert out.ids.flatten().tolist() == [3, 5, 3, 7]
    assert torch.allclose(out.quantized, z / 2.5, atol=1e-6)
    moved = q.restart_dead_codes(torch.randn(1, 4, 8, 8))
    assert moved == 13  # every code but 3, 5 and 7
    assert q.restart_dead_codes(torch.randn(1, 4, 8, 8)) == 16  # nothing was picked since the last call


def test_straight_through_gradient_reaches_encoder():
    tok = make_debug_tokenizer().train()
    recon, q, z = tok(torch.rand(2, 3, 16, 16))
    (recon.mean() + q.loss).backward()
    assert tok.encoder.net[0].weight.grad is not None and tok.encoder.net[0].weight.grad.abs().sum() > 0


def test_images_to_tensor_reads_every_form_at_one_scale():
    import numpy as np
    from PIL import Image

    from mmgen.tokenizers.vq_image import images_to_tensor

    arr = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    want = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    forms = [arr, [Image.fromarray(a) for a in arr], torch.from_numpy(arr).permute(0, 3, 1, 2), want]
    for form in forms:
        assert torch.allclose(images_to_tensor(form, size=8), want)
    for bad, says in ((arr.astype(np.float32), "uint8"), (want * 255, r"\[0, 1\]"), (want.long(), "uint8 or float"),
                      (arr[..., :2], "RGB")):
        with pytest.raises(ValueError, match=says):
            images_to_tensor(bad)
    with pytest.raises(ValueError, match="must be 16x16"):
        images_to_tensor(arr, size=16)


def test_patch_codec_starts_linear_and_round_trips(tmp_path):
    from dataclasses import replace

    from mmgen.tokenizers.vq_image import VQ_IMAGE_CONFIGS, PatchDecoder, PatchEncoder, VQImageConfig

    torch.manual_seed(0)
    cfg = replace(VQ_IMAGE_CONFIGS["debug"], arch="patch", image_size=32)
    enc, dec = PatchEncoder(cfg), PatchDecoder(VQImageConfig(**{**cfg.__dict__, "code_dim": cfg.code_dim}))
    x, y, zero = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32), torch.zeros(2, 3, 32, 32)
    with torch.no_grad():
        # residual blocks and the seam refinement start at zero: both halves are affine maps at initialisation
        assert torch.allclose(enc(x + y) - enc(y), enc(x) - enc(zero), atol=1e-5)
        u, v = torch.randn(2, cfg.code_dim, 8, 8), torch.randn(2, cfg.code_dim, 8, 8)
        z0 = torch.zeros(2, cfg.code_dim, 8, 8)
        assert torch.allclose(dec(u + v) - dec(v), dec(u) - dec(z0), atol=1e-5)
        assert enc(x).shape == (2, cfg.code_dim, 8, 8) and dec(u).shape == (2, 3, 32, 32)
    tok = VQImageTokenizer(cfg).eval()
    img = torch.rand(2, 3, 32, 32)
    ids = tok.encode(img)
    assert ids.shape == (2, 64) and tok.decode(ids).shape == (2, 3, 32, 32)
    tok.save_pretrained(tmp_path / "p")
    assert torch.equal(VQImageTokenizer.from_pretrained(tmp_path / "p").encode(img), ids)
    with pytest.raises(ValueError, match="arch must be one of"):
        VQImageTokenizer(replace(cfg, arch="unet"))


def test_a_vq_tokenizer_on_a_larger_canvas_keeps_every_weight():
    tok = make_debug_tokenizer()
    s = tok.config.image_size
    big = tok.at_image_size(2 * s)
    h, w = tok.layout.grid
    assert big.layout.grid == (2 * h, 2 * w)
    assert all(torch.equal(big.state_dict()[k], v) for k, v in tok.state_dict().items())
    assert big.encode(torch.rand(1, 3, 2 * s, 2 * s)).shape == (1, 4 * h * w)
