"""The Distilled Decoding student (see mmgen/sampling/distilled.py for the method).

A copy of the teacher transformer whose image inputs are not token embeddings but a linear map of
codebook-space vectors (noise, or the code vector of a known token) plus a learnt noise/data marker. Every
image position predicts its own token (with Token-Shuffle, every window its own s^2 tokens), so one forward
pass writes the whole image. The input map starts as the least-squares fit from code vectors to the
teacher's token embeddings, so data inputs begin where the teacher's embeddings are.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from mmgen.model.transformer import ARConfig, MMGenTransformer
from mmgen.tokenizers.base import CheckpointError, load_part, load_state_strict, save_part


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights rounded to fp16 (so fp32 training weights and the fp16 shipped copy
    agree), to refuse a student distilled from other teacher weights."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update((v.detach().cpu().half() if v.is_floating_point() else v.detach().cpu()).numpy().tobytes())
    return h.hexdigest()[:16]


def codebook_fingerprint(codebook: torch.Tensor) -> str:
    """A short hash of a codebook (rounded to fp16), to refuse a student trained against another tokenizer."""
    return hashlib.sha256(codebook.detach().cpu().half().numpy().tobytes()).hexdigest()[:16]


@dataclass
class DDConfig:
    teacher: dict = field(default_factory=dict)   # the teacher's ARConfig (asdict)
    code_dim: int = 8
    codebook_fingerprint: str = ""
    teacher_sampling: dict = field(default_factory=dict)  # the options the pairs were made with
    teacher_fingerprint: str = ""  # weights_fingerprint of the teacher ("" in students saved before it existed)


class DDStudent(nn.Module):
    def __init__(self, config: DDConfig):
        super().__init__()
        self.config = config
        fields = dict(config.teacher)
        if "shuffle_grid" in fields:
            fields["shuffle_grid"] = tuple(fields["shuffle_grid"])
        self.model = MMGenTransformer(ARConfig(**fields))
        d = self.model.config.hidden_size
        self.in_proj = nn.Linear(config.code_dim, d)
        self.marker = nn.Embedding(2, d)  # 0: noise, 1: data
        nn.init.zeros_(self.marker.weight)

    @classmethod
    def from_teacher(cls, teacher: MMGenTransformer, codebook: torch.Tensor,
                     teacher_sampling: dict | None = None) -> "DDStudent":
        lo, hi = teacher.vocab.range("image")
        if codebook.dim() != 2 or codebook.shape[0] != hi - lo:
            raise CheckpointError(f"codebook of shape {tuple(codebook.shape)} does not match the model's {hi - lo} "
                                  "image ids")
        cfg = DDConfig(asdict(teacher.config), int(codebook.shape[1]), codebook_fingerprint(codebook),
                       dict(teacher_sampling or {}), weights_fingerprint(teacher))
        student = cls(cfg)
        student.model.load_state_dict(teacher.state_dict())
        with torch.no_grad():  # in_proj(c_k) ~ the teacher's embedding of token k (least squares, with bias)
            emb = teacher.llama.embed_tokens.weight[lo:hi].float()
            a = torch.cat([codebook.float(), torch.ones(len(codebook), 1)], 1)
            sol = torch.linalg.lstsq(a, emb).solution  # (D + 1, d)
            student.in_proj.weight.copy_(sol[:-1].t())
            student.in_proj.bias.copy_(sol[-1])
        return student

    def check_matches(self, model: MMGenTransformer, codebook: torch.Tensor) -> None:
        """Refuse a student made for another teacher vocabulary or tokenizer."""
        mine = self.model.vocab.ranges
        if mine != model.vocab.ranges:
            raise CheckpointError(f"the Distilled Decoding student was trained for vocabulary {mine}, the model "
                                  f"has {model.vocab.ranges}")
        if self.config.teacher_fingerprint and weights_fingerprint(model) != self.config.teacher_fingerprint:
            raise CheckpointError("the Distilled Decoding student was distilled from other teacher weights; retrain it "
                                  "with mmgen train dd --teacher <this checkpoint>")
        if codebook.shape[1] != self.config.code_dim or codebook_fingerprint(codebook) != self.config.codebook_fingerprint:
            raise CheckpointError("the Distilled Decoding student was trained against a different tokenizer "
                                  "codebook; retrain it with mmgen train dd --teacher <this checkpoint>")
        if (model.tokens_per_step != self.model.tokens_per_step
                or tuple(model.config.shuffle_grid) != tuple(self.model.config.shuffle_grid)):
            raise CheckpointError("the Distilled Decoding student and the model use different Token-Shuffle windows")

    def forward(self, prefix: torch.Tensor, start_ids: torch.Tensor, vectors: torch.Tensor,
                is_data: torch.Tensor) -> torch.Tensor:
        """prefix (b, p, d), start_ids (b, S), vectors (b, N, D) and is_data (b, N) in raster order ->
        logits (b, N, vocab): position i's token."""
        m = self.model
        image_row = 1 + list(m.vocab.ranges).index("image")
        e = self.in_proj(vectors) + self.marker(is_data.long()) + m.modality_embed.weight[image_row]
        if m.shuffle is not None:
            e = m.shuffle.merge(m.shuffle.to_windows(e))
        x = torch.cat([prefix, m.embed(start_ids), e], 1)
        if x.shape[1] > m.config.max_positions:
            raise ValueError(f"sequence of {x.shape[1]} positions exceeds max_positions={m.config.max_positions}")
        h = m.llama(inputs_embeds=x, use_cache=False).last_hidden_state[:, prefix.shape[1] + start_ids.shape[1]:]
        logits = m.head(h)
        return m.shuffle.to_raster(logits) if m.shuffle is not None else logits

    def save_pretrained(self, directory: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        save_part(directory, {"type": "mmgen_dd_student", **asdict(self.config)}, self.state_dict(), dtype)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "DDStudent":
        cfg, state = load_part(directory, expected_type="mmgen_dd_student")
        try:
            student = cls(DDConfig(**{k: cfg[k] for k in DDConfig.__dataclass_fields__ if k in cfg}))
        except (TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{directory}/config.json describes no valid student: {e}") from e
        load_state_strict(student, state, str(Path(directory)))
        return student.eval()
