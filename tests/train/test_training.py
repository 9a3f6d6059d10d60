"""Training loops at debug size: a few steps, resume, and two CPU processes (gloo) through accelerate."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mmgen.pipelines.text_to_image import TextToImagePipeline, load_tokenizer
from mmgen.tokenizers.base import CheckpointError
from mmgen.train.common import load_train_state, save_train_state
from tests.conftest import make_debug_model


def _recipes(tmp_path):
    tok = tmp_path / "tok.yaml"
    tok.write_text(yaml.safe_dump({"architecture": {"size": "debug"},
                                   "training": {"steps": 6, "batch_size": 4, "save_every": 3, "warmup": 2,
                                                "unquantized_warmup": 2, "restart_every": 2, "log_every": 2}}))
    ar = tmp_path / "ar.yaml"
    ar.write_text(yaml.safe_dump({"architecture": {"size": "debug"},
                                  "training": {"steps": 4, "batch_size": 2, "save_every": 2, "warmup": 1}}))
    return tok, ar


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tokenizer_then_ar_training_and_resume(tmp_path):
    from mmgen.train.ar import train_ar
    from mmgen.train.tokenizer import train_tokenizer

    tok_recipe, ar_recipe = _recipes(tmp_path)
    tok_dir = train_tokenizer(str(tok_recipe), str(tmp_path / "tok"), progress=False)
    assert load_tokenizer(tok_dir).layout.grid == (4, 4)
    # resume continues from the saved step instead of starting over
    train_tokenizer(str(tok_recipe), str(tmp_path / "tok"), steps=8, resume=True, progress=False)
    state = json.loads((tmp_path / "tok" / "train_state" / "state.json").read_text())
    assert state["step"] == 8
    pipe_dir = train_ar(str(ar_recipe), str(tok_dir), str(tmp_path / "ar"), progress=False)
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    img = pipe("a small green star on the left on a white background", generator=torch.Generator().manual_seed(0))
    assert img.images[0].size == (16, 16)
    train_ar(str(ar_recipe), str(tok_dir), str(tmp_path / "ar"), steps=6, resume=True, progress=False)
    assert json.loads((tmp_path / "ar" / "train_state" / "state.json").read_text())["step"] == 6
    # a second run over the same folder without --resume, or --resume into an empty one, is refused
    with pytest.raises(CheckpointError, match="already holds a run"):
        train_ar(str(ar_recipe), str(tok_dir), str(tmp_path / "ar"), steps=8, progress=False)
    assert json.loads((tmp_path / "ar" / "train_state" / "state.json").read_text())["step"] == 6
    with pytest.raises(CheckpointError, match="no training state"):
        train_tokenizer(str(tok_recipe), str(tmp_path / "typo"), steps=8, resume=True, progress=False)


def test_train_state_round_trip_and_interrupted_write(tmp_path):
    model = make_debug_model(64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(model.prefix(None, None, batch=1), torch.tensor([[1, 300]])).sum().backward()
    opt.step()
    save_train_state(tmp_path / "state", model, opt, 17, {"minutes": 1.5})
    # an interrupted later save leaves a stray .tmp and an .old folder: the last complete state still loads
    (tmp_path / "state").rename(tmp_path / "state.old")
    (tmp_path / "state.tmp").mkdir()
    fresh = make_debug_model(64, seed=1)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    step, extra = load_train_state(tmp_path / "state", fresh, opt2)
    assert step == 17 and extra["minutes"] == 1.5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert opt2.state_dict()["state"][0]["exp_avg"].shape == opt.state_dict()["state"][0]["exp_avg"].shape
    with pytest.raises(CheckpointError):
        load_train_state(tmp_path / "nothing", fresh, opt2)


def test_two_cpu_processes_gloo(tmp_path):
    tok_recipe, ar_recipe = _recipes(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "mmgen.cli", "train", "tokenizer", "--recipe", str(tok_recipe), "--output", str(tmp_path / "dist")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(tmp_path / "dist" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4, 6]  # one log, written by the main process only
    assert load_tokenizer(tmp_path / "dist" / "tokenizer").layout.grid == (4, 4)


def test_dd_pairs_then_student_and_resume(tmp_path, debug_checkpoint):
    import json as _json

    from mmgen.pipelines.text_to_image import TextToImagePipeline
    from mmgen.train.dd import SHARD, train_dd

    out = tmp_path / "dd"
    pipe_dir = train_dd(str(debug_checkpoint), str(out), pairs=SHARD, steps=4, batch_size=4, save_every=2,
                        progress=False)
    shard = out / "pairs" / "shard_00000.safetensors"
    stamp = shard.stat().st_mtime_ns
    pipe = TextToImagePipeline.from_pretrained(pipe_dir)
    assert pipe.student is not None
    out_img = pipe("a small blue star in the center on a white background", sampler="dd", steps=2)
    assert out_img.record["forward_passes"] == 2
    train_dd(str(debug_checkpoint), str(out), pairs=SHARD, steps=6, batch_size=4, save_every=2, resume=True,
             progress=False)
    assert shard.stat().st_mtime_ns == stamp  # pairs on disk are reused, not rewritten
    steps = [_json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    state = _json.loads((out / "train_state" / "state.json").read_text())
    assert state["step"] == 6 and steps == sorted(steps)


def test_ar_run_starts_from_a_trained_model_on_a_larger_canvas(tmp_path, debug_checkpoint):
    from safetensors.torch import load_file

    from mmgen.train.ar import train_ar
    from tests.conftest import make_debug_tokenizer

    def recipe(name, arch, **training):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"architecture": {"size": "debug", **arch},
                                        "training": {"steps": 1, "batch_size": 2, "warmup": 1, **training}}))
        return str(path)

    small = train_ar(recipe("small", {"shuffle_window": 2}), str(debug_checkpoint / "tokenizer"),
                     str(tmp_path / "small"), progress=False)
    # the same model on twice the canvas: 4x the Token-Shuffle grid and more positions; lr 0, so no learning
    big_recipe = recipe("big", {"shuffle_window": 2, "max_positions": 1024}, lr=0.0, image_size=32)
    out = train_ar(big_recipe, str(small / "tokenizer"), str(tmp_path / "big"), progress=False, init=str(small))
    pipe = TextToImagePipeline.from_pretrained(out)
    before = TextToImagePipeline.from_pretrained(small)
    assert pipe.tokenizer.config.image_size == 32 and pipe.model.config.max_positions == 1024
    assert tuple(pipe.model.config.shuffle_grid) == (8, 8) and tuple(before.model.config.shuffle_grid) == (4, 4)
    src = load_file(str(small / "model" / "model.safetensors"))
    got = load_file(str(out / "model" / "model.safetensors"))
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)
    img = pipe("a small green star on the left on a white background", generator=torch.Generator().manual_seed(0))
    assert img.images[0].size == (32, 32)
    with pytest.raises(ValueError, match="num_layers"):  # weights that do not fit are named, not loaded
        train_ar(recipe("deeper", {"shuffle_window": 2, "num_layers": 3}), str(small / "tokenizer"),
                 str(tmp_path / "o"), progress=False, init=str(small))
    other_tok = tmp_path / "other_tok"  # same type and size, other weights: its ids mean other pictures
    make_debug_tokenizer(seed=1).save_pretrained(other_tok)
    with pytest.raises(ValueError, match="not the tokenizer its model was trained over"):
        train_ar(big_recipe, str(other_tok), str(tmp_path / "o2"), progress=False, init=str(small))
    # unless the recipe says the tokenizer was trained further: same vocabulary and layout, the weights carry over
    again = train_ar(recipe("retrained", {"shuffle_window": 2}, lr=0.0, init_over_retrained_tokenizer=True),
                     str(other_tok), str(tmp_path / "retrained"), progress=False, init=str(small))
    got = load_file(str(again / "model" / "model.safetensors"))
    assert all(torch.equal(src[k], got[k]) for k in src)
    from dataclasses import replace

    from mmgen.tokenizers.vq_image import VQ_IMAGE_CONFIGS, VQImageTokenizer

    debug = VQ_IMAGE_CONFIGS["debug"]
    wider = VQImageTokenizer(replace(debug, codebook_size=2 * debug.codebook_size))
    wider.save_pretrained(tmp_path / "wider_tok")
    with pytest.raises(ValueError, match="ids in"):
        train_ar(recipe("retrained2", {"shuffle_window": 2}, lr=0.0, init_over_retrained_tokenizer=True),
                 str(tmp_path / "wider_tok"), str(tmp_path / "o3"), progress=False, init=str(small))
    with pytest.raises(ValueError, match="--resume continues"):
        train_ar(big_recipe, str(small / "tokenizer"), str(tmp_path / "big"), progress=False, init=str(small),
                 resume=True)


def test_cli_renders_the_world_in_workers_for_tokenizer_and_ar_runs_only(tmp_path):
    from mmgen.cli import main

    tok_recipe, _ = _recipes(tmp_path)
    assert main(["train", "tokenizer", "--recipe", str(tok_recipe), "--output", str(tmp_path / "t"), "--steps", "1",
                 "--data-workers", "1"]) == 0
    assert json.loads((tmp_path / "t" / "train_state" / "state.json").read_text())["step"] == 1
    for bad in (["train", "clip", "--recipe", str(tok_recipe)], ["train", "tokenizer", "--recipe", str(tok_recipe),
                                                                "--data", str(tmp_path)]):
        with pytest.raises(SystemExit, match="--data-workers renders the world"):
            main(bad + ["--output", str(tmp_path / "x"), "--data-workers", "2"])


def test_ar_cache_encodes_each_page_once_and_revisits_them(tmp_path):
    """training.cache_images: the cache holds the first N images' codes with their captions, each pass serves
    every one once in a new order, and a run with it trains, resumes and refuses a cache smaller than a batch."""
    from mmgen.train.ar import cached_codes, train_ar
    from tests.conftest import make_debug_tokenizer

    tok = make_debug_tokenizer()
    g = torch.Generator().manual_seed(0)
    stream = [(torch.rand(4, 3, 16, 16, generator=g), [f"c{4 * i + k}" for k in range(4)]) for i in range(3)]
    want = {c: tok.encode(x[k:k + 1])[0] for x, caps in stream for k, c in enumerate(caps)}
    served = cached_codes(iter(stream), tok, cache=10, batch=3, seed=0, device="cpu", progress=False)
    passes = [[next(served) for _ in range(3)] for _ in range(2)]  # 10 // 3 = 3 batches a pass
    for batches in passes:
        seen = [c for _, caps in batches for c in caps]
        assert len(set(seen)) == 9 and set(seen) <= {f"c{i}" for i in range(10)}
        for codes, caps in batches:
            for row, c in zip(codes, caps):
                assert torch.equal(row, want[c])
    assert [c for _, caps in passes[0] for c in caps] != [c for _, caps in passes[1] for c in caps]

    _, ar = _recipes(tmp_path)
    recipe = yaml.safe_load(ar.read_text())
    recipe["training"]["cache_images"] = 6
    ar.write_text(yaml.safe_dump(recipe))
    tok.save_pretrained(tmp_path / "tok")
    train_ar(str(ar), str(tmp_path / "tok"), str(tmp_path / "ar"), progress=False)
    train_ar(str(ar), str(tmp_path / "tok"), str(tmp_path / "ar"), steps=6, resume=True, progress=False)
    assert json.loads((tmp_path / "ar" / "train_state" / "state.json").read_text())["step"] == 6
    recipe["training"]["cache_images"] = 1
    ar.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="cache_images"):
        train_ar(str(ar), str(tmp_path / "tok"), str(tmp_path / "ar2"), progress=False)


def test_time_schedule_anneals_by_the_clock_and_bf16_trains(tmp_path, debug_checkpoint):
    from mmgen.cli import main
    from mmgen.train.ar import train_ar
    from mmgen.train.common import cosine_lr

    assert cosine_lr(10, 1000, 1.0, 5) > 0.99  # by steps: barely started
    assert cosine_lr(10, 1000, 1.0, 5, progress=1.0) == pytest.approx(0.1)  # the clock is up: annealed
    assert cosine_lr(900, 1000, 1.0, 5, progress=0.0) == cosine_lr(900, 1000, 1.0, 5)  # the further one wins
    assert cosine_lr(2, 1000, 1.0, 5, progress=1.0) == pytest.approx(0.6)  # warm-up stays by steps
    recipe = tmp_path / "ar.yaml"
    recipe.write_text(yaml.safe_dump({"architecture": {"size": "debug"},
                                      "training": {"steps": 1000, "batch_size": 2, "warmup": 1, "log_every": 1}}))
    tok = str(debug_checkpoint / "tokenizer")
    # a run stopped by a (tiny) time budget ends on the annealed learning rate although 1000 steps were asked for
    train_ar(str(recipe), tok, str(tmp_path / "t"), progress=False, max_minutes=0.02, time_schedule=True,
             precision="bf16")
    rows = _rows(tmp_path / "t" / "metrics.jsonl")
    lrs = [r["lr"] for r in rows]
    assert len(rows) >= 2 and rows[-1]["step"] < 1000
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5e-3  # by steps alone it would still be ~1e-3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    with pytest.raises(ValueError, match="max-minutes"):
        train_ar(str(recipe), tok, str(tmp_path / "u"), progress=False, time_schedule=True)
    with pytest.raises(ValueError, match="resume without it"):
        train_ar(str(recipe), tok, str(tmp_path / "t"), progress=False, time_schedule=True, max_minutes=1,
                 resume=True)
    with pytest.raises(ValueError, match="precision"):
        train_ar(str(recipe), tok, str(tmp_path / "v"), progress=False, precision="fp8")
    with pytest.raises(SystemExit, match="--precision is for mmgen train ar"):
        main(["train", "tokenizer", "--recipe", str(recipe), "--output", str(tmp_path / "w"), "--precision", "bf16"])
    with pytest.raises(SystemExit, match="--time-schedule is for"):
        main(["train", "clip", "--recipe", str(recipe), "--output", str(tmp_path / "w"), "--time-schedule"])
