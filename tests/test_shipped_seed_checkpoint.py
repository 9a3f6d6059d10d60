"""The SEED checkpoint the project ships (checkpoints/seed) loads (safetensors only), sees (captions world images
through `mmgen caption` and the API) and draws (32 tokens, then the diffusion decoder), deterministically.
The floors sit well under the model card's figures (an untrained model scores 0 on them), so they catch a
broken loading path or a swapped part, not noise."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmgen.eval.caption import caption_scenes, evaluate_captions, judge_caption
from mmgen.pipelines.image_to_text import ImageToTextPipeline
from mmgen.pipelines.text_to_image import TextToImagePipeline
from mmgen.tokenizers.base import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
CKPT = ROOT / "checkpoints" / "seed"
pytestmark = pytest.mark.skipif(not (CKPT / "model_index.json").exists(), reason="checkpoints/seed not built")


@pytest.fixture(scope="module")
def seer():
    return ImageToTextPipeline.from_pretrained(CKPT)


def test_weights_are_safetensors_small_and_both_directions():
    files = [p for p in CKPT.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    assert (CKPT / "README.md").is_file() and (CKPT / "eval.json").is_file()
    assert json.loads((CKPT / "model_index.json").read_text())["tasks"] == ["draw", "see"]


def test_captions_world_images(seer):
    res = evaluate_captions(seer, n=8)
    assert res["parsed"] == 1.0  # every caption in the world's grammar
    assert res["accuracy_1obj"] >= 0.25 and res["color_per_object"] >= 0.6 and res["cell_per_object"] >= 0.6, res


def test_caption_cli_prints_one_line_per_image(tmp_path, capsys):
    from mmgen.cli import main

    scenes = caption_scenes(2)[:2]
    paths = []
    for k, s in enumerate(scenes):
        paths.append(str(tmp_path / f"{k}.png"))
        s.image.save(paths[-1])
    capsys.readouterr()
    assert main(["caption", *paths]) == 0  # the default checkpoint is checkpoints/seed
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert all(judge_caption(c, s.objects, s.background)["parsed"] for c, s in zip(lines, scenes))
    assert main(["caption", paths[0], "--beams", "1"]) == 0  # greedy, the checkpoint's defaults overridden
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["caption", paths[0], "--beams", "1", "--rerank", "1"]) != 0
    assert "beams of 2 or more" in capsys.readouterr().err


def test_draws_deterministic_64px_images(text_encoder):
    pipe = TextToImagePipeline.from_pretrained(CKPT, text_encoder=text_encoder)
    prompt = "a large red circle at the top left on a black background"
    a = pipe(prompt, num_images=2, generator=[torch.Generator().manual_seed(s) for s in (0, 1)])
    b = pipe(prompt, num_images=1, generator=[torch.Generator().manual_seed(0)])
    assert a.images[0].size == (64, 64) and a.record["tokens"] == 32 and a.record["candidates"] == pipe.candidates == 4
    assert pipe.judge is pipe.tokenizer.clip  # the CLIP it sees with judges its drawings
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    img = np.asarray(a.images[0]).astype(float)
    assert img[..., 0].max() > 150  # something red-ish is drawn on the black background


def test_the_decoder_tuning_grid_reaches_the_diffusion_sampler(seer):
    """benchmarks/tune_sampling.py --decoder: each grid entry's steps and guidance reach the decoder, so two
    settings reconstruct the same scenes differently; a decoder without diffusion refuses them."""
    from mmgen.eval.shapes_run import evaluate_reconstruction
    from mmgen.pipelines.text_to_image import load_tokenizer

    one = evaluate_reconstruction(seer.tokenizer, n=1, batch=3, steps=2, guidance_scale=1.0)
    again = evaluate_reconstruction(seer.tokenizer, n=1, batch=3, steps=2, guidance_scale=1.0)
    other = evaluate_reconstruction(seer.tokenizer, n=1, batch=3, steps=3, guidance_scale=5.0)
    assert one["psnr"] == again["psnr"] and one["psnr"] != other["psnr"]
    with pytest.raises(ValueError, match="diffusion decoder"):
        evaluate_reconstruction(load_tokenizer(ROOT / "checkpoints" / "shapes" / "tokenizer"), n=1, steps=2)


def test_beam_search_captions_score_what_a_fresh_forward_scores(seer, monkeypatch):
    """beams=1 is greedy decoding exactly; with 4 beams each caption's log-probability (bytes and <eot>, over
    the allowed ids) equals the one recomputed from scratch, prefix by prefix, so the reordered KV cache
    holds each hypothesis' own keys; bad settings are refused."""
    from mmgen.pipelines.image_to_text import DEFAULT_MAX_BYTES
    from mmgen.sampling.ar import SamplingOptions, beam_search_text, sample_text

    images = [s.image for s in caption_scenes(1, seed=123)]
    greedy = seer(images, beams=1).captions
    assert sample_text(seer.model, seer.start_ids(images), DEFAULT_MAX_BYTES, SamplingOptions(), None,
                       greedy=True)[0] == greedy
    model, vocab = seer.model, seer.model.vocab
    start = seer.start_ids(images)
    texts, scores, record = beam_search_text(model, start, 200, beams=4)
    assert texts == seer(images, beams=4, rerank=0, mirror=False).captions and record.sampler == "ar-text-beam4"
    lo, hi = vocab.range("byte")
    eot = vocab.special("<eot>")
    d = model.config.hidden_size
    for row, text, score in zip(start, texts, scores):
        follow = [lo + c for c in text.encode("utf-8")] + [eot]
        seq, total = row.tolist(), 0.0
        for tok in follow:
            cache = model.new_cache(1, len(seq) + 1)
            logits = model.prefill(torch.zeros(1, 0, d), torch.tensor([seq]), cache)[0]
            allowed = torch.full_like(logits, float("-inf"))
            allowed[lo:hi] = 0.0
            allowed[eot] = 0.0
            total += torch.log_softmax(logits + allowed, -1)[tok].item()
            seq.append(tok)
        assert total == pytest.approx(score.item(), abs=1e-3), text
    import mmgen.pipelines.image_to_text as itt
    monkeypatch.setattr(itt, "BEAM_ROWS", 8)  # 2 images of 4 beams per cache: the same captions in chunks
    chunked = seer(images, beams=4, rerank=0, mirror=False)
    assert chunked.captions == texts and chunked.record["batch"] == len(images)
    with pytest.raises(ValueError, match="beams"):
        seer(images, beams=0)
    with pytest.raises(ValueError, match="not both"):
        seer(images, beams=2, temperature=0.7)


def test_rerank_picks_the_beam_caption_that_best_explains_the_image(seer):
    """Noisy-channel reranking: the caption chosen is the beam hypothesis maximising log p(c | x) + w log p(x | c),
    where log p(x | c) (``draw_log_probs``) equals what the KV-cached drawing path scores token by token after
    the caption's prefix; w = 0 is plain beam search, a huge w the drawing direction alone; a caption the
    encoder cannot read ranks last; bad settings are refused."""
    from mmgen.sampling.ar import beam_search_text

    images = [s.image for s in caption_scenes(1, seed=321)]
    model, vocab = seer.model, seer.model.vocab
    start = seer.start_ids(images)
    ids = start[:, 1:-2]
    hyps, see, _ = beam_search_text(model, start, 200, beams=4, n_best=True)
    assert [h[0] for h in hyps] == seer(images, beams=4, rerank=0, mirror=False).captions
    assert (see[:, :-1] >= see[:, 1:]).all()  # best first
    draw = seer.draw_log_probs([c for h in hyps for c in h], ids.repeat_interleave(4, 0)).view(-1, 4)
    lo, _ = vocab.range("image")
    for i in (0, 2):  # the drawing direction through the KV cache, token by token
        cond = seer.text_encoder([hyps[i][1]])
        prefix = model.prefix(cond.states, cond.mask)
        cache = model.new_cache(1, prefix.shape[1] + 1 + ids.shape[1])
        logits = model.prefill(prefix, torch.tensor([[vocab.special("<boi>")]]), cache)
        total = 0.0
        for tok in ids[i].tolist():
            total += torch.log_softmax(logits[0, lo:lo + seer.tokenizer.vocab_size].float(), -1)[tok - lo].item()
            logits = model.decode_step(torch.tensor([tok]), cache)
        assert total == pytest.approx(draw[i, 1].item(), abs=2e-3)
    for w in (0.5, 1.0, 100.0):
        want = [h[j] for h, j in zip(hyps, (see + w * draw).argmax(-1).tolist())]
        assert seer(images, beams=4, rerank=w, mirror=False).captions == want
    assert seer.draw_log_probs(["", "   ", "a red circle " * 30], ids[:1].expand(3, -1)).eq(float("-inf")).all()
    assert seer.rerank([["", hyps[0][0]]], torch.tensor([[0.0, -5.0]]), ids[:1], 1.0) == [hyps[0][0]]
    for bad, match in ((dict(beams=1, rerank=1.0), "beams of 2"), (dict(beams=4, rerank=-1.0), "rerank"),
                       (dict(beams=4, rerank=float("nan")), "rerank"), (dict(beams=4, temperature=0.5), "not both")):
        with pytest.raises(ValueError, match=match):
            seer(images[:1], **bad)
    with pytest.raises(CheckpointError, match="caption_defaults"):
        ImageToTextPipeline(seer.tokenizer, model, defaults={"beams": 4, "rerank": "high"})
    with pytest.raises(CheckpointError, match="unknown caption_defaults"):
        ImageToTextPipeline(seer.tokenizer, model, defaults={"beam": 4})
    with pytest.raises(CheckpointError, match="drawing direction"):
        ImageToTextPipeline(seer.tokenizer, model, tasks=["see"], defaults={"beams": 4, "rerank": 1.0})


def test_mirror_augmented_captions_are_mirror_equivariant(seer):
    """Mirror test-time augmentation scores each candidate in both views, so captioning the mirrored image gives
    the mirror of the caption of the image; the teacher-forced caption scores it sums are the beam's own
    log-probabilities; it needs beams and the shapes world."""
    from PIL import ImageOps

    from mmgen.sampling.ar import beam_search_text
    from mmgen.worlds import shapes

    scenes = caption_scenes(2, seed=77)
    images = [s.image for s in scenes]
    out = seer(images, beams=4, rerank=1.0, mirror=True)
    assert out.record["sampler"] == "ar-text-beam4-rerank1-mirror"
    flipped = seer([ImageOps.mirror(im) for im in images], beams=4, rerank=1.0, mirror=True).captions
    assert flipped == [shapes.mirror_caption(c) for c in out.captions]
    start = seer.start_ids(images)
    hyps, see, _ = beam_search_text(seer.model, start, 200, beams=4, n_best=True)
    again = seer.see_log_probs([h for row in hyps for h in row], start.repeat_interleave(4, 0)).view(-1, 4)
    assert torch.allclose(again, see, atol=2e-3)
    assert seer.see_log_probs([None], start[:1]).item() == float("-inf")
    with pytest.raises(ValueError, match="beams of 2"):
        seer(images[:1], beams=1, mirror=True)
    with pytest.raises(ValueError, match="not both"):
        seer(images[:1], temperature=0.5, mirror=True)
    seer.world = None  # a checkpoint of another world
    try:
        with pytest.raises(ValueError, match="mirror-symmetric"):
            seer(images[:1], beams=2, mirror=True)
    finally:
        seer.world = "shapes"


def test_pack_takes_a_seed_decoder_as_it_is(tmp_path, debug_checkpoint, capsys):
    """`mmgen pack --seed-decoder DIR` over a tokenizer that has none: the packed tokenizer encodes as the
    pipeline's and decodes as DIR's decoder does, noise for noise."""
    import shutil

    from mmgen.cli import main
    from mmgen.tokenizers.seed import SEEDTokenizer

    shipped = SEEDTokenizer.from_pretrained(CKPT / "tokenizer")
    shutil.copytree(CKPT, tmp_path / "pipe", ignore=shutil.ignore_patterns("tokenizer"))
    no_decoder = SEEDTokenizer.from_pretrained(CKPT / "tokenizer", with_decoder=False)
    with torch.no_grad():  # the packed tokenizer must keep the pipeline's code decoder, not take DIR's
        no_decoder.code_decoder.pos.add_(0.5)
    no_decoder.save_pretrained(tmp_path / "pipe" / "tokenizer")
    assert not (tmp_path / "pipe" / "tokenizer" / "unet").exists()
    assert main(["pack", "--pipeline", str(tmp_path / "pipe"), "--seed-decoder", str(CKPT / "tokenizer"),
                 "--output", str(tmp_path / "out")]) == 0
    packed = SEEDTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    images = [s.image for s in caption_scenes(1)[:2]]
    ids = shipped.encode(images)
    assert torch.equal(packed.encode(images), ids)
    assert torch.equal(packed.code_decoder.pos, no_decoder.code_decoder.pos.half().float())
    assert all(torch.equal(a, b) for a, b in zip(packed.diffusion.state_dict().values(),
                                                 shipped.diffusion.state_dict().values()))
    with torch.no_grad():  # with the shipped code decoder back, it decodes as the shipped folder, noise for noise
        packed.code_decoder.pos.copy_(shipped.code_decoder.pos)
    one = packed.decode(ids, generator=torch.Generator().manual_seed(3), steps=4)
    two = shipped.decode(ids, generator=torch.Generator().manual_seed(3), steps=4)
    assert torch.allclose(one, two, atol=1e-5)
    capsys.readouterr()
    assert main(["pack", "--pipeline", str(tmp_path / "pipe"), "--seed-decoder", str(tmp_path / "pipe" / "tokenizer"),
                 "--output", str(tmp_path / "bad")]) == 2
    assert "no trained diffusion decoder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="SEED tokenizer"):
        main(["pack", "--pipeline", str(debug_checkpoint), "--seed-decoder", str(CKPT / "tokenizer"),
              "--output", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
