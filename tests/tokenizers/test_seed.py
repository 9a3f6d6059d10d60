"""SEED stack on debug sizes: the open_clip CLIP, the causal Q-Former tokenizer, the diffusion decoder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from mmgen.data.shapes_data import world_batches
from mmgen.tokenizers.base import CheckpointError
from mmgen.tokenizers.clip_shapes import CLIP_CONFIGS, ShapesCLIP
from mmgen.tokenizers.seed import SEED_CONFIGS, SEEDConfig, SEEDTokenizer
from mmgen.tokenizers.vq_image import VQ_IMAGE_CONFIGS, VQImageConfig, VQImageTokenizer

ROOT = Path(__file__).resolve().parents[2]


def debug_vae() -> VQImageTokenizer:
    return VQImageTokenizer(VQImageConfig(**{**VQ_IMAGE_CONFIGS["debug"].__dict__, "image_size": 64}))


def debug_seed(with_decoder: bool = True, seed: int = 0) -> SEEDTokenizer:
    torch.manual_seed(seed)
    clip = ShapesCLIP(CLIP_CONFIGS["debug"])
    vae = debug_vae()
    cfg = SEEDConfig(**{**SEED_CONFIGS["debug"].__dict__})
    return SEEDTokenizer(cfg, clip, vae, with_decoder=with_decoder).eval()


@pytest.fixture(scope="module")
def batch():
    return next(world_batches(6, seed=3))


def test_clip_round_trip_and_learns(tmp_path, batch):
    torch.manual_seed(0)
    clip = ShapesCLIP(CLIP_CONFIGS["debug"])
    x, captions = batch
    opt = torch.optim.AdamW(clip.parameters(), lr=3e-3)
    first = None
    for _ in range(25):  # the same batch: contrastive loss must fall as the towers learn to pair them
        loss, _ = clip(x, captions)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first * 0.7
    clip.eval().save_pretrained(tmp_path / "clip")
    again = ShapesCLIP.from_pretrained(tmp_path / "clip")
    torch.testing.assert_close(again.clip_score(x, captions), clip.clip_score(x, captions))
    with pytest.raises(ValueError, match="non-empty"):
        clip.encode_text(["", "a red circle"])
    with pytest.raises(ValueError, match="64x64"):
        clip.encode_image(torch.rand(1, 3, 32, 32))


def test_seed_ids_layout_and_causality(batch):
    tok = debug_seed(with_decoder=False)
    x, _ = batch
    ids = tok.encode(x)
    n = tok.config.num_queries
    assert ids.shape == (len(x), n) and ids.dtype == torch.long
    assert tok.layout.kind == "causal1d" and tok.layout.num_tokens == n
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
    # causal Q-Former: query i never sees queries after it, so changing query j leaves embeddings < j alone
    with torch.no_grad():
        before = tok.causal_embeddings(x)
        tok.qformer.queries[5:] += torch.randn_like(tok.qformer.queries[5:])
        after = tok.causal_embeddings(x)
    torch.testing.assert_close(after[:, :5], before[:, :5])
    assert (after[:, 5:] - before[:, 5:]).abs().max() > 1e-3


def test_seed_causal_mask_is_load_bearing(batch):
    """The test above would fail with the mask dropped: check that it does."""
    tok = debug_seed(with_decoder=False)
    tok.qformer.causal.zero_()  # False everywhere: every query sees every other
    x, _ = batch
    with torch.no_grad():
        before = tok.causal_embeddings(x)
        tok.qformer.queries[5:] += torch.randn_like(tok.qformer.queries[5:])
        after = tok.causal_embeddings(x)
    assert (after[:, :5] - before[:, :5]).abs().max() > 1e-4


def test_seed_decode_seeded_and_save_load(tmp_path, batch):
    tok = debug_seed()
    x, _ = batch
    ids = tok.encode(x[:2])
    a = tok.decode(ids, torch.Generator().manual_seed(1))
    b = tok.decode(ids, torch.Generator().manual_seed(1))
    c = tok.decode(ids, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert a.shape == (2, 3, 64, 64) and 0 <= float(a.min()) and float(a.max()) <= 1
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c[0], a[0])
    tok.save_pretrained(tmp_path / "seed")
    again = SEEDTokenizer.from_pretrained(tmp_path / "seed")
    assert torch.equal(again.encode(x[:2]), ids)
    torch.testing.assert_close(again.decode(ids, torch.Generator().manual_seed(1)), a)
    with pytest.raises(ValueError, match="lie in"):
        tok.decode(torch.full((1, tok.config.num_queries), tok.vocab_size))
    with pytest.raises(ValueError, match=r"\(batch, 8\)"):
        tok.decode(ids[:, :3])
    with pytest.raises(ValueError, match="64x64"):
        tok.encode(torch.rand(1, 3, 48, 48))


def test_seed_checkpoint_errors(tmp_path, batch):
    tok = debug_seed()
    tok.save_pretrained(tmp_path / "seed")
    (tmp_path / "seed" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="diffusion"):
        SEEDTokenizer.from_pretrained(tmp_path / "seed")
    no_dec = debug_seed(with_decoder=False)
    no_dec.save_pretrained(tmp_path / "plain")
    plain = SEEDTokenizer.from_pretrained(tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no trained diffusion decoder"):
        plain.decode(plain.encode(batch[0][:1]))
    (tmp_path / "plain" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        SEEDTokenizer.from_pretrained(tmp_path / "plain")


def test_offline_nothing_downloads(tmp_path):
    """Building, saving, loading and running the whole SEED tokenizer with the hub off and sockets refused."""
    script = textwrap.dedent(f"""
        import socket
        def refuse(*a, **k):
            raise RuntimeError("network access attempted")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        import torch
        from test_seed import debug_seed
        from mmgen.tokenizers.seed import SEEDTokenizer
        tok = debug_seed()
        tok.save_pretrained({str(tmp_path / 'off')!r})
        again = SEEDTokenizer.from_pretrained({str(tmp_path / 'off')!r})
        ids = again.encode(torch.rand(1, 3, 64, 64))
        print(again.decode(ids, torch.Generator().manual_seed(0)).shape)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3, 64, 64])" in out.stdout


def test_seed_training_chain_and_resume(tmp_path, capsys):
    """clip -> seed-tokenizer (both stages) -> seed-decoder -> AR that draws and sees, through the CLI, with
    resume; then pack, draw an image and caption it."""
    def recipe(name, text):
        (tmp_path / name).write_text(textwrap.dedent(text))
        return str(tmp_path / name)

    clip = recipe("clip.yaml", """
        architecture: {size: debug}
        training: {steps: 2, batch_size: 8, save_every: 1, log_every: 1}""")
    seed = recipe("seed.yaml", """
        architecture: {size: debug}
        training: {steps: 4, stage1_steps: 2, batch_size: 8, save_every: 1, log_every: 1, restart_every: 1}""")
    dec = recipe("dec.yaml", """
        decoder: {unet_channels: [16, 32], sample_steps: 2}
        training: {steps: 2, batch_size: 4, save_every: 1, log_every: 1}""")
    ar = recipe("ar.yaml", """
        architecture: {size: debug}
        training: {steps: 2, batch_size: 4, see_batch: 4, save_every: 1, log_every: 1}""")
    from mmgen.cli import main

    vae = tmp_path / "vae"
    torch.manual_seed(0)
    debug_vae().save_pretrained(vae)
    assert main(["train", "clip", "--recipe", clip, "--output", str(tmp_path / "clip")]) == 0
    assert main(["train", "clip", "--recipe", clip, "--output", str(tmp_path / "clip"), "--steps", "3",
                 "--resume"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "clip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # resumed at step 2, not from scratch
    assert main(["train", "seed-tokenizer", "--recipe", seed, "--clip", str(tmp_path / "clip" / "clip"),
                 "--output", str(tmp_path / "tok")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    assert "align" in rows[0] and "vq" not in rows[0] and "vq" in rows[-1]  # stage 1, then stage 2
    assert main(["train", "seed-decoder", "--recipe", dec, "--tokenizer", str(tmp_path / "tok" / "tokenizer"),
                 "--vae", str(vae), "--output", str(tmp_path / "dec")]) == 0
    assert main(["train", "ar", "--recipe", ar, "--tokenizer", str(tmp_path / "tok" / "tokenizer"),
                 "--output", str(tmp_path / "ar")]) == 0
    assert main(["pack", "--pipeline", str(tmp_path / "ar" / "pipeline"), "--tokenizer",
                 str(tmp_path / "dec" / "tokenizer"), "--output", str(tmp_path / "ckpt")]) == 0
    index = json.loads((tmp_path / "ckpt" / "model_index.json").read_text())
    assert index["tasks"] == ["draw", "see"]
    png = tmp_path / "x.png"
    assert main(["image", "a large red circle at the top left on a black background", "--checkpoint",
                 str(tmp_path / "ckpt"), "-o", str(png), "--seed", "0", "--quiet"]) == 0
    first = png.read_bytes()
    assert main(["image", "a large red circle at the top left on a black background", "--checkpoint",
                 str(tmp_path / "ckpt"), "-o", str(png), "--seed", "0", "--quiet"]) == 0
    assert png.read_bytes() == first  # same seed: same tokens and same diffusion noise
    capsys.readouterr()
    assert main(["caption", str(png), str(png), "--checkpoint", str(tmp_path / "ckpt")]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2  # one caption per image (an untrained model's bytes)
    assert main(["image", "a small red star on the left on a black background", "--checkpoint",
                 str(tmp_path / "ckpt"), "--init-image", str(png), "-o", str(tmp_path / "c.png"), "--quiet"]) == 2
    assert "one-dimensional" in capsys.readouterr().err
    # a pack that swaps in a tokenizer with another codebook is refused
    other = debug_seed(seed=5)
    other.save_pretrained(tmp_path / "other")
    assert main(["pack", "--pipeline", str(tmp_path / "ar" / "pipeline"), "--tokenizer", str(tmp_path / "other"),
                 "--output", str(tmp_path / "bad")]) == 2
    assert "another codebook" in capsys.readouterr().err
    # a draw-only checkpoint cannot caption
    assert main(["pack", "--pipeline", str(tmp_path / "ar" / "pipeline"), "--output", str(tmp_path / "draw")]) == 0
    index = json.loads((tmp_path / "draw" / "model_index.json").read_text())
    (tmp_path / "draw" / "model_index.json").write_text(json.dumps({**index, "tasks": ["draw"]}))
    assert main(["caption", str(png), "--checkpoint", str(tmp_path / "draw")]) == 2
    assert "not trained to write captions" in capsys.readouterr().err


def test_attribute_probes_run_on_debug_models():
    from mmgen.eval.clip_probe import ATTRIBUTES, attribute_retrieval, seed_attribute_retrieval, seed_code_probe

    tok = debug_seed(with_decoder=False)
    for probe in (attribute_retrieval(tok.clip, n=3), seed_attribute_retrieval(tok, n=3),
                  seed_code_probe(tok, n_train=40, n_test=20, steps=3)):
        assert set(probe) == set(ATTRIBUTES) and all(0 <= v <= 1 for v in probe.values())


def test_fp16_save_keeps_the_live_model_fp32(tmp_path):
    from safetensors.torch import load_file

    tok = debug_seed()
    tok.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert next(tok.diffusion.unet.parameters()).dtype == torch.float32
    unet = load_file(str(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in unet.values()} == {torch.float16}
    again = SEEDTokenizer.from_pretrained(tmp_path / "half")
    assert next(again.diffusion.unet.parameters()).dtype == torch.float32


def test_class_token_features_and_round_trip(tmp_path, batch):
    """With clip_class_token the Q-Former sees the ViT's class token first and the same patch tokens after it;
    the class token is the pooled embedding before the projection; the setting survives save and load."""
    x, _ = batch
    torch.manual_seed(0)
    clip = ShapesCLIP(CLIP_CONFIGS["debug"]).eval()
    with torch.no_grad():
        patches, pooled = clip.image_features(x)
        both, pooled2 = clip.image_features(x, class_token=True)
    assert both.shape == (x.shape[0], patches.shape[1] + 1, patches.shape[2])
    assert torch.allclose(both[:, 1:], patches, atol=1e-5) and torch.allclose(pooled2, pooled, atol=1e-5)
    assert torch.allclose(both[:, 0] @ clip.model.visual.proj, pooled, atol=1e-5)
    cfg = SEEDConfig(**{**SEED_CONFIGS["debug"].__dict__, "clip_class_token": True})
    tok = SEEDTokenizer(cfg, clip, debug_vae()).eval()
    assert tok.qformer.feat_pos.shape[0] == patches.shape[1] + 1
    ids = tok.encode(x)
    tok.save_pretrained(tmp_path / "tok")
    back = SEEDTokenizer.from_pretrained(tmp_path / "tok")
    assert back.config.clip_class_token and torch.equal(back.encode(x), ids)


def test_slot_and_shape_readouts_on_debug_models():
    """The diagnostic readouts run on any CLIP and SEED tokenizer, read only the requested objects, and give the
    same figures when rerun (seeded)."""
    from mmgen.eval.clip_probe import ATTRIBUTES, clip_shape_readout, seed_fresh_slot_readout, seed_slot_readout

    tok = debug_seed(with_decoder=False)
    for k in (1, 3):
        out = seed_slot_readout(tok, n=6, num_objects=k)
        assert set(out) == {"embeddings", "codes"}
        assert all(set(ATTRIBUTES) <= set(row) <= set(ATTRIBUTES) | {"shape_small", "shape_large"}
                   for row in out.values())
        # each figure is a share of k * 6 objects (or 6 backgrounds)
        assert all(round(v * 6 * k) == pytest.approx(v * 6 * k, abs=1e-4) for row in out.values()
                   for a, v in row.items() if a in ATTRIBUTES and a != "background")
    crops = clip_shape_readout(tok.clip, n_train=40, n_test=12, steps=3, crops=2)
    assert 0 <= crops["shape"] <= 1 and set(crops["shape_by_size"]) <= {"small", "large"}
    with pytest.raises(ValueError, match="conv=False"):
        clip_shape_readout(tok.clip, n_train=40, n_test=12, steps=3, conv=True, crops=2)
    a = clip_shape_readout(tok.clip, n_train=40, n_test=12, steps=3, conv=True)
    b = clip_shape_readout(tok.clip, n_train=40, n_test=12, steps=3, conv=True)
    assert a == b and set(a["shape_by_step"]) == {3} and 0 <= a["shape"] <= 1
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    fresh = [seed_fresh_slot_readout(tok, n_train=24, n_test=12, steps=3, train_objects=k) for k in (1, None, None)]
    assert fresh[1] == fresh[2] and set(ATTRIBUTES) <= set(fresh[0]["final"])
    assert fresh[0]["final"]["shape"] == fresh[0]["shape_by_step"][3]
    # the probe trains its own head: the tokenizer (its slot head included) is left as it was
    assert all(torch.equal(v, tok.state_dict()[k]) for k, v in before.items())


def test_slot_scores_split_shape_by_true_size():
    """``slot_scores`` reports shape for small and large objects apart, by each object's true size; weighted by
    their counts they give the overall shape figure."""
    from mmgen.eval.clip_probe import slot_scores
    from mmgen.worlds import shapes

    tok = debug_seed(with_decoder=False)
    samples = list(shapes.generate(40, 5, num_objects=3))
    target = tok.caption_slots.targets([(s.objects, s.background) for s in samples])
    emb = torch.randn(40, tok.config.num_queries, tok.config.width)
    row = slot_scores(tok.caption_slots, emb, target, num_objects=3)
    sizes = target[:, 2:12:4]
    n_small, n_large = (sizes == 0).sum().item(), (sizes == 1).sum().item()
    assert tok.caption_slots.sizes == ["small", "large"] and n_small + n_large == 120
    assert row["shape_small"] * n_small + row["shape_large"] * n_large == pytest.approx(row["shape"] * 120, abs=1e-3)


def test_id_agreement_counts_equal_ids():
    """``id_agreement``: a tokenizer against itself agrees everywhere; against another codebook, far less."""
    from mmgen.eval.clip_probe import id_agreement

    tok = debug_seed(with_decoder=False)
    assert id_agreement(tok, tok, n=6) == {"positions": 1.0, "sequences": 1.0, "first_8": 1.0}
    other = debug_seed(with_decoder=False, seed=4)
    assert id_agreement(tok, other, n=6)["positions"] < 0.5


def test_slot_weights_scale_each_attribute_loss():
    """training.slot_weights scales one attribute's slot loss: weighting shape 0 removes exactly its term."""
    from mmgen.worlds import shapes

    tok = debug_seed(with_decoder=False)
    slots = tok.caption_slots
    scenes = [(s.objects, s.background) for s in shapes.generate(6, seed=4)]
    target = slots.targets(scenes)
    emb = torch.randn(6, tok.config.num_queries, tok.config.width)
    with torch.no_grad():
        full = slots(emb, target)[0]
        slots.set_weights({"shape": 0})
        no_shape = slots(emb, target)[0]
        slots.set_weights({"shape": 2})
        double = slots(emb, target)[0]
    assert no_shape < full and torch.allclose(double - full, full - no_shape, atol=1e-5)
    for bad, msg in (({"angle": 1}, "unknown slot_weights"), ({"shape": -1}, "non-negative"),
                     ({"shape": True}, "non-negative")):
        with pytest.raises(ValueError, match=msg):
            slots.set_weights(bad)


def test_caption_loss_weights_switch_losses_off(batch):
    """training.caption_loss_weights: a zero weight skips that caption loss (its metrics vanish and the loss is
    the sum of the rest); bad tables get clear errors."""
    from mmgen.data.shapes_data import contrastive_batches

    tok = debug_seed(with_decoder=False).train()
    x, captions, negatives, described, scenes = next(contrastive_batches(6, seed=2))
    torch.manual_seed(1)
    full, row = tok(x, captions, 1, negatives, described, scenes)
    assert {"align", "itg", "slots"} <= set(row)
    tok.set_caption_loss_weights({"align": 0, "itg": 0})
    only, row_only = tok(x, captions, 1, negatives, described, scenes)
    assert "align" not in row_only and "itg" not in row_only
    assert only.item() == pytest.approx(row_only["slots"], rel=1e-5)
    assert full.item() == pytest.approx(row["align"] + row["itg"] + row["slots"], rel=1e-5)
    for bad, msg in (({"clip": 1}, "unknown caption_loss_weights"), ({"itg": -1}, "non-negative"),
                     ({"align": 0, "itg": 0, "slots": 0}, "every caption loss off")):
        with pytest.raises(ValueError, match=msg):
            tok.set_caption_loss_weights(bad)


def test_slot_ablation_benchmark_runs_and_rejects_bad_options(tmp_path):
    """benchmarks/seed_slot_ablation.py trains the tokenizer's own Q-Former and slot head on a CLIP's frozen
    tokens: a tiny run ends with one JSON line holding every requested variant; bad options fail clearly."""
    torch.manual_seed(0)
    ShapesCLIP(CLIP_CONFIGS["debug"]).save_pretrained(tmp_path / "clip")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "seed_slot_ablation.py"), "--clip", str(tmp_path / "clip"),
           "--steps", "2", "--n-train", "128"]
    out = subprocess.run(cmd + ["--variants", "shape_first", "one_object", "--fresh-probe", "--probe-steps", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    for name in ("shape_first", "one_object"):
        assert set(figures[name]) == {"shape_by_step", "final", "fresh_probe_shape_by_step"}
        assert set(figures[name]["shape_by_step"]) == {"2"} and 0 <= figures[name]["final"]["shape"] <= 1
    bad = subprocess.run(cmd + ["--variants", "no_such"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_decoder_cache_trains_on_encoded_scenes_and_resumes(tmp_path, batch):
    """The decoder's loss from cached (SEED ids, VAE ids) is the loss on the images; a cached run trains, saves,
    resumes on the same cache, and a cache smaller than a batch is refused."""
    from mmgen.train.seed import train_seed_decoder

    tok = debug_seed()
    x, _ = batch
    direct = tok.decoder_loss(x, torch.Generator().manual_seed(4))
    ids, vae_ids = tok.decoder_targets(x)
    assert ids.shape == (len(x), tok.config.num_queries) and vae_ids.shape == (len(x), *tok.vae.layout.grid)
    torch.testing.assert_close(tok.decoder_loss_from_ids(ids, vae_ids, torch.Generator().manual_seed(4)), direct)
    debug_seed(with_decoder=False).save_pretrained(tmp_path / "tok")
    debug_vae().save_pretrained(tmp_path / "vae")
    recipe = tmp_path / "dec.yaml"
    recipe.write_text("decoder: {unet_channels: [16, 32], sample_steps: 2}\n"
                      "training: {steps: 3, batch_size: 4, cache_images: 10, save_every: 1, log_every: 1}\n")
    out = tmp_path / "dec"
    train_seed_decoder(str(recipe), str(tmp_path / "tok"), str(tmp_path / "vae"), str(out), progress=False)
    train_seed_decoder(str(recipe), str(tmp_path / "tok"), str(tmp_path / "vae"), str(out), steps=5,
                       resume=True, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and all(r["loss"] > 0 for r in rows)
    trained = SEEDTokenizer.from_pretrained(out / "tokenizer")
    assert trained.decode(ids[:1], torch.Generator().manual_seed(0)).shape == (1, 3, 64, 64)
    recipe.write_text("training: {steps: 3, batch_size: 4, cache_images: 3}\n")
    with pytest.raises(ValueError, match="cache_images"):
        train_seed_decoder(str(recipe), str(tmp_path / "tok"), str(tmp_path / "vae"), str(tmp_path / "bad"),
                           progress=False)


def test_decoder_init_continues_a_trained_decoder_on_a_fresh_cache(tmp_path, batch):
    """``mmgen train seed-decoder --init DIR``: the run starts from DIR's decoder weights (fresh optimizer), on a
    cache drawn with ``training.cache_seed``; a decoder of another shape is refused by name, and so is a folder
    without a decoder."""
    from mmgen.cli import main
    from mmgen.train.seed import init_decoder

    trained = debug_seed(seed=1)
    trained.save_pretrained(tmp_path / "trained")
    target = debug_seed(seed=2)
    init_decoder(target, str(tmp_path / "trained"))
    for name, p in trained.diffusion.state_dict().items():
        torch.testing.assert_close(target.diffusion.state_dict()[name], p, msg=name)
    torch.manual_seed(0)
    wide = SEEDTokenizer(SEEDConfig(**{**SEED_CONFIGS["debug"].__dict__, "unet_channels": (32, 64, 64)}),
                         ShapesCLIP(CLIP_CONFIGS["debug"]), debug_vae(), with_decoder=True)
    with pytest.raises(ValueError, match="differs in"):
        init_decoder(wide, str(tmp_path / "trained"))
    debug_seed(with_decoder=False).save_pretrained(tmp_path / "tok")
    with pytest.raises(CheckpointError, match="no trained diffusion decoder"):
        init_decoder(target, str(tmp_path / "tok"))
    debug_vae().save_pretrained(tmp_path / "vae")
    recipe = tmp_path / "dec.yaml"
    recipe.write_text("decoder: {sample_steps: 2}\n"
                      "training: {steps: 2, batch_size: 4, cache_images: 8, cache_seed: 5, log_every: 1, lr: 0.0}\n")
    assert main(["train", "seed-decoder", "--recipe", str(recipe), "--tokenizer", str(tmp_path / "tok"),
                 "--vae", str(tmp_path / "vae"), "--init", str(tmp_path / "trained"), "--output",
                 str(tmp_path / "run")]) == 0
    again = SEEDTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    for name, p in trained.diffusion.state_dict().items():  # at lr 0 the run keeps the weights it started from
        torch.testing.assert_close(again.diffusion.state_dict()[name], p, msg=name)


def test_crop_views_cover_every_cell_and_feed_the_qformer(tmp_path, batch):
    """``clip_crops``: the image and n x n overlapping crops, each resized to the CLIP's input; their tokens sit
    side by side for the Q-Former, the image embedding is the whole image's; crops 0 is the image alone."""
    torch.manual_seed(0)
    clip = ShapesCLIP(CLIP_CONFIGS["debug"]).eval()
    ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64).clone()  # pixel value = its column / 63
    views = clip.crop_views(ramp, 3)
    assert views.shape == (1, 10, 3, 64, 64)
    torch.testing.assert_close(views[:, 0], ramp)
    # crops of half the side (32 px) at 0, 16, 32: the top-right crop spans columns 32-63, upsampled 2x
    assert abs(views[0, 3, 0, 0, 0].item() - 32 / 63) < 0.01 and abs(views[0, 3, 0, 0, -1].item() - 1) < 0.01
    assert abs(views[0, 2, 0, 0, 0].item() - 16 / 63) < 0.01
    x, _ = batch
    with torch.no_grad():
        alone, emb = clip.image_features(x, class_token=True)
        both, emb2 = clip.multicrop_features(x, 2, class_token=True)
        same, _ = clip.multicrop_features(x, 0, class_token=True)
    assert both.shape == (len(x), 5 * alone.shape[1], alone.shape[2]) and torch.equal(same, alone)
    torch.testing.assert_close(both[:, :alone.shape[1]], alone)
    torch.testing.assert_close(emb2, emb)
    cfg = SEEDConfig(**{**SEED_CONFIGS["debug"].__dict__, "clip_class_token": True, "clip_crops": 2})
    tok = SEEDTokenizer(cfg, clip, debug_vae()).eval()
    assert tok.qformer.feat_pos.shape[0] == 5 * alone.shape[1]
    ids = tok.encode(x)
    tok.save_pretrained(tmp_path / "tok")
    assert torch.equal(SEEDTokenizer.from_pretrained(tmp_path / "tok").encode(x), ids)
    with pytest.raises(ValueError, match="reads 85 feature tokens, got 17"):
        tok.qformer(alone)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="clip_crops"):
            SEEDTokenizer(SEEDConfig(**{**SEED_CONFIGS["debug"].__dict__, "clip_crops": bad}), clip, debug_vae())


def test_crop_positions_start_where_each_crop_patch_lies():
    """A crop patch's position row is the image patch under its centre; each crop's class token the image's."""
    from mmgen.train.seed import crop_positions

    pos = torch.arange(1 + 16 * 16, dtype=torch.float)[:, None]  # row r holds r: class token 0, patch (i, j) 1+16i+j
    out = crop_positions(pos, 3, 64, class_token=True)
    assert out.shape == (10 * 257, 1) and torch.equal(out[:257], pos)
    view = lambda k: out[257 * k:257 * (k + 1), 0]  # noqa: E731
    assert view(1)[0] == 0 and view(1)[1] == 1          # top-left crop, first patch: image patch (0, 0)
    assert view(1)[1 + 16 * 15 + 15] == 1 + 16 * 7 + 7  # its last patch: image pixel 31 -> patch (7, 7)
    assert view(5)[1] == 1 + 16 * 4 + 4                 # centre crop starts at pixel 16 -> patch (4, 4)
    assert view(9)[1 + 16 * 15 + 15] == 1 + 16 * 15 + 15
    assert torch.equal(crop_positions(pos, 0, 64, True), pos)
    with pytest.raises(ValueError, match="square grid"):
        crop_positions(pos[:-1], 2, 64, True)


def test_seed_tokenizer_init_adds_crops_to_a_trained_tokenizer(tmp_path, batch):
    """``mmgen train seed-tokenizer --init DIR``: a recipe with ``clip_crops`` starts from DIR's Q-Former,
    codebook and heads (crop positions from the image's, crop cross-attention copied from the trained one, its
    gate shut), so it gives DIR's ids until the gates open; at learning rate 0 the codebook is kept (no forced
    restart of every code); another CLIP is refused."""
    from mmgen.cli import main
    from mmgen.train.seed import init_seed_tokenizer

    torch.manual_seed(0)
    clip = ShapesCLIP(CLIP_CONFIGS["debug"])
    clip.save_pretrained(tmp_path / "clip")
    base = dict(SEED_CONFIGS["debug"].__dict__, clip_class_token=True)
    trained = SEEDTokenizer(SEEDConfig(**base), clip).eval()
    trained.save_pretrained(tmp_path / "trained")
    crops = SEEDTokenizer(SEEDConfig(**{**base, "clip_crops": 2}), clip).eval()
    init_seed_tokenizer(crops, str(tmp_path / "trained"))
    theirs = trained._own_state()
    for name, p in crops._own_state().items():
        if name == "qformer.feat_pos":
            torch.testing.assert_close(p[:len(theirs[name])], theirs[name])
        elif name.endswith("crop_gate"):
            assert p.item() == 0
        else:
            torch.testing.assert_close(p, theirs[name.replace("crop_attn", "cross_attn").replace("ln_crop", "ln2")],
                                       msg=name)
    x, _ = batch
    assert torch.equal(crops.encode(x), trained.encode(x))  # gates shut: the trained tokenizer's ids
    with torch.no_grad():
        crops.qformer.blocks[0].crop_gate.fill_(1.0)
    assert not torch.allclose(crops.causal_embeddings(x), trained.causal_embeddings(x))  # open: the crops count
    torch.manual_seed(9)
    other = SEEDTokenizer(SEEDConfig(**{**base, "clip_crops": 2}), ShapesCLIP(CLIP_CONFIGS["debug"]))
    with pytest.raises(CheckpointError, match="not the one given"):
        init_seed_tokenizer(other, str(tmp_path / "trained"))
    recipe = tmp_path / "seed.yaml"
    recipe.write_text("architecture: {size: debug, clip_class_token: true, clip_crops: 2}\n"
                      "training: {steps: 2, stage1_steps: 0, batch_size: 4, log_every: 1, lr: 0.0, restart_every: 50,"
                      " caption_loss_weights: {align: 0, itg: 0}}\n")
    assert main(["train", "seed-tokenizer", "--recipe", str(recipe), "--clip", str(tmp_path / "clip"),
                 "--init", str(tmp_path / "trained"), "--output", str(tmp_path / "run")]) == 0
    again = SEEDTokenizer.from_pretrained(tmp_path / "run" / "tokenizer")
    assert again.config.clip_crops == 2 and torch.equal(again.encode(x), trained.encode(x))
    torch.testing.assert_close(again.quantizer.embedding.weight, trained.quantizer.embedding.weight)
