"""Tokenizers built offline: CLIP's from the BPE vocabulary that open_clip ships, and a T5 one from it.

Stable Diffusion's tokenizer is OpenAI's CLIP BPE; open_clip carries the same merges file, so the
tokenizer of a locally built or trained pipeline needs no download.
"""

from __future__ import annotations

import gzip
import math

import open_clip.tokenizer as oc_tokenizer
from transformers import CLIPTokenizer, T5Tokenizer

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


def t5_tokenizer(words: int = 2000, max_length: int = 512) -> T5Tokenizer:
    """A T5 tokenizer (SentencePiece Unigram, T5's special tokens) built offline: each of CLIP's `words`
    most frequent words, with and without a word-start mark, and single characters for the rest.

    Real SD3 and FLUX models ship their own T5 tokenizer; this one serves models built locally, so that
    they load through the same files and classes without a download."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    clip = clip_tokenizer()
    ranked = sorted(clip.get_vocab().items(), key=lambda item: item[1])
    whole = [token.removesuffix("</w>") for token, _ in ranked if token.endswith("</w>")]
    seen = {piece for piece, _ in vocab}
    # A Unigram vocabulary scores each piece by its log-probability: by frequency rank, here (CLIP's
    # merges are learned in order of frequency), so that a whole word beats its pieces.
    for rank, word in enumerate(whole[:words]):
        for piece in ("\u2581" + word, word):
            if piece not in seen:
                seen.add(piece)
                vocab.append((piece, -math.log(rank + 2)))
    for char in (w for w in whole if len(w) == 1):
        if char not in seen:
            seen.add(char)
            vocab.append((char, -100.0))
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
