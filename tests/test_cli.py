"""The mmgen command, run as a user runs it (a subprocess), on a debug checkpoint."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

PROMPT = "a large red circle at the top left on a black background"


def mmgen(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "mmgen.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_image_single_and_prompts_file(tmp_path, debug_checkpoint):
    res = mmgen("image", PROMPT, "--checkpoint", debug_checkpoint, "--seed", 3, "-o", tmp_path / "x.png", "-q")
    assert res.returncode == 0, res.stderr
    img = Image.open(tmp_path / "x.png")
    assert img.size == (16, 16) and img.format == "PNG"

    pf = tmp_path / "prompts.txt"
    pf.write_text(f"{PROMPT}\na small blue star in the center on a white background\n")
    res = mmgen("image", "--prompts-file", pf, "--checkpoint", debug_checkpoint, "--seed", 3, "-o", tmp_path / "d", "-q")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["000.png", "001.png"]
    # a prompt in a file gets exactly what it gets alone with the same seed
    assert np.array_equal(np.asarray(Image.open(tmp_path / "d" / "000.png")), np.asarray(img))


def test_several_images_per_prompt(tmp_path, debug_checkpoint):
    res = mmgen("image", PROMPT, "-n", 3, "--checkpoint", debug_checkpoint, "--seed", 0, "-o", tmp_path / "y.png", "-q")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["y_000.png", "y_001.png", "y_002.png"]


def test_errors_are_clear(tmp_path, debug_checkpoint):
    res = mmgen("image", "   ", "--checkpoint", debug_checkpoint, "-o", tmp_path / "e.png")
    assert res.returncode == 2 and "empty" in res.stderr and not (tmp_path / "e.png").exists()
    res = mmgen("image", PROMPT, "--checkpoint", tmp_path / "missing")
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = mmgen("image", PROMPT, "--bogus-option")
    assert res.returncode == 2 and "unrecognized arguments" in res.stderr
    res = mmgen("image", PROMPT, "--checkpoint", debug_checkpoint, "--top-p", 5)
    assert res.returncode == 2 and "top_p" in res.stderr
    res = mmgen("image", PROMPT, "-n", 0)
    assert res.returncode == 2


def test_help_explains():
    res = mmgen("image", "--help")
    assert res.returncode == 0 and "--prompts-file" in res.stdout and "--guidance-scale" in res.stdout


def test_eval_shapes_reports_every_prompt_set(tmp_path, debug_checkpoint):

    report = tmp_path / "r.json"
    res = mmgen("eval", "shapes", "--checkpoint", debug_checkpoint, "--n", 1, "--json", report, "-q", timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(report.read_text())
    for key in ("canonical", "paraphrase_held_out"):
        assert data[key]["n"] == 3 and set(data[key]["by_objects"]) == {"1", "2", "3"}
    assert data["ceiling"] >= 0.97 and 0.0 <= data["reconstruction"]["score"] <= 1.0


def test_studio_help_and_missing_checkpoint():
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "mmgen.cli", "studio", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "127.0.0.1" in ok.stdout and "GRADIO_SERVER_NAME" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "mmgen.cli", "studio", "--checkpoint", "/no/such/dir"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_image_with_zipvl_and_an_image_to_continue(tmp_path, debug_checkpoint):
    res = mmgen("image", PROMPT, "--checkpoint", debug_checkpoint, "--seed", 1, "-o", tmp_path / "a.png",
                "--zipvl-tau", 0.9, "--kv-bits", "4/2")
    assert res.returncode == 0, res.stderr
    assert "zipvl: kept ratio per layer" in res.stderr and "of dense" in res.stderr
    res = mmgen("image", PROMPT, "--checkpoint", debug_checkpoint, "--seed", 2, "-o", tmp_path / "b.png",
                "--init-image", tmp_path / "a.png", "--keep-rows", 1, "-q")
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "b.png").size == (16, 16)
    res = mmgen("image", PROMPT, "--checkpoint", debug_checkpoint, "--kv-bits", "3/1", "-o", tmp_path / "c.png")
    assert res.returncode == 2 and "ZipVL" in res.stderr and not (tmp_path / "c.png").exists()
    res = mmgen("image", PROMPT, "--checkpoint", debug_checkpoint, "--init-image", tmp_path / "missing.png")
    assert res.returncode == 2 and "--init-image" in res.stderr


def test_eval_text_reports_cer_against_the_ocr_ceiling(tmp_path, text_encoder):

    import pytest
    import torch

    from mmgen.eval import text_eval
    from mmgen.model.transformer import MMGenTransformer
    from mmgen.pipelines.text_to_image import TextToImagePipeline
    from mmgen.tokenizers.binary_text import BINARY_TEXT_CONFIGS, BinaryTextTokenizer
    from tests.conftest import make_debug_model

    if not text_eval.have_tesseract():
        pytest.skip("tesseract not installed (make setup installs it)")
    torch.manual_seed(0)
    tok = BinaryTextTokenizer(BINARY_TEXT_CONFIGS["debug"]).eval()
    base = make_debug_model(tok.vocab_size)
    model = MMGenTransformer(type(base.config)(**{**base.config.__dict__, "text_bytes": 256, "max_positions": 512}))
    TextToImagePipeline(tok, model.eval(), text_encoder).save_pretrained(tmp_path / "text", dtype=None)
    report = tmp_path / "r.json"
    res = mmgen("eval", "text", "--checkpoint", tmp_path / "text", "--n", 1, "--json", report, "-q", timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(report.read_text())
    assert r["text_to_image"]["scenes_seed"] == 900_201  # text-eval's own scenes unless --scenes-seed says otherwise
    assert r["canvas"] == 64 and r["reconstruction"]["tokens"] == 64 and r["reconstruction"]["bits_per_pixel"] == 64 * 6 / 64 ** 2
    for part in ("ceiling", "reconstruction", "text_to_image"):
        assert r[part]["short"]["n"] == 1 and r[part]["long"]["n"] == 1 and r[part]["all"]["cer"] >= 0
    # an untrained model writes no readable text; the world's own renders read far better
    assert r["text_to_image"]["all"]["cer"] > r["ceiling"]["all"]["cer"]
    res = mmgen("eval", "text", "--checkpoint", tmp_path / "missing")
    assert res.returncode == 2 and "does not exist" in res.stderr
    # a tokenizer folder alone: the same reconstruction figures, and no text-to-image part
    res = mmgen("eval", "text", "--checkpoint", tmp_path / "text" / "tokenizer", "--n", 1, "--json", report, "-q",
                timeout=300)
    assert res.returncode == 0, res.stderr
    alone = json.loads(report.read_text())
    assert "text_to_image" not in alone and alone["reconstruction"] == r["reconstruction"]
    # the same tokenizer measured on a larger canvas; a checkpoint keeps the canvas its model was trained for
    res = mmgen("eval", "text", "--checkpoint", tmp_path / "text" / "tokenizer", "--image-size", 128, "--n", 1,
                "--json", report, "-q", timeout=300)
    assert res.returncode == 0, res.stderr
    big = json.loads(report.read_text())
    assert big["canvas"] == 128 and big["reconstruction"]["tokens"] == 256
    res = mmgen("eval", "text", "--checkpoint", tmp_path / "text", "--image-size", 128)
    assert res.returncode == 2 and "--image-size resizes a tokenizer folder alone" in res.stderr
    res = mmgen("image", 'a white card with the text "Hi" in large blue serif letters, center aligned',
                "--checkpoint", tmp_path / "text" / "tokenizer", "-o", tmp_path / "x.png")
    assert res.returncode == 2 and "tokenizer alone" in res.stderr and not (tmp_path / "x.png").exists()


def test_caption_without_a_checkpoint_says_how_to_get_one(tmp_path):
    from pathlib import Path

    from mmgen.cli import CAPTION_CHECKPOINT

    png = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(png)
    if not Path(CAPTION_CHECKPOINT, "model_index.json").is_file():  # a checkout without it: say how to build one
        r = mmgen("caption", png)
        assert r.returncode != 0 and "docs/seed.md" in r.stderr
    (tmp_path / "empty").mkdir()
    r = mmgen("caption", png, "--checkpoint", tmp_path / "empty")
    assert r.returncode != 0 and "model_index.json" in r.stderr and "Traceback" not in r.stderr
    r = mmgen("caption", tmp_path / "missing.png", "--checkpoint", tmp_path)
    assert r.returncode != 0 and "cannot read image" in r.stderr


def test_bad_outputs_options_and_defaults_fail_before_work(tmp_path, debug_checkpoint, capsys):
    from mmgen.cli import main

    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["image", PROMPT, "--checkpoint", str(debug_checkpoint), "-o", str(tmp_path / "notes.txt" / "x"),
                 "--seed", "0"]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "notes.txt").read_text() == "keep me"
    with pytest.raises(SystemExit):
        main(["eval", "shapes", "--checkpoint", str(debug_checkpoint), "--n", "0"])
    assert "--n must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "shapes", "--checkpoint", str(debug_checkpoint), "--json", str(tmp_path / "no" / "r.json")])
    assert "existing folder" in capsys.readouterr().err
    assert main(["eval", "text", "--checkpoint", str(debug_checkpoint), "--sampler", "dd"]) == 2
    for bad, says in (('{"guidance": 3}', "unknown keys"), ("[1, 2]", "JSON object"), ('{"top_k": "5"}', "top_k"),
                      ("{not json", "--defaults")):
        with pytest.raises(SystemExit, match=says):
            main(["pack", "--pipeline", str(debug_checkpoint), "--output", str(tmp_path / "packed"), "--defaults", bad])
    assert not (tmp_path / "packed").exists()
    assert main(["pack", "--pipeline", str(debug_checkpoint), "--output", str(tmp_path / "packed"),
                 "--defaults", '{"top_k": 5, "guidance_scale": 2}']) == 0
    index = json.loads((tmp_path / "packed" / "model_index.json").read_text())
    assert index["defaults"]["top_k"] == 5 and index["defaults"]["guidance_scale"] == 2.0
    # a tokenizer packed alone: fp16 weights that load and encode as the fp32 ones (nearly) do
    import torch

    from mmgen.pipelines.text_to_image import load_tokenizer
    from safetensors.torch import load_file

    assert main(["pack", "--tokenizer", str(debug_checkpoint / "tokenizer"), "--output", str(tmp_path / "tok")]) == 0
    assert {t.dtype for t in load_file(tmp_path / "tok" / "model.safetensors").values()} <= {torch.float16, torch.int64}
    x = torch.rand(2, 3, 16, 16)
    same = load_tokenizer(tmp_path / "tok").encode(x) == load_tokenizer(debug_checkpoint / "tokenizer").encode(x)
    assert same.float().mean() > 0.9
    for argv in (["pack", "--output", str(tmp_path / "none")],
                 ["pack", "--tokenizer", str(debug_checkpoint / "tokenizer"), "--defaults", "{}", "--output", "x"]):
        with pytest.raises(SystemExit, match="--tokenizer DIR alone"):
            main(argv)


def test_pack_adds_a_judge(tmp_path, debug_checkpoint, capsys):
    """mmgen pack --judge DIR --candidates K writes the judge into the checkpoint; the packed pipeline reranks
    by default; no judge, a judge of another image size or 'own' without a SEED tokenizer are refused."""
    from mmgen.cli import main
    from mmgen.pipelines.text_to_image import TextToImagePipeline
    from mmgen.tokenizers.clip_shapes import CLIP_CONFIGS, ShapesCLIP

    cfg = json.loads(json.dumps(CLIP_CONFIGS["debug"]))
    for size in (16, 32):
        cfg["vision_cfg"].update(image_size=size, patch_size=8)
        ShapesCLIP(cfg).save_pretrained(tmp_path / f"clip{size}")
    out = tmp_path / "judged"
    assert main(["pack", "--pipeline", str(debug_checkpoint), "--output", str(out), "--judge",
                 str(tmp_path / "clip16"), "--candidates", "3"]) == 0
    assert json.loads((out / "model_index.json").read_text())["judge"] == {"path": "judge", "candidates": 3}
    pipe = TextToImagePipeline.from_pretrained(out)
    assert pipe.candidates == 3 and pipe("a red circle").record["candidates"] == 3
    assert main(["pack", "--pipeline", str(out), "--output", str(tmp_path / "off"), "--candidates", "1"]) == 0
    assert TextToImagePipeline.from_pretrained(tmp_path / "off").candidates == 1
    assert main(["pack", "--pipeline", str(debug_checkpoint), "--output", str(tmp_path / "x"),
                 "--candidates", "2"]) == 2
    assert "needs a judge" in capsys.readouterr().err
    assert main(["pack", "--pipeline", str(debug_checkpoint), "--output", str(tmp_path / "x"), "--judge",
                 str(tmp_path / "clip32")]) == 2
    assert "32px" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="own CLIP"):
        main(["pack", "--pipeline", str(debug_checkpoint), "--output", str(tmp_path / "x"), "--judge", "own"])
    assert not (tmp_path / "x").exists()


def test_studio_is_found_after_global_options(monkeypatch):
    import mmgen.cli as cli

    seen = []
    monkeypatch.setattr(cli, "cmd_studio", lambda argv: seen.append(argv) or 0)
    assert cli.main(["-v", "studio", "--port", "7861"]) == 0 and cli.main(["studio"]) == 0
    assert seen == [["--port", "7861"], []]
