"""The subject's token: a rare string the tokenizer keeps as one piece, and no word of the
shapes world's captions (``check_token``)."""

from __future__ import annotations

from orthodiff.data.shapes import BACKGROUNDS, COLORS, SHAPES

# Rare strings that some tokenizers keep as one piece (CLIP's BPE keeps sks, ohwx, bnp, phol).
CANDIDATE_TOKENS = ("sks", "ohwx", "bnp", "phol", "zwx", "qzv", "vkz", "xjy")
# Every word of a shapes-world caption: a subject token must not be one of them.
WORLD_WORDS = frozenset({"a", "an", "and", "on", "background", *SHAPES, *COLORS,
                         *(word for name in BACKGROUNDS for word in name.split())})


def _pieces(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def single_piece_tokens(tokenizer, candidates=CANDIDATE_TOKENS) -> list[str]:
    """The candidates `tokenizer` keeps as one piece and that are no shapes-world word."""
    return [c for c in candidates if c not in WORLD_WORDS and len(_pieces(tokenizer, c)) == 1]


def check_token(tokenizer, token: str) -> int:
    """The id of `token` if `tokenizer` keeps it as one piece (CLIP: 'sks' -> 'sks</w>'),
    else ValueError suggesting rare strings that are one piece in this tokenizer. A word
    of the shapes captions is refused too: the model already means something by it."""
    suggestion = (", ".join(repr(t) for t in single_piece_tokens(tokenizer)[:3])
                  or "a rare short string that this tokenizer keeps whole")
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"the subject token must be a non-empty string, got {token!r}; try {suggestion}")
    if token.strip().lower() in WORLD_WORDS:
        raise ValueError(f"token {token!r} is a word of the shapes captions, which the model already "
                         f"knows; use a rare one-piece token instead, e.g. {suggestion}")
    ids = _pieces(tokenizer, token)
    if len(ids) != 1 or ids[0] == getattr(tokenizer, "unk_token_id", None):
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ValueError(f"token {token!r} is not one piece for this tokenizer (it becomes {pieces}), so "
                         f"one embedding cannot hold the subject; use a one-piece token such as {suggestion}")
    return int(ids[0])
