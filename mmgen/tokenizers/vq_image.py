"""Patch VQ image tokenizer: a LlamaGen-style convolutional VQ autoencoder, sized for the shapes world.

Encoder (strided convs + residual blocks) -> 1x1 projection to the code dimension -> l2-normalised VQ ->
decoder (residual blocks + transposed convs). Differs from LlamaGen's VQGAN: no attention blocks, no GAN or
perceptual loss (none is trainable offline at this size), and normalisation is optional and per pixel
(``norm="channel"``: a LayerNorm over channels at each position, where VQGAN has GroupNorm, whose statistics
span the image and so differ between the 64x64 crops the text tokenizers train on and the full page they
encode); the loss is L1 + L2 with extra weight on edge pixels, which is what keeps small corners (stars,
crosses) sharp.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch import nn

from .base import CheckpointError, TokenLayout, Tokenizer, load_part, load_state_strict, save_part
from .quantizers import VectorQuantizer


@dataclass
class VQImageConfig:
    image_size: int = 64
    downsample: int = 4          # 2 ** number of strided stages
    channels: int = 32           # width at full resolution
    latent_channels: int = 64    # width at the lower resolutions
    res_blocks: int = 2          # residual blocks at the token resolution (encoder and decoder each)
    codebook_size: int = 1024
    code_dim: int = 8
    beta: float = 0.25
    norm: str = "none"           # "none" (the shipped shapes tokenizer) or "channel" (per-pixel LayerNorm)
    arch: str = "conv"           # "conv": strided convs (shapes); "patch": linear patch codec + residual convs (text)
    decoder_context: int = 0     # patch decoder only: width of the page summary that modulates it (PageContext)
    decoder_padding: str = "zeros"  # patch decoder only: its 3x3 convs pad with "zeros" or "replicate" (the page
    #                                 goes on past its border; zeros are grey in code and pixel space alike)

    def __post_init__(self):
        check_codec(self.arch, self.norm)
        if self.decoder_context < 0:
            raise ValueError(f"decoder_context must be 0 (none) or a width, got {self.decoder_context}")
        if self.decoder_padding not in ("zeros", "replicate"):
            raise ValueError(f"decoder_padding must be 'zeros' or 'replicate', got {self.decoder_padding!r}")
        for name, plain in (("decoder_context", 0), ("decoder_padding", "zeros")):
            if getattr(self, name) != plain and self.arch != "patch":
                raise ValueError(f"{name} needs arch 'patch' (the patch decoder), got arch {self.arch!r}")


NORMS = ("none", "channel")


class ChannelNorm(nn.Module):
    """LayerNorm over the channels of each pixel of a (b, c, h, w) map (ConvNeXt's channels-first LayerNorm):
    no statistic crosses positions, so a crop and the whole image see the same normalisation."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.LayerNorm(ch)

    def forward(self, x):
        return rearrange(self.norm(rearrange(x, "b c h w -> b h w c")), "b h w c -> b c h w")


def norm_act(ch: int, norm: str) -> nn.Sequential:
    """The normalisation (if any; the configs check ``norm``) and the SiLU that open every conv block."""
    return nn.Sequential(ChannelNorm(ch), nn.SiLU()) if norm == "channel" else nn.Sequential(nn.SiLU())


class ResBlock(nn.Module):
    def __init__(self, ch: int, norm: str = "none"):
        super().__init__()
        self.act1, self.act2 = norm_act(ch, norm), norm_act(ch, norm)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # starts as identity: deep stacks train from step one
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class Encoder(nn.Module):
    def __init__(self, c: VQImageConfig):
        super().__init__()
        stages = int(np.log2(c.downsample))
        layers: list[nn.Module] = [nn.Conv2d(3, c.channels, 3, padding=1)]
        ch = c.channels
        for i in range(stages):
            out = c.latent_channels
            layers += [norm_act(ch, c.norm), nn.Conv2d(ch, out, 4, stride=2, padding=1)]
            ch = out
            if i < stages - 1:
                layers.append(ResBlock(ch, c.norm))
        layers += [ResBlock(ch, c.norm) for _ in range(c.res_blocks)]
        layers += [norm_act(ch, c.norm), nn.Conv2d(ch, c.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (b, 3, H, W) in [-1, 1] -> (b, code_dim, H/ds, W/ds)
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, c: VQImageConfig):
        super().__init__()
        stages = int(np.log2(c.downsample))
        ch = c.latent_channels
        layers: list[nn.Module] = [nn.Conv2d(c.code_dim, ch, 3, padding=1)]
        layers += [ResBlock(ch, c.norm) for _ in range(c.res_blocks)]
        for i in range(stages):
            out = c.channels if i == stages - 1 else c.latent_channels
            layers += [norm_act(ch, c.norm), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]
            ch = out
            if i < stages - 1:
                layers.append(ResBlock(ch, c.norm))
        layers += [norm_act(ch, c.norm), nn.Conv2d(ch, ch, 3, padding=1), norm_act(ch, c.norm),
                   nn.Conv2d(ch, 3, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class PatchEncoder(nn.Module):
    """Space-to-depth (each downsample x downsample patch becomes one vector), a linear projection, residual
    conv blocks at the token resolution, a linear projection to the code dimension. The residual blocks start
    as identities, so at initialisation the encoder is linear: an autoencoder built from it starts as a
    PCA-like patch codec and learns from there (docs/ARCHITECTURE.md has the probes that led here: strided-conv
    text tokenizers sat at the background-only reconstruction for hundreds of steps)."""

    def __init__(self, c: VQImageConfig):
        super().__init__()
        d = c.latent_channels
        self.net = nn.Sequential(nn.PixelUnshuffle(c.downsample), nn.Conv2d(3 * c.downsample ** 2, d, 1),
                                 *[ResBlock(d, c.norm) for _ in range(c.res_blocks)], nn.Conv2d(d, c.code_dim, 1))

    def forward(self, x):  # (b, 3, H, W) in [-1, 1] -> (b, code_dim, H/ds, W/ds)
        return self.net(x)


class PageContext(nn.Module):
    """A summary of the whole image's codes that modulates the patch decoder (FiLM: a per-channel scale and
    shift of its features after the first conv and after each residual block). A patch decoder sees a few
    tokens around each patch; where the codes of a flat patch are the same for two backgrounds (the binary
    text tokenizer writes flat beige and flat white card with one id), only the rest of the page can tell
    them apart. The codes pass a 3x3 conv and a 1x1 conv, are pooled over the whole grid (mean and max), and
    a linear map, started at zero (so a decoder gains it unchanged), gives the scales and shifts."""

    def __init__(self, code_dim: int, width: int, channels: int, n_film: int):
        super().__init__()
        self.n_film = n_film
        self.embed = nn.Sequential(nn.Conv2d(code_dim, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, width, 1))
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(2 * width, 2 * channels * n_film))
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)

    def forward(self, z) -> list[tuple[torch.Tensor, torch.Tensor]]:
        e = self.embed(z)
        pooled = torch.cat([e.mean((2, 3)), e.amax((2, 3))], 1)  # (b, 2 * width)
        # one image at a time: a matmul's blocking depends on the batch, and an image must not
        s = torch.cat([self.film(row) for row in pooled.split(1)])
        s = rearrange(s, "b (n two c) -> n two b c 1 1", n=self.n_film, two=2)
        return [(1 + scale, shift) for scale, shift in s]


class PatchDecoder(nn.Module):
    """The PatchEncoder's mirror: a 3x3 conv from the codes (so a token sees its neighbours' codes), residual
    conv blocks, a linear projection to each patch's pixels and depth-to-space (a sub-pixel convolution: a
    transposed convolution whose kernel equals its stride), then one residual 3x3 conv block at full
    resolution, started at zero, that smooths the seams between patches. With ``decoder_context``, a
    ``PageContext`` modulates the features at the token resolution; ``decoder_padding: replicate`` pads every
    3x3 conv with its edge instead of zeros (zero padding left a pixel or two at the corners tens of levels off
    the card, which the text checks count as ink)."""

    def __init__(self, c: VQImageConfig):
        super().__init__()
        d, ch = c.latent_channels, c.channels
        self.net = nn.Sequential(nn.Conv2d(c.code_dim, d, 3, padding=1),
                                 *[ResBlock(d, c.norm) for _ in range(c.res_blocks)],
                                 nn.Conv2d(d, 3 * c.downsample ** 2, 1), nn.PixelShuffle(c.downsample))
        self.refine = nn.Sequential(nn.Conv2d(3, ch, 3, padding=1), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
        nn.init.zeros_(self.refine[-1].weight)
        nn.init.zeros_(self.refine[-1].bias)
        self.context = PageContext(c.code_dim, c.decoder_context, d, 1 + c.res_blocks) if c.decoder_context else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                m.padding_mode = c.decoder_padding

    def forward(self, z):
        films, x = (self.context(z) if self.context is not None else []), z
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i < len(films):  # after the first conv and each residual block
                scale, shift = films[i]
                x = x * scale + shift
        return x + self.refine(x)


ARCHS = {"conv": (Encoder, Decoder), "patch": (PatchEncoder, PatchDecoder)}


def check_codec(arch: str, norm: str) -> None:
    """A ValueError naming the choices unless ``arch`` and ``norm`` are known."""
    codec_classes(arch)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def codec_classes(arch: str) -> tuple[type, type]:
    """The (encoder, decoder) classes that ``arch`` names."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    return ARCHS[arch]


VQ_IMAGE_CONFIGS = {
    "debug": VQImageConfig(image_size=16, channels=8, latent_channels=16, res_blocks=1, codebook_size=64, code_dim=4),
    "base": VQImageConfig(),
}


def images_to_tensor(images, size: int | None = None) -> torch.Tensor:
    """PIL image(s), a uint8 array (b, H, W, 3) or (H, W, 3), or a float tensor (b, 3, H, W) in [0, 1] -> a float
    tensor (b, 3, H, W) in [0, 1]. ``size``: the side the images must have (a ValueError names the mismatch).

    A uint8 tensor is divided by 255; a float array or a float tensor outside [0, 1] is refused, since it is
    ambiguous which scale it uses."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            x = images.float() / 255.0
        elif images.is_floating_point():
            x = images.float()
            if x.numel() and (x.min() < -1e-3 or x.max() > 1.0 + 1e-3):
                raise ValueError(f"float image tensors must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
        else:
            raise ValueError(f"image tensors must be uint8 or float in [0, 1], got {images.dtype}")
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"image tensor must be (b, 3, H, W), got {tuple(images.shape)}")
    else:
        if isinstance(images, Image.Image):
            images = [images]
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8:
                raise ValueError(f"image arrays must be uint8 (b, H, W, 3), got {images.dtype}")
            arr = images if images.ndim == 4 else images[None]
        else:
            arr = np.stack([np.asarray(im.convert("RGB")) for im in images])
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"images must be RGB (b, H, W, 3), got shape {arr.shape}")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        raise ValueError(f"images must be {size}x{size}, got {x.shape[-1]}x{x.shape[-2]}")
    return x


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    arr = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


class GridImageTokenizer(Tokenizer):
    """What every image tokenizer on a 2-D token grid shares: the size check, decoding ids through
    ``quantizer.embed`` and ``decoder``, and save/load of a ``config.json`` + safetensors folder.

    Subclasses set ``type_name`` and ``config_class`` and build ``config``, ``layout``, ``quantizer``,
    ``decoder``."""
    type_name: str
    config_class: type

    def _check(self, x: torch.Tensor) -> None:
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            raise ValueError(f"this tokenizer takes {s}x{s} images, got {x.shape[-1]}x{x.shape[-2]}")

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, n) or (b, h, w) code ids -> images (b, 3, H, W) in [0, 1]."""
        h, w = self.layout.grid
        if ids.dim() == 2:
            if ids.shape[1] != h * w:
                raise ValueError(f"expected {h * w} ids per image, got {ids.shape[1]}")
            ids = rearrange(ids, "b (h w) -> b h w", h=h, w=w)
        return ((self.decoder(self.quantizer.embed(ids.to(self.device))) + 1) / 2).clamp(0, 1)

    def decode_images(self, ids: torch.Tensor) -> list[Image.Image]:
        return tensor_to_images(self.decode(ids))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def at_image_size(self, size: int) -> "GridImageTokenizer":
        """The same trained tokenizer on ``size`` x ``size`` images (self when the size is already that). The
        codec is convolutional, so its weights serve any canvas that is a multiple of the downsampling; what is
        tied to the grid (``_state_at``) is resampled. How well it reconstructs there is measured, not assumed
        (``mmgen eval text --checkpoint DIR --image-size N``)."""
        if size == self.config.image_size:
            return self
        if size <= 0 or size % self.config.downsample:
            raise ValueError(f"image size {size} is not a positive multiple of the tokenizer's downsampling "
                             f"{self.config.downsample}")
        tok = type(self)(replace(self.config, image_size=size))
        tok.load_state_dict(self._state_at(size), strict=True)
        return tok.to(self.device).eval()

    def _state_at(self, size: int) -> dict[str, torch.Tensor]:
        """The state dict for a canvas of ``size``: unchanged here (nothing depends on the grid)."""
        return self.state_dict()

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        cfg = {"type": self.type_name, "layout": self.layout.to_dict(), **asdict(self.config)}
        save_part(directory, cfg, self.state_dict(), dtype)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike):
        cfg, state = load_part(directory, expected_type=cls.type_name)
        fields = {k: cfg[k] for k in cls.config_class.__dataclass_fields__ if k in cfg}
        try:
            tok = cls(cls.config_class(**fields))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}/config.json describes no valid tokenizer: {e}") from e
        load_state_strict(tok, state, str(Path(directory)))
        return tok.eval()


class VQImageTokenizer(GridImageTokenizer):
    type_name = "vq_image"
    config_class = VQImageConfig

    def __init__(self, config: VQImageConfig):
        super().__init__()
        if config.downsample not in (2, 4, 8, 16):
            raise ValueError(f"downsample must be 2, 4, 8 or 16, got {config.downsample}")
        if config.image_size % config.downsample:
            raise ValueError("image_size must be a multiple of downsample")
        self.config = config
        enc, dec = codec_classes(config.arch)
        self.encoder, self.decoder = enc(config), dec(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.code_dim, config.beta)
        g = config.image_size // config.downsample
        self.layout = TokenLayout("grid2d", (g, g))
        self.vocab_size = config.codebook_size

    def forward(self, x: torch.Tensor, quantize: bool = True):
        """x (b, 3, H, W) in [0, 1] -> (reconstruction in [0, 1] space, quantizer output, latents).

        ``quantize=False`` decodes the normalised latents directly: training warms the autoencoder up this
        way, then seeds the codebook from its latents (a codebook initialised before the encoder has
        learnt anything collapses onto one code)."""
        z = self.encoder(x * 2 - 1)
        if quantize:
            q = self.quantizer(z)
        else:  # statistics only: the codebook must stay out of the graph (DDP checks what is used)
            with torch.no_grad():
                q = self.quantizer(z.detach())
        dec_in = q.quantized if quantize else F.normalize(z, dim=1)
        return (self.decoder(dec_in) + 1) / 2, q, z

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        """Images -> (b, H/ds * W/ds) code ids, row-major."""
        x = images_to_tensor(images).to(self.device)
        self._check(x)
        q = self.quantizer(self.encoder(x * 2 - 1))
        return rearrange(q.ids, "b h w -> b (h w)")

    def code_vectors(self) -> torch.Tensor:
        """The codebook (vocab_size, code_dim): the vectors Distilled Decoding's flow map moves noise to."""
        return self.quantizer.codebook().detach()
