"""The text tokenizers the project ships load (safetensors only) and reconstruct the text world's pages well
enough to read: the figures of checkpoints/text_tokenizer/README.md, with a margin for other machines."""
from pathlib import Path

import numpy as np
import pytest

from mmgen.eval import text_eval
from mmgen.eval.text_run import eval_scenes
from mmgen.pipelines.text_to_image import load_tokenizer
from mmgen.tokenizers.vq_image import tensor_to_images

ROOT = Path(__file__).resolve().parents[1] / "checkpoints"
# folder -> (tokenizer type, least PSNR in dB, most mean CER on the four short scenes below); measured here
# 28.5 dB and CER 0.010 (binary, stage 2), 32.9 dB and 0.000 (patch VQ)
SHIPPED = {"text_tokenizer": ("binary_text", 27.0, 0.12),
           "text_tokenizer_vq": ("vq_image", 30.0, 0.10)}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_text_tokenizer_reads_back(name):
    folder = ROOT / name
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    kind, least_psnr, most_cer = SHIPPED[name]
    tok = load_tokenizer(folder)
    assert tok.type_name == kind and tok.layout.grid == (64, 64) and tok.vocab_size == 8192
    scenes = eval_scenes(4, 256)[:4]  # short scenes (1-2 lines) from the evaluation seed
    recon = tensor_to_images(tok.decode(tok.encode([s.image for s in scenes])))
    mse = np.mean([np.mean((np.asarray(a, float) - np.asarray(s.image, float)) ** 2) for a, s in zip(recon, scenes)])
    assert 10 * np.log10(255.0 ** 2 / mse) >= least_psnr
    if not text_eval.have_tesseract():
        pytest.skip("tesseract not installed (make setup installs it)")
    cer = np.mean([text_eval.cer(text_eval.ocr(im), s.text) for im, s in zip(recon, scenes)])
    assert cer <= most_cer
