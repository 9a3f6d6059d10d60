"""The ``mmgen`` command: generate, train, evaluate. Every generating command goes through a pipeline."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_PROMPTS_FILE_LINES = 10_000


def _default_checkpoint() -> str:
    from mmgen.pipelines.text_to_image import DEFAULT_CHECKPOINT

    return str(DEFAULT_CHECKPOINT)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults come from the checkpoint's model_index.json)")
    g.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (1 = off)")
    g.add_argument("--temperature", type=float, help="softmax temperature (> 0)")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1] (1 = off)")
    g.add_argument("--min-p", type=float, help="drop tokens less likely than MIN_P x the most likely one, in "
                                               "[0, 1) (0 = off)")
    g.add_argument("--plausibility", type=float, metavar="ALPHA",
                   help="with guidance: draw only tokens at least ALPHA x as likely as the best one under the prompt "
                        "alone (contrastive decoding's plausibility constraint), in [0, 1) (0 = off)")
    g.add_argument("--cfg-schedule", choices=["constant", "linear"],
                   help="guidance over the tokens: constant, or linear (ramps up from 1 to --guidance-scale)")
    g.add_argument("--sampler", choices=["ar", "dd"], default="ar",
                   help="ar: token by token (default); dd: the checkpoint's Distilled Decoding student")
    g.add_argument("--steps", type=int, default=1, choices=[1, 2], help="(dd) forward passes: 1 or 2 (default 1)")
    g.add_argument("--negative-prompt", help="what to steer away from (replaces the unconditional branch)")
    g.add_argument("--candidates", type=int, metavar="K",
                   help="CLIP reranking: draw K images for each one kept and keep the one the checkpoint's judge "
                        "CLIP finds closest to the prompt; costs K times the drawing (default: the checkpoint's, "
                        "4 for checkpoints/shapes and checkpoints/seed; 1 = off)")
    z = p.add_argument_group("ZipVL (AR sampler; either option turns it on)")
    z.add_argument("--zipvl-tau", type=float, metavar="TAU",
                   help="share of attention mass the important tokens must hold, in (0, 1] (default 0.975); "
                        "the prefill attends with those tokens only")
    z.add_argument("--kv-bits", metavar="HI/LO", help="KV cache bits of important/other tokens, from 2, 4, 8, 16 "
                                                      "(default 4/2)")


def _image_paths(out: str | None, count: int) -> list[Path]:
    if out is None:
        out = "outputs"
    path = Path(out)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if count == 1:
            return [path]
        return [path.with_name(f"{path.stem}_{i:03d}{path.suffix}") for i in range(count)]
    return [path / f"{i:03d}.png" for i in range(count)]


def _check_writable(paths: list[Path]) -> None:
    """Every output's folder exists or can be made, and no output path is an existing folder."""
    for folder in sorted({p.parent for p in paths}):
        existing = next((q for q in (folder, *folder.parents) if q.exists()), None)
        if existing is not None and not existing.is_dir():
            raise ValueError(f"cannot write into {folder}: {existing} is a file, not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the output folder {folder}: {e.strerror or e}") from None
    for p in paths:
        if p.is_dir():
            raise ValueError(f"cannot write the image {p}: a folder of that name exists")


def cmd_image(args) -> int:
    import random

    import torch

    from mmgen.pipelines.text_to_image import TextToImagePipeline

    if args.prompts_file:
        if args.prompt:
            raise SystemExit("error: give a PROMPT or --prompts-file, not both")
        if args.num_images != 1:
            raise SystemExit("error: --prompts-file writes one image per prompt; drop -n")
        pf = Path(args.prompts_file)
        if not pf.is_file():
            raise SystemExit(f"error: prompts file {pf} does not exist")
        prompts = [line.strip() for line in pf.read_text().splitlines()]
        if not prompts or any(not p for p in prompts):
            bad = [i + 1 for i, p in enumerate(prompts) if not p]
            raise SystemExit(f"error: {pf} has empty lines ({bad[:5]}); one prompt per line" if bad
                             else f"error: {pf} is empty")
        if len(prompts) > MAX_PROMPTS_FILE_LINES:
            raise SystemExit(f"error: at most {MAX_PROMPTS_FILE_LINES} prompts per file")
        if args.output and Path(args.output).suffix.lower() in IMAGE_SUFFIXES:
            raise SystemExit("error: with --prompts-file, -o names a directory")
    else:
        if args.prompt is None:
            raise SystemExit("error: give a PROMPT (or --prompts-file FILE)")
        prompts = [args.prompt]
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint)
    # one generator per image: image k of a prompt is seeded seed + k, and a prompt in a file gets exactly
    # what it gets alone (seed, seed + 1, ...)
    jobs = [(p, seed + k) for p in prompts for k in range(args.num_images)]
    paths = _image_paths(args.output, len(jobs))
    _check_writable(paths)  # before generating: a bad -o must not cost the work
    sampling = dict(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, plausibility=args.plausibility,
                    cfg_schedule=args.cfg_schedule, negative_prompt=args.negative_prompt, sampler=args.sampler,
                    steps=args.steps, zipvl_tau=args.zipvl_tau, kv_bits=args.kv_bits,
                    candidates=args.candidates)
    if args.init_image:
        from PIL import Image

        try:
            sampling["image"] = Image.open(args.init_image).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read --init-image {args.init_image}: {e}") from None
        sampling["keep_rows"] = args.keep_rows
    elif args.keep_rows is not None:
        raise ValueError("--keep-rows needs --init-image")
    total_s, written, zip_records = 0.0, [], []
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        gens = [torch.Generator().manual_seed(s) for _, s in chunk]
        out = pipe([p for p, _ in chunk], generator=gens, progress=not args.quiet, **sampling)
        total_s += out.record["seconds"]
        if out.record.get("zipvl"):
            zip_records.append(out.record["zipvl"])
        for img, path in zip(out.images, paths[start:start + len(chunk)]):  # folders made by _check_writable
            img.save(path)
            written.append(str(path))
    for w in written:
        print(w)
    if not args.quiet:
        print(f"seed {seed}, {len(written)} image(s) in {total_s:.1f} s", file=sys.stderr)
        for z in zip_records:
            print(f"zipvl: kept ratio per layer {z['kept_ratio_per_layer']}, KV {z['kv_bytes']} bytes "
                  f"({z['kv_bytes'] / max(1, z['dense_kv_bytes']):.2f} of dense)", file=sys.stderr)
    return 0


def cmd_train(args) -> int:
    if args.init and args.what not in ("tokenizer", "ar", "seed-tokenizer", "seed-decoder"):
        raise SystemExit(f"error: --init starts a tokenizer, AR, seed-tokenizer or seed-decoder run from trained "
                         f"weights; mmgen train {args.what} does not take it (--resume continues a run)")
    if args.what != "ar" and args.precision != "no":
        raise SystemExit("error: --precision is for mmgen train ar")
    if args.what != "ar" and args.profile:
        raise SystemExit("error: --profile is for mmgen train ar")
    if args.what not in ("ar", "tokenizer") and args.time_schedule:
        raise SystemExit("error: --time-schedule is for mmgen train ar or tokenizer")
    if args.data_workers and (args.what not in ("tokenizer", "ar") or args.data):
        raise SystemExit("error: --data-workers renders the world for mmgen train tokenizer or ar "
                         "(not with --data, which reads a folder)")
    if args.what == "dd":
        from mmgen.train.dd import train_dd

        if not args.teacher:
            raise SystemExit("error: mmgen train dd needs --teacher CHECKPOINT")
        path = train_dd(args.teacher, args.output, pairs=args.pairs, steps=args.steps or 1500, resume=args.resume,
                        seed=args.seed or 0, max_minutes=args.max_minutes)
        print(path)
        return 0
    if not args.recipe:
        raise SystemExit(f"error: mmgen train {args.what} needs --recipe FILE")
    if args.what in ("clip", "seed-tokenizer", "seed-decoder"):
        from mmgen.train import seed as seed_train

        if args.what == "clip":
            path = seed_train.train_clip(args.recipe, args.output, steps=args.steps, resume=args.resume,
                                         max_minutes=args.max_minutes)
        elif args.what == "seed-tokenizer":
            if not args.clip:
                raise SystemExit("error: mmgen train seed-tokenizer needs --clip DIR (a trained CLIP)")
            path = seed_train.train_seed_tokenizer(args.recipe, args.clip, args.output, steps=args.steps,
                                                   resume=args.resume, max_minutes=args.max_minutes,
                                                   init=args.init)
        else:
            if not (args.tokenizer and args.vae):
                raise SystemExit("error: mmgen train seed-decoder needs --tokenizer DIR (SEED) and --vae DIR "
                                 "(the image autoencoder whose latents it diffuses)")
            path = seed_train.train_seed_decoder(args.recipe, args.tokenizer, args.vae, args.output,
                                                 steps=args.steps, resume=args.resume, max_minutes=args.max_minutes,
                                                 init=args.init)
        print(path)
        return 0
    if args.what == "tokenizer":
        from mmgen.train.tokenizer import train_tokenizer

        path = train_tokenizer(args.recipe, args.output, steps=args.steps, resume=args.resume, data=args.data,
                               seed=args.seed, max_minutes=args.max_minutes, init=args.init,
                               data_workers=args.data_workers, time_schedule=args.time_schedule)
    else:
        from mmgen.train.ar import train_ar

        if not args.tokenizer:
            raise SystemExit("error: mmgen train ar needs --tokenizer DIR")
        path = train_ar(args.recipe, args.tokenizer, args.output, steps=args.steps, resume=args.resume,
                        data=args.data, seed=args.seed, max_minutes=args.max_minutes, init=args.init,
                        data_workers=args.data_workers, precision=args.precision,
                        time_schedule=args.time_schedule, profile=args.profile)
    print(path)
    return 0


def cmd_eval_text(args) -> int:
    from mmgen.eval import text_eval
    from mmgen.eval.text_run import TEXT_EVAL_SEED, evaluate_reconstruction, evaluate_text_to_image
    from mmgen.pipelines.text_to_image import TextToImagePipeline, load_tokenizer

    if not text_eval.have_tesseract():
        raise ValueError("text-eval needs the tesseract binary (Debian: tesseract-ocr tesseract-ocr-eng; make setup)")
    if args.sampler != "ar" or args.negative_prompt:
        raise ValueError("mmgen eval text runs the AR sampler without a negative prompt; "
                         "drop --sampler/--negative-prompt")
    checkpoint = args.checkpoint or "checkpoints/text"
    # a tokenizer folder alone (config.json, no model_index.json): its reconstructions only
    folder = Path(checkpoint)
    tokenizer_only = (folder / "config.json").is_file() and not (folder / "model_index.json").is_file()
    if tokenizer_only:
        pipe, tokenizer = None, load_tokenizer(checkpoint)
        if args.image_size is not None:
            tokenizer = tokenizer.at_image_size(args.image_size)
    elif args.image_size is not None:
        raise ValueError("--image-size resizes a tokenizer folder alone; a checkpoint generates at the size its "
                         "model was trained for")
    else:
        pipe = TextToImagePipeline.from_pretrained(checkpoint)
        tokenizer = pipe.tokenizer
    if tokenizer_only and args.scenes_seed is not None:
        raise ValueError("--scenes-seed draws the text-to-image scenes; a tokenizer folder alone has none "
                         "(its reconstructions use text-eval's own scenes)")
    canvas = tokenizer.config.image_size
    report = {"checkpoint": checkpoint, "canvas": canvas,
              "ceiling": text_eval.ceiling(n=args.n * 2, canvas=canvas),
              "reconstruction": evaluate_reconstruction(tokenizer, n=args.n, progress=not args.quiet)}
    sampling = dict(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, plausibility=args.plausibility,
                    cfg_schedule=args.cfg_schedule, zipvl_tau=args.zipvl_tau, kv_bits=args.kv_bits,
                    candidates=args.candidates)
    if pipe is not None:
        scenes_seed = TEXT_EVAL_SEED if args.scenes_seed is None else args.scenes_seed
        report["text_to_image"] = evaluate_text_to_image(pipe, n=args.n, seed=args.seed, progress=not args.quiet,
                                                         scenes_seed=scenes_seed, **sampling)
        report["text_to_image"]["scenes_seed"] = scenes_seed
    text = json.dumps(report, indent=2)
    print(text, flush=True)  # first: a failing write must not lose the evaluation
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_eval(args) -> int:
    if args.what == "text":
        return cmd_eval_text(args)
    if args.image_size is not None or args.scenes_seed is not None:
        raise ValueError("--image-size and --scenes-seed are for mmgen eval text")
    from mmgen.eval import shapes_eval
    from mmgen.eval.shapes_run import evaluate_reconstruction, evaluate_text_to_image
    from mmgen.pipelines.text_to_image import TextToImagePipeline

    if args.negative_prompt:
        raise ValueError("mmgen eval shapes scores each scene's own caption; --negative-prompt is not taken here")
    args.checkpoint = args.checkpoint or _default_checkpoint()
    pipe = TextToImagePipeline.from_pretrained(args.checkpoint)
    report = {"checkpoint": args.checkpoint,
              "ceiling": shapes_eval.ceiling(n=args.n * 3)["score"],
              "reconstruction": evaluate_reconstruction(pipe.tokenizer, n=args.n, progress=not args.quiet)}
    sampling = dict(guidance_scale=args.guidance_scale, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, min_p=args.min_p, plausibility=args.plausibility,
                    cfg_schedule=args.cfg_schedule, sampler=args.sampler, steps=args.steps,
                    zipvl_tau=args.zipvl_tau, kv_bits=args.kv_bits,
                    candidates=args.candidates)
    for ps in args.prompt_sets:
        report[ps] = evaluate_text_to_image(pipe, ps, n=args.n, seed=args.seed, progress=not args.quiet, **sampling)
    if "see" in pipe.tasks:  # the model also writes captions: captioning accuracy on fresh world images
        from mmgen.eval.caption import evaluate_captions
        from mmgen.pipelines.image_to_text import ImageToTextPipeline

        report["captions"] = evaluate_captions(ImageToTextPipeline.from_text_to_image(pipe),
                                               n=args.n, progress=not args.quiet)
    extra = ("sampler", "steps", "zipvl_tau", "kv_bits", "candidates")
    report["sampling"] = {**pipe.options(**{k: v for k, v in sampling.items() if k not in extra}).__dict__,
                          **{k: sampling[k] for k in extra}}
    report["sampling"]["candidates"] = pipe.candidates if args.candidates is None else args.candidates  # checked
    text = json.dumps(report, indent=2)
    print(text, flush=True)  # first: a failing write must not lose the evaluation
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def cmd_pack(args) -> int:
    """Copy a trained pipeline folder into a shippable checkpoint (fp16 weights by default)."""
    import torch

    from mmgen.pipelines.text_to_image import TextToImagePipeline, load_tokenizer
    from mmgen.sampling.ar import SamplingOptions

    given = {}
    if args.defaults:  # checked before anything loads
        try:
            given = json.loads(args.defaults)
            SamplingOptions.from_dict({**SamplingOptions().__dict__, **given} if isinstance(given, dict) else given,
                                      "--defaults")
        except json.JSONDecodeError as err:
            raise SystemExit(f"error: --defaults is not JSON: {err}") from None
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
    if args.pipeline is None:  # a tokenizer alone, e.g. a text tokenizer before any model is trained over it
        if args.seed_decoder:
            raise SystemExit("error: --seed-decoder goes with --pipeline DIR (a model over a SEED tokenizer)")
        if not args.tokenizer or args.defaults:
            raise SystemExit("error: mmgen pack needs --pipeline DIR, or --tokenizer DIR alone (no --defaults) "
                             "to pack a tokenizer by itself")
        load_tokenizer(args.tokenizer).save_pretrained(args.output, dtype=None if args.fp32 else torch.float16)
        print(args.output)
        return 0
    pipe = TextToImagePipeline.from_pretrained(args.pipeline)
    if args.tokenizer:  # e.g. the SEED tokenizer once its diffusion decoder is trained: same codes, new decoder
        from mmgen.tokenizers.base import CheckpointError

        new = load_tokenizer(args.tokenizer)
        old = pipe.tokenizer.code_vectors()
        if new.code_vectors().shape != old.shape or not torch.allclose(new.code_vectors(), old, atol=1e-3):
            raise CheckpointError(f"{args.tokenizer} has another codebook than the pipeline's tokenizer: "
                                  "the model's ids would mean other things")
        pipe.tokenizer = new.eval()
    if args.seed_decoder:
        from mmgen.tokenizers.seed import SEEDTokenizer
        from mmgen.train.seed import attach_decoder

        if not isinstance(pipe.tokenizer, SEEDTokenizer):
            raise SystemExit(f"error: --seed-decoder needs a pipeline over a SEED tokenizer, not "
                             f"{type(pipe.tokenizer).__name__}")
        pipe.tokenizer = attach_decoder(pipe.tokenizer, args.seed_decoder)
    if args.defaults:
        pipe.defaults = SamplingOptions.from_dict({**pipe.defaults, **given}, "--defaults").__dict__
    judge = pipe.judge
    if args.judge == "own":  # a SEED tokenizer's vision tower judges the drawings
        judge = getattr(pipe.tokenizer, "clip", None)
        if judge is None:
            raise SystemExit("error: --judge own needs a tokenizer with its own CLIP (SEED)")
    elif args.judge:
        from mmgen.tokenizers.clip_shapes import ShapesCLIP

        judge = ShapesCLIP.from_pretrained(args.judge)
    if args.judge or args.candidates is not None:  # a new judge keeps 4 candidates unless told otherwise
        pipe.set_judge(judge, args.candidates if args.candidates is not None else 4 if args.judge else pipe.candidates)
    pipe.save_pretrained(args.output, dtype=None if args.fp32 else torch.float16)
    print(args.output)
    return 0


CAPTION_CHECKPOINT = str(Path(__file__).resolve().parents[1] / "checkpoints" / "seed")


def cmd_caption(args) -> int:
    import torch
    from PIL import Image

    from mmgen.pipelines.image_to_text import ImageToTextPipeline

    images = []
    for name in args.images:
        try:
            images.append(Image.open(name).convert("RGB"))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read image {name}: {e}") from None
    if not Path(args.checkpoint, "model_index.json").is_file() and args.checkpoint == CAPTION_CHECKPOINT:
        raise SystemExit(f"error: no captioning checkpoint at {args.checkpoint} (it ships with the repository; "
                         "docs/seed.md builds one): pass --checkpoint DIR")
    pipe = ImageToTextPipeline.from_pretrained(args.checkpoint)
    size = pipe.tokenizer.config.image_size
    wrong = [n for n, im in zip(args.images, images) if im.size != (size, size)]
    if wrong and not args.resize:
        raise SystemExit(f"error: this checkpoint reads {size}x{size} images; {wrong[0]} is "
                         f"{images[args.images.index(wrong[0])].size[0]}x{images[args.images.index(wrong[0])].size[1]} "
                         "(pass --resize to scale it)")
    images = [im.resize((size, size), Image.BICUBIC) if im.size != (size, size) else im for im in images]
    gen = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    for start in range(0, len(images), args.batch_size):
        out = pipe(images[start:start + args.batch_size], temperature=args.temperature, generator=gen,
                   beams=args.beams, rerank=args.rerank, mirror=args.mirror)
        for name, caption in zip(args.images[start:start + args.batch_size], out.captions):
            caption = "".join(c if c.isprintable() else "\ufffd" for c in caption)  # one line per image
            print(f"{name}\t{caption}" if args.with_names else caption)
    return 0


def cmd_studio(argv: list[str]) -> int:
    """Start the Gradio studio (apps/studio.py of this checkout; needs the 'studio' extra)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "apps" / "studio.py"
    if not path.is_file():
        raise SystemExit(f"error: the studio lives in apps/studio.py of an mmgen checkout; {path} is missing")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("error: the studio needs gradio: pip install -e '.[studio]'") from None
    spec = importlib.util.spec_from_file_location("mmgen_studio_app", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmgen", description="mmgen: multimodal autoregressive generation.")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    im = sub.add_parser("image", help="text -> image", description=(
        "Write images for a prompt with a text-to-image checkpoint. Examples:\n"
        "  mmgen image 'a large red circle at the top left on a black background' -o x.png\n"
        "  mmgen image 'a small blue star in the center on a white background' -n 4 --seed 1 -o out/\n"
        "  mmgen image --prompts-file prompts.txt -o out/   (writes out/000.png, out/001.png, ...)"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    im.add_argument("prompt", nargs="?", help="what to draw")
    im.add_argument("--prompts-file", help="one prompt per line; one image per prompt, in line order")
    im.add_argument("-n", "--num-images", type=int, default=1, help="images per prompt (default 1)")
    im.add_argument("--seed", type=int, help="random seed (default: random, printed); image k uses seed + k")
    im.add_argument("-o", "--output", help="a .png file, or a directory (default: outputs/)")
    im.add_argument("--checkpoint", default=_default_checkpoint(), help="checkpoint folder (default: the shipped shapes one)")
    im.add_argument("--batch-size", type=int, default=16, help="images generated together (default 16)")
    im.add_argument("-q", "--quiet", action="store_true", help="print only the written paths")
    im.add_argument("--init-image", metavar="PNG", help="continue this image: keep its top token rows, write the rest")
    im.add_argument("--keep-rows", type=int, help="(--init-image) token rows kept from the top (default: half)")
    _add_sampling_args(im)
    im.set_defaults(func=cmd_image)

    tr = sub.add_parser("train", help="train a tokenizer, the AR transformer, or a Distilled Decoding student",
                        description=(
        "  mmgen train tokenizer --recipe tokenizers/vq_image.yaml --output runs/vq_image\n"
        "  mmgen train ar --recipe recipes/shapes_ar.yaml --tokenizer runs/vq_image/tokenizer --output runs/ar\n"
        "  mmgen train dd --teacher checkpoints/shapes --output runs/dd   (teacher pairs, then the student)\n"
        "SEED (see docs/seed.md):\n"
        "  mmgen train clip --recipe tokenizers/clip_shapes.yaml --output runs/clip\n"
        "  mmgen train seed-tokenizer --recipe tokenizers/seed.yaml --clip runs/clip/clip --output runs/seed_tok\n"
        "  mmgen train seed-decoder --recipe tokenizers/seed_decoder.yaml --tokenizer runs/seed_tok/tokenizer \\\n"
        "      --vae checkpoints/shapes/tokenizer --output runs/seed_dec\n"
        "  mmgen train ar --recipe recipes/seed_ar.yaml --tokenizer runs/seed_tok/tokenizer --output runs/seed_ar"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    tr.add_argument("what", choices=("tokenizer", "ar", "dd", "clip", "seed-tokenizer", "seed-decoder"))
    tr.add_argument("--recipe", help="YAML recipe (tokenizers/*.yaml or recipes/*.yaml); not for dd")
    tr.add_argument("--output", required=True, help="run folder: train_state/, metrics.jsonl, the result")
    tr.add_argument("--tokenizer", help="(ar, seed-decoder) trained tokenizer folder")
    tr.add_argument("--clip", help="(seed-tokenizer) the trained CLIP folder")
    tr.add_argument("--vae", help="(seed-decoder) the image autoencoder folder whose latent space it diffuses")
    tr.add_argument("--data", help="a folder of images with metadata.jsonl instead of the world")
    tr.add_argument("--steps", type=int, help="override the recipe's step count (dd: student steps, default 1500)")
    tr.add_argument("--seed", type=int, help="override the recipe's seed")
    tr.add_argument("--max-minutes", type=float, help="stop and save after this many minutes of wall clock")
    tr.add_argument("--teacher", help="(dd) the text-to-image checkpoint to distil")
    tr.add_argument("--pairs", type=int, default=4096, help="(dd) teacher (prompt, noise, tokens) pairs (default 4096)")
    tr.add_argument("--data-workers", type=int, default=0, metavar="N",
                    help="(tokenizer, ar) render the world in N processes, for an accelerator one CPU process "
                         "cannot feed (default 0: in the training process)")
    tr.add_argument("--precision", choices=("no", "bf16"), default="no",
                    help="(ar) no: fp32 (default; on this CPU bf16 runs several times slower); bf16: autocast, "
                         "for a GPU")
    tr.add_argument("--profile", action="store_true",
                    help="(ar) profile five steps after the tenth with torch.profiler: operator times in "
                         "OUTPUT/profile.txt (metrics.jsonl always has data_wait_s, the host's wait for batches)")
    tr.add_argument("--time-schedule", action="store_true",
                    help="(ar, tokenizer) spread the cosine learning rate over --max-minutes as well as --steps, "
                         "whichever is further along, so a run the clock stops after its warm-up ends annealed "
                         "(not with --resume)")
    tr.add_argument("--resume", action="store_true", help="continue from output/train_state")
    tr.add_argument("--init", metavar="DIR", help="(tokenizer) start from this trained tokenizer's weights, e.g. "
                    "checkpoints/text_tokenizer; (seed-decoder) from this SEED tokenizer's decoder, e.g. "
                    "checkpoints/seed/tokenizer; (seed-tokenizer) from this SEED tokenizer's own weights, also when "
                    "the recipe adds clip_crops; (ar) from this pipeline's model weights, e.g. a 256x256 run for "
                    "recipes/text_ar_512_ts4.yaml (fresh optimizer and schedule; the recipe must match it, but an ar "
                    "recipe may add glyph_head or byte_index and a tokenizer recipe decoder_context, which start "
                    "fresh, and change decoder_padding)")
    tr.set_defaults(func=cmd_train)

    cp = sub.add_parser("caption", help="image -> text (SEED checkpoints: the model that draws also sees)",
                        description="Print one caption per image, in order.\n"
                        "  mmgen caption a.png b.png --checkpoint checkpoints/seed",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cp.add_argument("images", nargs="+", help="image files (64x64 for the shipped SEED checkpoint)")
    cp.add_argument("--checkpoint", default=CAPTION_CHECKPOINT,
                    help="a checkpoint trained on both directions (default: checkpoints/seed; "
                         "docs/seed.md builds one)")
    cp.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0 samples")
    cp.add_argument("--seed", type=int, help="seed for sampling (with --temperature > 0)")
    cp.add_argument("--beams", type=int, default=None,
                    help="1: greedy; N > 1: beam search over N captions (default: the checkpoint's "
                         "caption_defaults; checkpoints/seed: 8)")
    cp.add_argument("--rerank", type=float, default=None,
                    help="0: the most likely of the beam's captions; W > 0: the one maximising "
                         "log p(caption | image) + W log p(image | caption), the second read by the same model "
                         "drawing (noisy-channel reranking; default: the checkpoint's; checkpoints/seed: 1)")
    cp.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                    help="also caption the left-right mirrored image and score every candidate in both views "
                         "(shapes world; default: the checkpoint's; checkpoints/seed: on)")
    cp.add_argument("--batch-size", type=int, default=32, help="images per forward batch (default 32)")
    cp.add_argument("--resize", action="store_true", help="scale images of another size to the checkpoint's")
    cp.add_argument("--with-names", action="store_true", help="print FILE<TAB>caption")
    cp.set_defaults(func=cmd_caption)

    ev = sub.add_parser("eval", help="evaluate a checkpoint")
    ev.add_argument("what", choices=("shapes", "text"),
                    help="shapes: shapes-eval (plus captioning accuracy when the checkpoint also sees, e.g. "
                         "checkpoints/seed); text: text-eval (OCR CER short/long, colour, alignment, OCR ceiling); "
                         "each on reconstructions and text-to-image")
    ev.add_argument("--checkpoint", help="checkpoint folder (default: checkpoints/shapes, or checkpoints/text); "
                    "text also takes a tokenizer folder alone (e.g. checkpoints/text_tokenizer): reconstructions only")
    ev.add_argument("--n", type=int, default=50, help="shapes: prompts per object count and prompt set; text: short "
                    "and long scenes each (default 50)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--scenes-seed", type=int, help="(text) draw the text-to-image scenes from this seed "
                    "(default: text-eval's own, 900201, the one figures are reported on; another far from the "
                    "training streams' seeds, e.g. 950001, to choose sampling settings on other scenes)")
    ev.add_argument("--image-size", type=int, help="(text, a tokenizer folder alone) measure it on NxN pages "
                    "instead of its training canvas, e.g. 512 (its convolutional weights serve any multiple of "
                    "its downsampling)")
    ev.add_argument("--prompt-sets", nargs="+", default=["canonical", "paraphrase_held_out"],
                    choices=["canonical", "paraphrase_held_out", "held_out_wording", "held_out_combos"],
                    help="canonical captions; held-out wording on held-out colour-shape pairs (default: both); "
                         "the diagnostic sets held_out_wording and held_out_combos take the second apart")
    ev.add_argument("--json", help="also write the report here")
    ev.add_argument("-q", "--quiet", action="store_true")
    _add_sampling_args(ev)
    ev.set_defaults(func=cmd_eval)

    pk = sub.add_parser("pack", help="turn a trained pipeline folder (or a tokenizer alone) into a shippable "
                                     "checkpoint")
    pk.add_argument("--pipeline", help="a trained pipeline folder (runs/NAME/pipeline)")
    pk.add_argument("--output", required=True)
    pk.add_argument("--defaults", help='JSON of sampling defaults, e.g. \'{"guidance_scale": 3}\'')
    pk.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16)")
    pk.add_argument("--judge", metavar="DIR|own",
                    help="a CLIP folder (mmgen train clip) that reranks the drawings, or 'own': the SEED tokenizer's "
                         "CLIP (CLIP reranking; see --candidates)")
    pk.add_argument("--candidates", type=int, metavar="K",
                    help="draws an image by default, the judge's best kept (default with --judge: 4; 1 = off)")
    pk.add_argument("--tokenizer", help="with --pipeline: replace the tokenizer by this one with the same codebook "
                                        "(e.g. SEED with its trained diffusion decoder); alone: pack this tokenizer "
                                        "folder by itself (e.g. runs/binary_text/tokenizer)")
    pk.add_argument("--seed-decoder", metavar="DIR",
                    help="with --pipeline over a SEED tokenizer: take the trained diffusion decoder of this SEED "
                         "tokenizer folder as it is (e.g. checkpoints/seed/tokenizer, for a tokenizer whose stage 2 "
                         "ran on after its decoder was trained)")
    pk.set_defaults(func=cmd_pack)

    sub.add_parser("studio", help="the Gradio web studio (mmgen studio --help for its options)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if first is not None and argv[first] == "studio" and set(argv[:first]) <= {"-v", "--verbose"}:
        # the studio parses its own options
        if argv[:first]:
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        return cmd_studio(argv[first + 1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if getattr(args, "num_images", 1) is not None and getattr(args, "num_images", 1) < 1:
        parser.error("-n must be at least 1")
    if getattr(args, "batch_size", 1) < 1:
        parser.error("--batch-size must be at least 1")
    if args.command == "eval" and args.n < 1:
        parser.error("--n must be at least 1")
    if args.command == "eval" and args.json:  # checked before an evaluation that may take an hour
        target = Path(args.json)
        if target.is_dir() or not target.parent.is_dir():
            parser.error(f"--json {args.json}: not a file path in an existing folder")
    from mmgen.tokenizers.base import CheckpointError

    try:
        return args.func(args)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
