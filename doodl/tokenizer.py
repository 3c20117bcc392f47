"""A CLIP tokenizer built offline from the BPE vocabulary that open_clip ships.

Stable Diffusion's tokenizer is OpenAI's CLIP BPE; open_clip carries the same merges file, so the
tokenizer of a locally built or trained pipeline needs no download.
"""

from __future__ import annotations

import gzip

import open_clip.tokenizer as oc_tokenizer
from transformers import CLIPTokenizer

# CLIP's vocabulary: 256 byte symbols, the same with an end-of-word mark, the merges, 2 specials.
_NUM_MERGES = 49152 - 256 - 2


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Stable Diffusion 1.x's CLIP tokenizer (49408 tokens), built from open_clip's BPE file."""
    with gzip.open(oc_tokenizer.default_bpe(), "rt", encoding="utf-8") as bpe:
        lines = bpe.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    symbols = list(oc_tokenizer.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        model_max_length=max_length,
    )
