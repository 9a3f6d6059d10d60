"""Paired comparison of two builds judged on the same scenes: which scenes only one of them gets right, and
the exact two-sided sign test on those discordant scenes (McNemar's exact test). Scenes both get right or
both get wrong say nothing about which build is better, so only the discordant ones count."""
from __future__ import annotations

from math import comb
from typing import Sequence


def sign_test(a_only: int, b_only: int) -> float:
    """Exact two-sided binomial sign test: the probability, if either build were equally likely to win each
    discordant scene, of a split at least as uneven as ``a_only`` : ``b_only``."""
    if a_only < 0 or b_only < 0:
        raise ValueError(f"counts must be >= 0, got {a_only} and {b_only}")
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare(a: Sequence[bool], b: Sequence[bool], groups: Sequence | None = None) -> dict:
    """Per-scene verdicts of build a and build b on the same scenes -> counts, discordant scenes and the sign
    test; with ``groups`` (one key per scene, e.g. its object count) the same per group."""
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} verdicts for a and {len(b)} for b: they must judge the same scenes")
    if groups is not None and len(groups) != len(a):
        raise ValueError(f"got {len(groups)} group keys for {len(a)} scenes")

    def summary(idx) -> dict:
        a_only = sum(bool(a[i]) and not b[i] for i in idx)
        b_only = sum(bool(b[i]) and not a[i] for i in idx)
        return {"n": len(idx), "a_right": sum(bool(a[i]) for i in idx), "b_right": sum(bool(b[i]) for i in idx),
                "a_only": a_only, "b_only": b_only, "p_sign": round(sign_test(a_only, b_only), 4)}

    out = summary(range(len(a)))
    if groups is not None:
        out["by_group"] = {str(g): summary([i for i, h in enumerate(groups) if h == g])
                           for g in sorted(set(groups), key=str)}
    return out
