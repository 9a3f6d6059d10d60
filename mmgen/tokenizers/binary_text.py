"""Binary text tokenizer: convolutional encoder -> small transformer projector -> bitwise binary quantiser
(lookup-free: no codebook, B bits per token, the id is the bit pattern as an integer) -> deconvolutional
decoder. Built for the text world (long-text images), where glyph strokes are thin and a patch VQ with a
small codebook smears them.

The projector (a pre-norm transformer encoder over the token grid with learnt 2-D positions, attention
limited to a window of neighbours: ``mmgen.tokenizers.projector``) lets each token's bits depend on its
neighbours, which is what the binary text tokenizers of the long-text papers use to spend their bits on
strokes rather than background. How mmgen's differs: no GAN or perceptual loss (not trainable offline at
this size); an edge-weighted pixel loss (the shipped recipe: L2 alone, see
``mmgen.train.tokenizer.reconstruction_loss``); the LFQ entropy term computed within groups of bits (see
``BinaryQuantizer``); training on crops (``mmgen.train.tokenizer.content_crops``) with the projector's window
smaller than a crop; and, in the shipped recipe, the patch codec (``arch: patch``: space-to-depth with linear
projections and residual convs, depth-to-space on the way out) in place of strided convolutions, with 4x4-pixel
tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import TokenLayout
from .projector import LocalProjector
from .quantizers import BinaryQuantizer
from .vq_image import GridImageTokenizer, VQImageConfig, codec_classes, images_to_tensor


@dataclass
class BinaryTextConfig:
    image_size: int = 256
    downsample: int = 8          # patch side: 8 gives 256 -> 32x32 tokens; the shipped recipe's 4 gives 64x64
    channels: int = 32
    latent_channels: int = 96
    res_blocks: int = 2
    bits: int = 13               # B bits per token; vocabulary 2^B
    projector_layers: int = 2
    projector_heads: int = 4
    projector_window: int = 3    # projector attention reaches tokens at most this many rows/columns away (0: all);
    #                              a window smaller than a training crop gives a token the same neighbourhood in
    #                              a crop as in the full grid
    commit_weight: float = 0.25
    entropy_weight: float = 0.05
    diversity_gamma: float = 1.0
    entropy_group_bits: int = 7  # the batch-entropy term is exact within groups of this many bits
    norm: str = "none"           # conv blocks: "none" or "channel" (per-pixel LayerNorm; see vq_image.ChannelNorm)
    arch: str = "conv"           # "conv" (strided convs) or "patch" (vq_image.PatchEncoder / PatchDecoder)
    decoder_context: int = 0     # patch decoder: width of the whole-page summary that modulates it
    #                              (vq_image.PageContext; 0: none). Flat beige and flat white card share an id,
    #                              so a decoder that sees a few tokens around a patch can only guess its colour
    decoder_padding: str = "zeros"  # patch decoder: "zeros" or "replicate" padding of its 3x3 convs

    def __post_init__(self):
        VQImageConfig(arch=self.arch, norm=self.norm, decoder_context=self.decoder_context,
                      decoder_padding=self.decoder_padding)  # the codec's checks


BINARY_TEXT_CONFIGS = {
    "debug": BinaryTextConfig(image_size=64, downsample=8, channels=8, latent_channels=16, res_blocks=1, bits=6,
                              projector_layers=1, projector_heads=2),
    "base": BinaryTextConfig(),
}


class BinaryTextTokenizer(GridImageTokenizer):
    type_name = "binary_text"
    config_class = BinaryTextConfig

    def __init__(self, config: BinaryTextConfig):
        super().__init__()
        if config.downsample not in (2, 4, 8, 16):
            raise ValueError(f"downsample must be 2, 4, 8 or 16, got {config.downsample}")
        if config.image_size % config.downsample:
            raise ValueError("image_size must be a multiple of downsample")
        if config.latent_channels % config.projector_heads:
            raise ValueError("latent_channels must be a multiple of projector_heads")
        self.config = config
        conv = dict(image_size=config.image_size, downsample=config.downsample, channels=config.channels,
                    latent_channels=config.latent_channels, res_blocks=config.res_blocks, norm=config.norm,
                    arch=config.arch)
        enc, dec = codec_classes(config.arch)
        self.encoder = enc(VQImageConfig(**conv, code_dim=config.latent_channels))
        g = config.image_size // config.downsample
        d = config.latent_channels
        self.pos = nn.Parameter(torch.randn(g * g, d) * 0.02)
        self.projector = LocalProjector(d, config.projector_heads, config.projector_layers, 2 * d)
        self.to_bits = nn.Linear(d, config.bits)
        self.quantizer = BinaryQuantizer(config.bits, config.commit_weight, config.entropy_weight,
                                         config.diversity_gamma, group_bits=config.entropy_group_bits)
        self.decoder = dec(VQImageConfig(**conv, code_dim=config.bits, decoder_context=config.decoder_context,
                                         decoder_padding=config.decoder_padding))
        self.layout = TokenLayout("grid2d", (g, g))
        self.vocab_size = 2 ** config.bits

    def _state_at(self, size: int) -> dict[str, torch.Tensor]:
        """The learnt 2-D positions resampled (bilinear) to the new grid, so a token keeps the position of the
        same place on the page: margins and lines scale with the canvas."""
        state = dict(self.state_dict())
        g, n = self.config.image_size // self.config.downsample, size // self.config.downsample
        grid = rearrange(self.pos.detach(), "(h w) d -> 1 d h w", h=g, w=g)
        grid = F.interpolate(grid, size=(n, n), mode="bilinear", align_corners=False)
        state["pos"] = rearrange(grid, "1 d h w -> (h w) d")
        return state

    def positions(self, h: int, w: int, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The projector's 2-D positions for an (h, w) token window: the whole grid, or for training crops the
        window at ``offset`` (b, 2) (top-left, in tokens) of the full grid, so a crop's tokens get the positions
        they have in the full image -> (1 or b, h * w, d)."""
        g = self.config.image_size // self.config.downsample
        if offset is None:
            if (h, w) != (g, g):
                raise ValueError(f"a {h}x{w} token grid needs crop offsets; the full grid is {g}x{g}")
            return self.pos[None]
        if offset.min() < 0 or (offset[:, 0] + h).max() > g or (offset[:, 1] + w).max() > g:
            raise ValueError(f"crop offsets {offset.tolist()} put a {h}x{w} window outside the {g}x{g} grid")
        rows = offset[:, :1, None] + torch.arange(h, device=offset.device)[None, :, None]
        cols = offset[:, 1:, None] + torch.arange(w, device=offset.device)[None, None, :]
        return self.pos[(rows * g + cols).reshape(len(offset), -1)]

    def latents(self, x: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """x (b, 3, H, W) in [0, 1] -> continuous bit latents (b, B, h, w). ``offset``: see ``positions``."""
        f = self.encoder(x * 2 - 1)
        h, w = f.shape[-2:]
        t = self.projector(rearrange(f, "b d h w -> b (h w) d") + self.positions(h, w, offset), h, w,
                           self.config.projector_window)
        return rearrange(self.to_bits(t), "b (h w) c -> b c h w", h=h, w=w)

    def forward(self, x: torch.Tensor, quantize: bool = True, offset: torch.Tensor | None = None):
        """x -> (reconstruction in [0, 1] space, quantiser output, latents). ``quantize=False`` decodes the
        tanh of the latents (the trainer's optional unquantised warm-up). ``offset``: training crops' top-left
        corners in tokens (see ``positions``)."""
        z = self.latents(x, offset)
        q = self.quantizer(z)
        dec_in = q.quantized if quantize else torch.tanh(z)
        return (self.decoder(dec_in) + 1) / 2, q, z

    @torch.no_grad()
    def encode(self, images, chunk: int | None = None) -> torch.Tensor:
        """Images -> (b, h * w) ids in [0, 2^B), row-major; ``chunk`` images at a time (the projector gathers
        each token's window: about 0.2 GB per 256x256 page at the base size). Default: 4 on the CPU; on an
        accelerator, whose time would otherwise go on launching the same kernels for each small chunk, 64
        256x256 pages' worth of pixels (about 13 GB)."""
        if chunk is not None and chunk < 1:
            raise ValueError(f"chunk must be at least 1 image, got {chunk}")
        x = images_to_tensor(images).to(self.device)
        self._check(x)
        if chunk is None:
            chunk = 4 if x.device.type == "cpu" else max(1, 64 * 256 * 256 // (x.shape[-2] * x.shape[-1]))
        ids = [self.quantizer.ids(self.latents(part)) for part in x.split(chunk)]
        return rearrange(torch.cat(ids), "b h w -> b (h w)")

    def code_vectors(self) -> torch.Tensor:
        """Every token's +-1 bit vector (2^B, B): what Distilled Decoding's flow map moves noise to."""
        return self.quantizer.codebook()
