"""A small CLIP BPE vocabulary for the demo model.

Same file format and algorithm as OpenAI CLIP's tokenizer (vocab.json + merges.txt, byte-level
BPE, ``</w>`` word ends, BOS ``<|startoftext|>`` / EOS ``<|endoftext|>``), but the merge list
only spells the words of :data:`clora.demo.world.WORDS`, so every word of the grammar is one
token and anything else falls back to characters.  Loads with ``transformers.CLIPTokenizer``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _bpe(syms, ranks):
    """CLIP's BPE on a list of symbols (lowest-rank adjacent pair merged first)."""
    word = list(syms)
    while len(word) > 1:
        pairs = [(ranks.get((a, b), 1e18), i) for i, (a, b) in enumerate(itertools.pairwise(word))]
        r, i = min(pairs)
        if r == 1e18:
            break
        first, second = word[i], word[i + 1]
        new, j = [], 0
        while j < len(word):
            if j < len(word) - 1 and word[j] == first and word[j + 1] == second:
                new.append(first + second)
                j += 2
            else:
                new.append(word[j])
                j += 1
        word = new
    return word


def build_vocab(words: Iterable[str]):
    """Merges so that every word becomes a single token (checked by simulating BPE)."""
    base = list(bytes_to_unicode().values())
    vocab = base + [v + "</w>" for v in base]
    merges = []
    words = sorted(set(words), key=lambda s: (len(s), s))
    for _ in range(50):
        ranks = {m: i for i, m in enumerate(merges)}
        changed = False
        for w in words:
            seg = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
            if len(seg) > 1:
                cur = seg[0]
                for s in seg[1:]:
                    if (cur, s) not in ranks:
                        merges.append((cur, s))
                        ranks[(cur, s)] = len(merges) - 1
                    cur = cur + s
                changed = True
        if not changed:
            break
    seen = set(vocab)
    for a, b in merges:
        if a + b not in seen:
            vocab.append(a + b)
            seen.add(a + b)
    vocab += [BOS, EOS]
    return {t: i for i, t in enumerate(vocab)}, merges


def _added(content):
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def write_tokenizer(out_dir: Path, words: Iterable[str]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    encoder, merges = build_vocab(words)
    (out_dir / "vocab.json").write_text(json.dumps(encoder, ensure_ascii=False, separators=(",", ":")))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out_dir / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": _added(BOS), "eos_token": _added(EOS), "pad_token": EOS, "unk_token": _added(EOS)}, indent=2
        )
    )
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_prefix_space": False,
                "bos_token": _added(BOS),
                "do_lower_case": True,
                "eos_token": _added(EOS),
                "errors": "replace",
                "model_max_length": 77,
                "pad_token": EOS,
                "tokenizer_class": "CLIPTokenizer",
                "unk_token": _added(EOS),
            },
            indent=2,
        )
    )
