"""A small CLIP for the shapes world, built with open_clip: SEED's vision tower and the project's CLIP-score judge.

The architecture is a custom open_clip config (a ViT on 64x64 images with 8x8 patches and a small text
transformer) registered with open_clip under a name derived from the config, created with no pretrained
weights (``pretrained=None, pretrained_text=False``), so nothing is ever fetched. open_clip's own BPE
tokenizer (its vocabulary file ships inside the package) reads captions. Training is open_clip's
contrastive loss on shapes-world (image, caption) pairs; see ``mmgen.train.seed.train_clip``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmgen.tokenizers.base import CheckpointError, load_part, load_state_strict, save_part
from mmgen.tokenizers.vq_image import images_to_tensor

CLIP_CONFIGS = {
    "debug": {"embed_dim": 32,
              "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}},
    "base": {"embed_dim": 128,
             "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "head_width": 48, "patch_size": 8},
             "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}},
    # 4x4 patches (256 per image): a small object (about 11 px) spans about 3x3 patches instead of about 1.3x1.3,
    # so its outline reaches the features; width 128 keeps the step near base's cost.
    "p4": {"embed_dim": 128,
           "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 4},
           "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}},
}
_REGISTERED: dict[str, str] = {}


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


_CONFIG_DIR: Path | None = None


def register_config(model_cfg: dict) -> str:
    """Register an open_clip architecture config (once per process); returns the name open_clip knows it by."""
    global _CONFIG_DIR
    import open_clip

    for key in ("embed_dim", "vision_cfg", "text_cfg"):
        if key not in model_cfg:
            raise ValueError(f"open_clip config needs {key!r}")
    blob = json.dumps(model_cfg, sort_keys=True)
    name = "mmgen-clip-" + hashlib.sha1(blob.encode()).hexdigest()[:10]
    if name not in _REGISTERED:
        if _CONFIG_DIR is None:
            _CONFIG_DIR = Path(tempfile.mkdtemp(prefix="mmgen-open-clip-"))
        path = _CONFIG_DIR / f"{name}.json"
        path.write_text(blob)
        open_clip.add_model_config(path)
        _REGISTERED[name] = blob
    return name


def contrastive(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image embeddings (b, e) against text embeddings (b + m, e): the first b texts are the
    images' captions, any further ones extra negatives that only the image->text direction ranks."""
    b = img.shape[0]
    logits = scale * img @ txt.t()                                     # (b, b + m)
    target = torch.arange(b, device=img.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :b].t(), target)) / 2
    return loss, (logits.argmax(1) == target).float().mean()


def crop_boxes(image_size: int, crops: int) -> tuple[int, list[int]]:
    """The side of ``ShapesCLIP.crop_views``' crops and their starts along each axis: ``crops`` crops of
    2 / (crops + 1) of the side, evenly spread from edge to edge (half a crop apart)."""
    side = round(2 * image_size / (crops + 1))
    return side, [round(i * (image_size - side) / (crops - 1)) if crops > 1 else (image_size - side) // 2
                  for i in range(crops)]


class ShapesCLIP(nn.Module):
    """open_clip CLIP + its tokenizer. Images are (b, 3, 64, 64) in [0, 1] (or PIL), captions strings."""

    type_name = "open_clip_shapes"

    def __init__(self, model_cfg: dict):
        super().__init__()
        import open_clip

        self.model_cfg = json.loads(json.dumps(model_cfg))
        self.name = register_config(self.model_cfg)
        quiet = _DropMessage("No pretrained weights loaded")  # random init is the point: say nothing
        logging.getLogger().addFilter(quiet)
        try:
            self.model = open_clip.create_model(self.name, pretrained=None, pretrained_text=False)
        finally:
            logging.getLogger().removeFilter(quiet)
        self.model.visual.output_tokens = True
        self.tokenizer = open_clip.get_tokenizer(self.name)
        v = self.model_cfg["vision_cfg"]
        self.image_size = int(v["image_size"])
        self.feature_dim = int(v["width"])
        self.embed_dim = int(self.model_cfg["embed_dim"])

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def _images(self, images) -> torch.Tensor:
        """Images -> (b, 3, s, s) in [0, 1] on the CLIP's device; a clear error for another size."""
        x = images_to_tensor(images).to(self.device)
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this CLIP takes {self.image_size}x{self.image_size} images, got "
                             f"{x.shape[-1]}x{x.shape[-2]}")
        return x

    def _pixels(self, images) -> torch.Tensor:
        return self._images(images) * 2 - 1

    def image_features(self, images, class_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (patch token features (b, n_patches, width) after the final LayerNorm, image embedding (b, embed_dim)).
        With ``class_token`` the features start with the class token (after the same LayerNorm, before the
        projection), as BLIP-2's Q-Former sees every ViT output token: (b, 1 + n_patches, width)."""
        vis = self.model.visual
        if not class_token:
            pooled, tokens = vis(self._pixels(images))
            return tokens, pooled
        if vis.attn_pool is not None or vis.final_ln_after_pool or getattr(vis, "pool_type", "tok") != "tok":
            raise ValueError("class_token features need a ViT pooled by its class token")
        x = vis.ln_post(vis.transformer(vis._embeds(self._pixels(images))))
        pooled = x[:, 0] @ vis.proj if vis.proj is not None else x[:, 0]
        return x, pooled

    def crop_views(self, images, crops: int) -> torch.Tensor:
        """The image and ``crops`` x ``crops`` overlapping crops of it, each resized to the CLIP's input size:
        (b, 1 + crops^2, 3, s, s) in [0, 1]. A crop is 2 / (crops + 1) of the side, at a stride of half a crop,
        so every box up to a third of the crop's side (a shapes-world cell, for 2 or 3) lies whole in one crop;
        for 3 crops a side each is half the image, upsampled 2x. Bilinear with antialiasing off (it upsamples)."""
        x = self._images(images)
        if crops < 1:
            raise ValueError(f"crops must be at least 1, got {crops}")
        s = self.image_size
        side, starts = crop_boxes(s, crops)
        views = [x] + [F.interpolate(x[:, :, y:y + side, z:z + side], size=(s, s), mode="bilinear",
                                     align_corners=False) for y in starts for z in starts]
        return torch.stack(views, 1)

    def multicrop_features(self, images, crops: int, class_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_features`` of the image and of its ``crop_views``, the tokens of every view side by side:
        (b, (1 + crops^2) * tokens, width), and the whole image's embedding (b, embed_dim). The ViT is the
        same frozen one; a small object, upsampled with its crop, spans more patches. ``crops`` 0: the image
        alone."""
        if crops == 0:
            return self.image_features(images, class_token)
        v = self.crop_views(images, crops)
        b, n = v.shape[:2]
        tokens, pooled = self.image_features(v.flatten(0, 1), class_token)
        return tokens.reshape(b, n * tokens.shape[1], tokens.shape[2]), pooled.reshape(b, n, -1)[:, 0]

    def encode_image(self, images, normalize: bool = True) -> torch.Tensor:
        emb = self.image_features(images)[1]
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, captions, normalize: bool = True) -> torch.Tensor:
        if isinstance(captions, str):
            captions = [captions]
        if not captions or any(not isinstance(c, str) or not c.strip() for c in captions):
            raise ValueError("captions must be non-empty strings")
        ids = self.tokenizer(list(captions)).to(self.device)
        return self.model.encode_text(ids, normalize=normalize)

    def contrastive_loss(self, images, captions, negatives=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Symmetric InfoNCE over the batch (CLIP's loss); with ``negatives`` (one hard-negative caption per
        image) the image->text direction also has to rank its caption above every negative. Returns (loss,
        image->text top-1 accuracy)."""
        img = self.encode_image(images)
        txt = self.encode_text(list(captions) + list(negatives or []))
        return contrastive(img, txt, self.model.logit_scale.exp())

    def forward(self, images, captions, negatives=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Training entry (goes through forward so DistributedDataParallel syncs it): the contrastive loss."""
        return self.contrastive_loss(images, captions, negatives)

    @torch.no_grad()
    def clip_score(self, images, captions) -> torch.Tensor:
        """Cosine similarity of each image with its caption (b,): the CLIP-score judge."""
        return (self.encode_image(images) * self.encode_text(captions)).sum(-1)

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        save_part(directory, {"type": self.type_name, "open_clip_config": self.model_cfg}, self.state_dict(), dtype)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ShapesCLIP":
        cfg, state = load_part(directory, expected_type=cls.type_name)
        try:
            clip = cls(cfg["open_clip_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}/config.json describes no valid CLIP: {e}") from e
        load_state_strict(clip, state, str(Path(directory)))
        return clip.eval()
