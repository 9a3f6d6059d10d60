"""Quoted text as byte tokens.

In a prompt like ``a white card with the text "Hello world" in large blue serif letters``, the quoted part is
what the image must spell. A word-piece sentence encoder blurs spelling, so a model built with
``ARConfig.text_bytes = L`` reads the quoted text as UTF-8 byte tokens in its sequence, and the sentence
encoder sees the rest of the prompt (the quoted span replaced by empty quotes):

    [prefix (sentence encoder)] [<pad> ... <pad> <bot> b_1 ... b_n <eot>] [<boi>] image tokens ...

The byte slot has a fixed length L + 2, left-padded, so a prompt gets the same positions alone or in any
batch (same seed, same image) and the fast cached path needs no attention mask. The unconditional branch of
classifier-free guidance drops the quoted text too (an empty slot), as training's condition dropout does.
"""
from __future__ import annotations

import re

import torch

QUOTED = re.compile(r'"([^"]*)"|\u201c([^\u201d]*)\u201d')  # "straight" or \u201ccurly\u201d double quotes


def split_quoted(prompt: str) -> tuple[str, str]:
    """prompt -> (the prompt with every quoted span emptied, the quoted texts joined by newlines).

    A newline joins several spans because the text world treats one as a forced line break."""
    texts = [m.group(1) if m.group(1) is not None else m.group(2) for m in QUOTED.finditer(prompt)]
    rest = QUOTED.sub('""', prompt)
    return rest, "\n".join(texts)


def byte_slot(texts: list[str], vocab, length: int) -> torch.Tensor:
    """Quoted texts -> unified ids (b, length + 2): left padding, <bot>, the UTF-8 bytes, <eot>."""
    pad, bot, eot = (vocab.special(s) for s in ("<pad>", "<bot>", "<eot>"))
    out = torch.full((len(texts), length + 2), pad, dtype=torch.long)
    for i, text in enumerate(texts):
        data = text.encode("utf-8")
        if len(data) > length:
            raise ValueError(f"the quoted text has {len(data)} bytes; this checkpoint writes at most {length}")
        ids = vocab.to_unified("byte", torch.tensor(list(data), dtype=torch.long))
        out[i, length + 2 - len(data) - 2] = bot
        out[i, length + 2 - len(data) - 1:length + 1] = ids
        out[i, length + 1] = eot
    return out


def split_prompts(prompts: list[str], vocab, length: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Prompts -> (what the sentence encoder reads, the byte slots (b, L + 2), empty slots for the
    unconditional branch (b, L + 2))."""
    pairs = [split_quoted(p) for p in prompts]
    return ([r for r, _ in pairs], byte_slot([t for _, t in pairs], vocab, length),
            byte_slot([""] * len(prompts), vocab, length))
