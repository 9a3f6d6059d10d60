"""mmgen studio: the Gradio web app. Run ``mmgen studio`` (or ``python apps/studio.py``) and open the URL.

One tab per task that has a working checkpoint (text-to-image; image-to-text where a checkpoint's model also
sees, e.g. checkpoints/seed), plus a compare tab that runs the same prompt and seed under two settings side by
side. Every image comes from the same pipeline the CLI and the
Python API use; image k of a request is seeded ``seed + k``, so the studio, ``mmgen image --seed`` and the API
agree image for image.

Safe defaults: binds 127.0.0.1 (``--host``/``--port``, else GRADIO_SERVER_NAME / GRADIO_SERVER_PORT), no
share link unless ``--share``, a queue of bounded size that runs one generation at a time (two CPU cores:
more would only slow each request down), bounded prompts and image counts, and nothing served but the
images it made. Scripted use: the text-to-image event is ``api_name="generate_image"``, taking
``(prompt, seed, ...)`` and returning ``(image, gallery, record)``; captioning is ``api_name="caption_image"``,
taking ``(image, checkpoint)`` and returning the caption.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

import gradio as gr
import torch

from mmgen.pipelines.text_to_image import MAX_IMAGES_PER_CALL, TextToImagePipeline, read_index
from mmgen.sampling.ar import CFG_SCHEDULES
from mmgen.tokenizers.base import CheckpointError

log = logging.getLogger("mmgen.studio")
REPO = Path(__file__).resolve().parents[1]
MAX_PROMPT_CHARS = 400
MAX_IMAGES = 16
MAX_CANDIDATES = 16  # the studio's slider (the pipeline takes up to 64)
MAX_SEED = 2**31 - 1
QUEUE_SIZE = 64
SAMPLER_CHOICES = {"AR": ("ar", 1), "DD 1 step": ("dd", 1), "DD 2 steps": ("dd", 2)}
KV_BITS_CHOICES = ("4/2", "4/4", "8/4", "8/2", "16/16")


def find_checkpoints(root: Path = REPO / "checkpoints") -> list[str]:
    """Text-to-image checkpoint folders under root (those whose model_index.json names the pipeline)."""
    found = []
    for d in sorted(root.glob("*")) if root.is_dir() else []:
        try:
            if read_index(d).get("_class_name") == TextToImagePipeline.__name__:
                found.append(str(d))
        except CheckpointError:
            continue
    return found


class Studio:
    """Loads pipelines on first use (cached) and turns UI values into pipeline calls."""

    def __init__(self, checkpoints: list[str], allow_custom: bool = False, max_loaded: int = 4):
        if not checkpoints:
            raise CheckpointError("no text-to-image checkpoint found; pass --checkpoint DIR")
        self.checkpoints = checkpoints
        self.allow_custom = allow_custom  # off: only the checkpoints the studio was started with can load
        self.max_loaded = max_loaded
        self._allowed = {str(Path(c).resolve()) for c in checkpoints}
        self._pipes: dict[str, TextToImagePipeline] = {}
        self._load_lock = threading.Lock()
        self._lock = threading.Lock()  # one generation at a time; tokenizers are not safe to share across threads

    def pipeline(self, checkpoint: str) -> TextToImagePipeline:
        if not checkpoint or not str(checkpoint).strip():
            raise CheckpointError("choose a checkpoint")
        key = str(Path(checkpoint).resolve())
        if key not in self._allowed and not self.allow_custom:
            raise CheckpointError(f"{checkpoint} is not one of this studio's checkpoints (start the studio with "
                                  "--checkpoint DIR to add one)")
        with self._load_lock:
            if key not in self._pipes:
                if len(self._pipes) >= self.max_loaded:  # forget the oldest custom load
                    self._pipes.pop(next(iter(self._pipes)))
                self._pipes[key] = TextToImagePipeline.from_pretrained(checkpoint)
            return self._pipes[key]

    def captioners(self) -> list[str]:
        """The checkpoints whose model also writes captions (model_index.json lists the "see" task)."""
        out = []
        for c in self.checkpoints:
            try:
                if "see" in read_index(c).get("tasks", []):
                    out.append(c)
            except CheckpointError:
                continue
        return out

    def caption(self, image, checkpoint: str) -> str:
        """One caption for one image; raises gr.Error with a readable message."""
        from mmgen.pipelines.image_to_text import ImageToTextPipeline

        try:
            if image is None:
                raise ValueError("upload an image first")
            with self._lock:
                pipe = self.pipeline(checkpoint)
                size = pipe.tokenizer.config.image_size
                if image.size != (size, size):
                    raise ValueError(f"this checkpoint reads {size}x{size} images, got {image.size[0]}x{image.size[1]}")
                return ImageToTextPipeline.from_text_to_image(pipe)([image.convert("RGB")]).captions[0]
        except (CheckpointError, ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:
            log.exception("captioning failed")
            raise gr.Error(f"captioning failed: {type(e).__name__}: {e}") from None

    def samplers(self, checkpoint: str) -> list[str]:
        """Sampler choices the checkpoint supports (Distilled Decoding only where it ships a student)."""
        try:
            has_student = self.pipeline(checkpoint).student is not None
        except Exception:  # the describe() text next to it says what is wrong
            has_student = False
        return list(SAMPLER_CHOICES) if has_student else ["AR"]

    def candidates(self, checkpoint: str) -> int:
        """The checkpoint's default number of candidates (1 where it has no judge or does not load)."""
        try:
            return self.pipeline(checkpoint).candidates
        except Exception:  # the describe() text next to it says what is wrong
            return 1

    def describe(self, checkpoint: str) -> str:
        try:
            pipe = self.pipeline(checkpoint)
        except Exception as e:  # shown in the page; the server keeps serving
            return f"**Checkpoint problem:** {e}"
        m, t = pipe.model, pipe.tokenizer
        k = m.tokens_per_step
        shuffle = (f"Token-Shuffle window {m.config.shuffle_window} ({k} tokens per forward pass)" if k > 1
                   else "Token-Shuffle off (one token per forward pass)")
        d = pipe.defaults
        dd = ("; a Distilled Decoding student (1 or 2 forward passes per image batch)" if pipe.student is not None
              else "")
        return (f"`{checkpoint}`: {m.num_parameters() / 1e6:.2f} M-parameter transformer, {t.layout.num_tokens} "
                f"image tokens from a {t.vocab_size}-code tokenizer; {shuffle}{dd}. Checkpoint defaults: guidance "
                f"{d['guidance_scale']}, temperature {d['temperature']}, top-k {d['top_k']}, top-p {d['top_p']}, "
                f"min-p {d.get('min_p', 0.0)}, plausibility {d.get('plausibility', 0.0)}; "
                + (f"CLIP reranking: the judge's best of {pipe.candidates} draws." if pipe.judge is not None
                   else "no judge CLIP (one draw per image)."))

    def generate(self, prompt, seed, checkpoint, num_images, guidance_scale, temperature, top_k, top_p,
                 cfg_schedule, sampler="AR", zipvl_tau=0.0, kv_bits="4/2", min_p=None, plausibility=None,
                 candidates=None):
        """Returns (first image, [(image, caption)], record dict); raises gr.Error with a readable message."""
        try:
            prompt = _check_prompt(prompt)
            seed = _int_in("seed", seed, 0, MAX_SEED)
            n = _int_in("number of images", num_images, 1, min(MAX_IMAGES, MAX_IMAGES_PER_CALL))
            with self._lock:
                pipe = self.pipeline(checkpoint)
                sampling = pipe.options(guidance_scale=_num("guidance", guidance_scale),
                                        temperature=_num("temperature", temperature),
                                        top_k=_int_in("top-k", top_k, 0, 1_000_000),
                                        top_p=_num("top-p", top_p), cfg_schedule=cfg_schedule or None,
                                        min_p=None if min_p is None else _num("min-p", min_p),
                                        plausibility=None if plausibility is None else _num("plausibility",
                                                                                            plausibility))
                if sampler not in SAMPLER_CHOICES:
                    raise ValueError(f"sampler must be one of {list(SAMPLER_CHOICES)}, got {sampler!r}")
                kind, steps = SAMPLER_CHOICES[sampler]
                tau = _num("ZipVL tau", zipvl_tau or 0.0)
                zipvl = dict(zipvl_tau=tau, kv_bits=kv_bits or "4/2") if tau > 0 else {}
                if zipvl and kind != "ar":
                    raise ValueError("ZipVL works with the AR sampler: set ZipVL tau to 0 for DD")
                gens = [torch.Generator().manual_seed(seed + k) for k in range(n)]
                k = None if candidates is None else _int_in("candidates", candidates, 1, MAX_CANDIDATES)
                out = pipe(prompt, num_images=n, generator=gens, progress=True, sampler=kind, steps=steps,
                           candidates=k, **sampling.__dict__, **zipvl)
        except (CheckpointError, ValueError, OSError, KeyError) as e:
            raise gr.Error(str(e)) from None
        except Exception as e:  # an unexpected failure: logged in full, reported briefly, server keeps serving
            log.exception("generation failed")
            raise gr.Error(f"generation failed: {type(e).__name__}: {e}") from None
        record = {"checkpoint": checkpoint, "seed": seed, **out.record, **{f"option_{k}": v for k, v in
                                                                        sampling.__dict__.items()}}
        record["unread_words"] = pipe.text_encoder.unread_words(prompt)  # what reached the model as [UNK]
        if record["unread_words"]:
            gr.Warning(f"the text encoder cannot read {', '.join(map(repr, record['unread_words']))}: "
                       "the model saw an unknown word there")
        gallery = [(img, f"seed {seed + k}") for k, img in enumerate(out.images)]
        return out.images[0], gallery, record


def _check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe what to draw")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt has {len(prompt)} characters; the studio takes at most {MAX_PROMPT_CHARS}")
    return prompt.strip()


def _num(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return v


def _int_in(name: str, value, lo: int, hi: int) -> int:
    v = _num(name, value)
    if v != int(v) or not lo <= v <= hi:
        raise ValueError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    return int(v)


def _examples_file() -> list[str]:
    f = REPO / "examples" / "shapes_prompts.txt"
    return [line.strip() for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def build_app(checkpoints: list[str] | None = None, allow_custom: bool = False) -> gr.Blocks:
    studio = Studio(checkpoints if checkpoints is not None else find_checkpoints(), allow_custom)
    first = studio.checkpoints[0]
    defaults = studio.pipeline(first).defaults

    def settings(prefix: str = ""):
        with gr.Row():
            ckpt = gr.Dropdown(studio.checkpoints, value=first, label=f"{prefix}checkpoint",
                               allow_custom_value=studio.allow_custom,
                               info=("a checkpoint, or type the path of your own" if studio.allow_custom
                                     else "the checkpoints this studio was started with"))
            n = gr.Slider(1, MAX_IMAGES, value=1, step=1, label=f"{prefix}number of images")
        with gr.Row():
            guidance = gr.Slider(0, 20, value=defaults["guidance_scale"], step=0.1, label=f"{prefix}guidance scale",
                                 info="classifier-free guidance (1 = off)")
            schedule = gr.Radio(list(CFG_SCHEDULES), value=defaults.get("cfg_schedule", "constant"),
                                label=f"{prefix}guidance schedule", info="linear: ramps up with the token index")
            plausibility = gr.Slider(0, 0.95, value=defaults.get("plausibility", 0.0), step=0.01,
                                     label=f"{prefix}guidance plausibility",
                                     info="0 = off; with guidance, only tokens at least this x as likely as the "
                                          "best one under the prompt alone")
        with gr.Row():
            temperature = gr.Slider(0.05, 5, value=defaults["temperature"], step=0.05, label=f"{prefix}temperature")
            top_k = gr.Slider(0, 1024, value=defaults["top_k"], step=1, label=f"{prefix}top-k", info="0 = off")
            top_p = gr.Slider(0.05, 1, value=defaults["top_p"], step=0.01, label=f"{prefix}top-p", info="1 = off")
            min_p = gr.Slider(0, 0.95, value=defaults.get("min_p", 0.0), step=0.01, label=f"{prefix}min-p",
                              info="0 = off; drops tokens below min-p x the most likely one")
        sampler = gr.Radio(studio.samplers(first), value="AR", label=f"{prefix}sampler",
                           info="AR: one forward pass per token (window); DD: the distilled student, 1 or 2 passes")
        ckpt.change(lambda c: gr.update(choices=studio.samplers(c), value="AR"), ckpt, sampler,
                    api_visibility="private")
        with gr.Row():
            zipvl_tau = gr.Slider(0, 1, value=0, step=0.005, label=f"{prefix}ZipVL tau",
                                  info="0 = off; e.g. 0.975: prefill with the tokens holding that share of attention")
            kv_bits = gr.Dropdown(list(KV_BITS_CHOICES), value="4/2", label=f"{prefix}ZipVL KV bits",
                                  info="important / other tokens")
        candidates = gr.Slider(1, MAX_CANDIDATES, value=studio.candidates(first), step=1,
                               label=f"{prefix}candidates",
                               info="CLIP reranking: draw this many images for each one shown and keep the one the "
                                    "checkpoint's judge CLIP finds closest to the prompt (1 = off)")
        ckpt.change(lambda c: gr.update(value=studio.candidates(c)), ckpt, candidates, api_visibility="private")
        return (ckpt, n, guidance, temperature, top_k, top_p, schedule, sampler, zipvl_tau, kv_bits, min_p,
                plausibility, candidates)

    def run(prompt, seed, ckpt, n, guidance, temperature, top_k, top_p, schedule, sampler, zipvl_tau=0.0,
            kv_bits="4/2", min_p=None, plausibility=None, candidates=None, progress=gr.Progress(track_tqdm=True)):
        return studio.generate(prompt, seed, ckpt, n, guidance, temperature, top_k, top_p, schedule, sampler,
                               zipvl_tau, kv_bits, min_p, plausibility, candidates)

    with gr.Blocks(title="mmgen studio", delete_cache=(3600, 3600)) as app:
        gr.Markdown("# mmgen studio\nOne autoregressive transformer writes image tokens; a tokenizer turns them "
                    "into pixels. The record beside each result says what the sampler did.")
        with gr.Tab("Text to image"):
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="prompt",
                                        placeholder="a large red circle at the top left on a black background")
                    seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed",
                                     info="image k uses seed + k, as mmgen image --seed does")
                    controls = settings()
                    info = gr.Markdown(studio.describe(first))
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    image = gr.Image(label="image", type="pil", format="png", elem_id="result", interactive=False,
                                     height=280)
                    gallery = gr.Gallery(label="all images", format="png", columns=4, elem_id="gallery")
                    record = gr.JSON(label="record", elem_id="record")
            gr.Examples([[p] for p in _examples_file()], inputs=[prompt], label="example prompts")
            controls[0].change(studio.describe, controls[0], info, api_visibility="private")
            inputs = [prompt, seed, *controls]
            button.click(run, inputs, [image, gallery, record], api_name="generate_image")
            prompt.submit(run, inputs, [image, gallery, record], api_visibility="private")

        seers = studio.captioners()
        if seers:
            with gr.Tab("Image to text"):
                gr.Markdown("The model that draws also sees: the image's SEED tokens, then a caption written byte "
                            "by byte (greedy).")
                with gr.Row():
                    with gr.Column():
                        cap_image = gr.Image(label="image", type="pil", elem_id="caption-image", height=200)
                        cap_ckpt = gr.Dropdown(seers, value=seers[0], label="checkpoint",
                                               allow_custom_value=allow_custom)
                        cap_button = gr.Button("Caption", variant="primary", elem_id="caption")
                    with gr.Column():
                        cap_text = gr.Textbox(label="caption", elem_id="caption-text", interactive=False)
                cap_button.click(studio.caption, [cap_image, cap_ckpt], cap_text, api_name="caption_image")

        with gr.Tab("Compare"):
            gr.Markdown("The same prompt and seed under two settings, side by side.")
            c_prompt = gr.Textbox(label="prompt", lines=2, max_length=MAX_PROMPT_CHARS, elem_id="compare-prompt",
                                  value="a large yellow star at the bottom right on a gray background")
            c_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="seed")
            with gr.Row():
                with gr.Column():
                    a = settings("A: ")
                    a_gallery = gr.Gallery(label="A", format="png", columns=4)
                    a_record = gr.JSON(label="A record")
                with gr.Column():
                    b = settings("B: ")
                    b_gallery = gr.Gallery(label="B", format="png", columns=4)
                    b_record = gr.JSON(label="B record")
            c_button = gr.Button("Compare", variant="primary", elem_id="compare")

            def compare(prompt, seed, *values, progress=gr.Progress(track_tqdm=True)):
                half = len(values) // 2
                _, ga, ra = studio.generate(prompt, seed, *values[:half])
                _, gb, rb = studio.generate(prompt, seed, *values[half:])
                return ga, ra, gb, rb

            c_button.click(compare, [c_prompt, c_seed, *a, *b], [a_gallery, a_record, b_gallery, b_record],
                           api_name="compare")
    app.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return app


def launch(app: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False,
           block: bool = True):
    host = host or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    port = port or int(os.environ.get("GRADIO_SERVER_PORT") or 7860)
    return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
                      show_error=True, max_file_size="1mb", footer_links=["api"], quiet=not block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mmgen studio", description=(
        "The mmgen web studio. Binds 127.0.0.1:7860 unless told otherwise (--host/--port, or the "
        "GRADIO_SERVER_NAME / GRADIO_SERVER_PORT environment variables when the flags are not given)."))
    p.add_argument("--host", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it to your network)")
    p.add_argument("--port", type=int, help="port (default 7860)")
    p.add_argument("--checkpoint", action="append",
                   help="text-to-image checkpoint folder (repeatable; default: every one under checkpoints/)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--allow-custom-checkpoints", action="store_true",
                   help="let users type any checkpoint folder on this machine (off: only --checkpoint folders)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        app = build_app(args.checkpoint, args.allow_custom_checkpoints)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    launch(app, args.host, args.port, args.share)
    return 0


if __name__ == "__main__":
    sys.exit(main())
