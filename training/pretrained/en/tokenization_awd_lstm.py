# Copyright 2025 The ULMFiT-HF Authors. Licensed under the Apache License, Version 2.0.
"""Word-level tokenizer of AWD-LSTM (ULMFiT) models: fastai 2.8's default text processing, token for token.

fastai turns a document into tokens in three steps, reproduced here exactly so that ids match those of models
trained with fastai:

1. rules on the raw text (`fix_html`, `replace_rep`, `replace_wrep`, `spec_add_spaces`, `rm_useless_spaces`,
   `replace_all_caps`, `replace_maj`, then `lowercase`, which also puts `xxbos` in front of every document);
2. word splitting by spaCy's rule-based tokenizer (`spacy.blank(lang)`), with the special tokens kept whole;
3. `replace_space` on each token (spaces inside a token become "▁").

Here the leading `xxbos` is added as the beginning-of-sequence special token (`add_special_tokens=True`), so the ids
equal fastai's for every document while `add_special_tokens=False` gives the text's tokens alone.

This file is self-contained (standard library, transformers and spaCy) so that `save_pretrained` can copy it next to
the vocabulary and `AutoTokenizer.from_pretrained(path, trust_remote_code=True)` works without this package.
"""

import html
import json
import os
import re
from typing import Any

from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "vocab.json"}

# fastai's `defaults.text_spec_tok`, in fastai's order so that the ids match: xxunk=0, xxpad=1, xxbos=2, xxeos=3, ...
FASTAI_SPECIAL_TOKENS = "xxunk xxpad xxbos xxeos xxfld xxrep xxwrep xxup xxmaj".split()
UNK, PAD, BOS, EOS, FLD, TK_REP, TK_WREP, TK_UP, TK_MAJ = FASTAI_SPECIAL_TOKENS
# fastai pads its vocabulary to a multiple of 8 with this entry; as a word in a text it reads as xxunk.
VOCAB_PADDING_TOKEN = "xxfake"


# fastai 2.8 text rules (fastai/text/core.py), kept character for character.
_re_spec = re.compile(r"([/#\\])")
_re_space = re.compile(" {2,}")
_re_rep = re.compile(r"(\S)(\1{2,})")
_re_wrep = re.compile(r"(?:\s|^)(\w+)\s+((?:\1\s+)+)\1(\s|\W|$)")
_re_all_caps = re.compile(r"(\s|^)([A-Z]+[^a-z\s]*)(?=(\s|$))")
_re_maj = re.compile(r"(\s|^)([A-Z][^A-Z\s]*)(?=(\s|$))")


def spec_add_spaces(t: str) -> str:
    "Add spaces around / and #"
    return _re_spec.sub(r" \1 ", t)


def rm_useless_spaces(t: str) -> str:
    "Remove multiple spaces"
    return _re_space.sub(" ", t)


def replace_rep(t: str) -> str:
    "Replace repetitions at the character level: cccc -- TK_REP 4 c"

    def _replace_rep(m):
        c, cc = m.groups()
        return f" {TK_REP} {len(cc) + 1} {c} "

    return _re_rep.sub(_replace_rep, t)


def replace_wrep(t: str) -> str:
    "Replace word repetitions: word word word word -- TK_WREP 4 word"

    def _replace_wrep(m):
        c, cc, e = m.groups()
        return f" {TK_WREP} {len(cc.split()) + 2} {c} {e}"

    return _re_wrep.sub(_replace_wrep, t)


def fix_html(x: str) -> str:
    "Various messy things we've seen in documents"
    x = (
        x.replace("#39;", "'")
        .replace("amp;", "&")
        .replace("#146;", "'")
        .replace("nbsp;", " ")
        .replace("#36;", "$")
        .replace("\\n", "\n")
        .replace("quot;", "'")
        .replace("<br />", "\n")
        .replace('\\"', '"')
        .replace("<unk>", UNK)
        .replace(" @.@ ", ".")
        .replace(" @-@ ", "-")
        .replace("...", " …")
    )
    return html.unescape(x)


def replace_all_caps(t: str) -> str:
    "Replace tokens in ALL CAPS by their lower version and add `TK_UP` before."

    def _replace_all_caps(m):
        tok = f"{TK_UP} " if len(m.groups()[1]) > 1 else ""
        return f"{m.groups()[0]}{tok}{m.groups()[1].lower()}"

    return _re_all_caps.sub(_replace_all_caps, t)


def replace_maj(t: str) -> str:
    "Replace tokens in Sentence Case by their lower version and add `TK_MAJ` before."

    def _replace_maj(m):
        tok = f"{TK_MAJ} " if len(m.groups()[1]) > 1 else ""
        return f"{m.groups()[0]}{tok}{m.groups()[1].lower()}"

    return _re_maj.sub(_replace_maj, t)


def lowercase(t: str, add_bos: bool = True, add_eos: bool = False) -> str:
    "Converts `t` to lowercase"
    return (f"{BOS} " if add_bos else "") + t.lower().strip() + (f" {EOS}" if add_eos else "")


def replace_space(t: str) -> str:
    "Replace embedded spaces in a token with unicode line char to allow for split/join"
    return t.replace(" ", "▁")


# fastai's `defaults.text_proc_rules` up to `lowercase`, which the tokenizer applies without its BOS.
PRE_RULES = [fix_html, replace_rep, replace_wrep, spec_add_spaces, rm_useless_spaces, replace_all_caps, replace_maj]


def apply_rules(text: str) -> str:
    """fastai's default rules on one document, without the `xxbos` that its `lowercase` rule puts in front."""
    for rule in PRE_RULES:
        text = rule(text)
    return lowercase(text, add_bos=False)


# Decoding: how the word tokens of a lowercased, split text are put back together for a reader.
_CLOSING_CHARS = set(".,!?;:%)]}…")  # no space before
_OPENING_CHARS = set("([{$#£")  # no space after
_JOINING_CHARS = set("-/\\—")  # hyphens and slashes: no space on either side ("well-known", "7/10")
# Opening quote -> its closing quote (no space after the one, none before the other): "a", 'a', `a', ``a''.
_QUOTE_PAIRS = {'"': '"', "'": "'", "`": "'", "``": "''"}
_SENTENCE_END_CHARS = set(".!?…")
_re_clitic = re.compile(r"^(?:['’](?:s|m|d|ll|re|ve)|n['’]t)$")


def _spacy_glued_pairs(tokenizer) -> set[tuple[str, str]]:
    """The two pieces of the words that spaCy's exceptions split in two ("do" + "n't", "can" + "not", "gon" + "na"),
    which decoding joins again. (Longer splits such as "i" + "'m" + "a" are left out: "'m" + "a" is usually two
    words.)"""
    from spacy.symbols import ORTH

    pairs = set()
    for word, pieces in tokenizer.rules.items():
        orths = [piece[ORTH] for piece in pieces]
        if len(orths) == 2 and "".join(orths) == word:
            pairs.add((orths[0].lower(), orths[1].lower()))
    return pairs


def _read_word(tokens: list[str], i: int) -> tuple[str | None, int, bool]:
    """Undo the case and repetition markers of the word starting at `tokens[i]`.

    Returns the word (None for a marker with nothing left to apply to), the index after it, and whether it is a
    character repetition (`xxrep`), which was part of the word before it.
    """
    token = tokens[i]
    if token in (TK_MAJ, TK_UP):
        if i + 1 == len(tokens):
            return None, i + 1, False
        word, end, is_rep = _read_word(tokens, i + 1)
        if word is None:
            return None, end, False
        return (word[:1].upper() + word[1:] if token == TK_MAJ else word.upper()), end, is_rep
    if token in (TK_REP, TK_WREP):
        # A marker the model generated without its count and item is dropped.
        if i + 2 >= len(tokens) or not tokens[i + 1].isdigit():
            return None, i + 1, False
        count = int(tokens[i + 1])
        if token == TK_REP:
            return tokens[i + 2] * count, i + 3, True
        word, end, _ = _read_word(tokens, i + 2)
        if word is None:
            return None, end, False
        return " ".join([word] * count), end, False
    return token.replace("▁", " "), i + 1, False


def detokenize(
    tokens: list[str], glued_pairs: set[tuple[str, str]] = frozenset(), starts_document: bool = True, lang: str = "en"
) -> str:
    """Readable text from fastai tokens: case and repetitions restored, natural spacing.

    When `starts_document` is False the tokens continue earlier text (as new tokens in text generation do), so the
    result starts with the space that separates its first word from that text (none before punctuation).
    """
    pieces: list[str] = []
    previous = None  # the previous word, as written
    glue_next = starts_document  # no space before the next word
    after_opening = False  # right after an opening quote or bracket
    open_quotes: set[str] = set()
    sentence_start = starts_document
    i = 0
    while i < len(tokens):
        is_document_boundary = tokens[i] in (BOS, EOS)
        word, i, is_rep = _read_word(tokens, i)
        if not word:
            continue
        is_space = word.isspace()
        closes_quote = word in open_quotes
        # fastai lower-cases, without a marker, one-letter words ("A", "I") and words glued to an opening quote or
        # bracket ('"The'): give back the capitals a reader expects at the start of a sentence, and "I".
        if word[:1].islower() and (
            (sentence_start and (len(word) == 1 or after_opening)) or (word == "i" and lang == "en")
        ):
            word = word[:1].upper() + word[1:]

        attaches_left = (
            is_space
            or closes_quote
            or set(word) <= _CLOSING_CHARS | _JOINING_CHARS
            or _re_clitic.match(word.lower()) is not None
        )
        glued = previous is not None and (
            (is_rep and word[0].isalnum() and previous[-1].isalnum())  # "n" + "oooo": the run was inside the word
            or (previous.lower(), word.lower()) in glued_pairs
        )
        pieces.append(("" if glue_next or attaches_left or glued else " ") + word)

        opens_quote = word in _QUOTE_PAIRS and not closes_quote
        opens = opens_quote or set(word) <= _OPENING_CHARS
        if closes_quote:
            open_quotes.discard(word)
        elif opens_quote:
            open_quotes.add(_QUOTE_PAIRS[word])
        if is_document_boundary or "\n\n" in word:  # quotes rarely span paragraphs: a lost one is forgotten here
            open_quotes.clear()
        glue_next = is_space or opens or set(word) <= _JOINING_CHARS
        after_opening = opens
        if is_document_boundary:
            sentence_start = True
        elif not (is_space or opens):  # line breaks and opening punctuation leave the sentence start to the next word
            sentence_start = word[-1] in _SENTENCE_END_CHARS
        previous = word
    return "".join(pieces)


def _load_vocab(vocab_file: str) -> list[str]:
    with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
    if not isinstance(vocab, list):
        raise ValueError(
            f"{vocab_file} must hold a JSON list of tokens in id order (fastai's `vocab`/itos), "
            f"got a {type(vocab).__name__}."
        )
    return vocab


class AwdLstmTokenizer(PreTrainedTokenizer):
    """
    Word-level tokenizer of ULMFiT / AWD-LSTM models: the tokens and ids of fastai 2.8's default text pipeline
    (`TextBlock.from_df`/`tokenize_df` with `WordTokenizer`, then `Numericalize`).

    Special tokens follow fastai: `xxunk` (unknown), `xxpad` (padding), `xxbos` (start of every document, added by
    `add_special_tokens=True`), `xxeos`; the text markers `xxfld`, `xxrep`, `xxwrep`, `xxup` and `xxmaj` are ordinary
    tokens that the rules produce and that `decode` turns back into text (capitals, repetitions).

    Args:
        vocab_file (`str`, *optional*):
            JSON list of the tokens in id order (fastai's `learn.dls.vocab`, padding `xxfake` entries included).
        vocab (`list[str]`, *optional*):
            The same list, given directly instead of `vocab_file`.
        lang (`str`, *optional*, defaults to `"en"`):
            Language of the spaCy tokenizer (`spacy.blank(lang)`), as fastai's `SpacyTokenizer(lang)`.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        vocab: list[str] | None = None,
        lang: str = "en",
        unk_token: str = UNK,
        pad_token: str = PAD,
        bos_token: str = BOS,
        eos_token: str = EOS,
        **kwargs,
    ):
        if (vocab_file is None) == (vocab is None):
            raise ValueError(
                "AwdLstmTokenizer needs its vocabulary: pass exactly one of `vocab_file` (a JSON list of tokens) and "
                "`vocab` (the list itself, e.g. fastai's `learn.dls.vocab`). To build one from texts use "
                "`ulmfit.tokenizer_training.train_fastai_tokenizer`."
            )
        if vocab is None:
            vocab = _load_vocab(vocab_file)
        bad = [i for i, token in enumerate(vocab) if not isinstance(token, str) or token == ""]
        if not vocab or bad:
            raise ValueError(
                f"The vocabulary must be a non-empty list of non-empty strings; bad entries at ids {bad[:10]}."
            )
        missing = [str(t) for t in (unk_token, pad_token, bos_token, eos_token) if str(t) not in vocab]
        if missing:
            raise ValueError(
                f"The vocabulary lacks the special tokens {missing}. fastai vocabularies start with "
                f"{FASTAI_SPECIAL_TOKENS}; build yours with `train_fastai_tokenizer` or fastai's `make_vocab`."
            )
        self.itos = list(vocab)
        # As fastai's `Numericalize`: padding slots ("xxfake") are not tokens, so they are left out of the mapping.
        self.encoder = {token: i for i, token in enumerate(self.itos) if token != VOCAB_PADDING_TOKEN}
        self.lang = lang
        self._spacy_cache: tuple | None = None  # (special cases, spaCy tokenizer, glued pairs), built on first use

        # fastai's `lowercase` rule starts every document with xxbos
        kwargs.setdefault("special_tokens_pattern", "bos")
        kwargs.setdefault("clean_up_tokenization_spaces", False)  # `decode` does its own spacing
        super().__init__(
            lang=lang, unk_token=unk_token, pad_token=pad_token, bos_token=bos_token, eos_token=eos_token, **kwargs
        )
        self.init_kwargs.pop("vocab", None)  # saved as vocab.json, not inside tokenizer_config.json

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def get_vocab(self) -> dict[str, int]:
        return {**self.encoder, **self._added_tokens_encoder}

    def _update_total_vocab_size(self):
        # The padding slots count towards the size (the model's embedding has them) though `get_vocab` omits them.
        self.total_vocab_size = max(len(self.itos), len(self.get_vocab()))

    def _spacy(self):
        """spaCy's tokenizer for `lang` with the special tokens kept whole, as fastai's `SpacyTokenizer` builds it."""
        special_cases = tuple(dict.fromkeys([*FASTAI_SPECIAL_TOKENS, *self._added_tokens_encoder]))
        if self._spacy_cache is None or self._spacy_cache[0] != special_cases:
            try:
                import spacy
                from spacy.symbols import ORTH
            except ImportError as error:
                raise ImportError("AwdLstmTokenizer needs spaCy, as fastai does: `pip install 'spacy<4'`.") from error
            tokenizer = spacy.blank(self.lang).tokenizer
            for token in special_cases:
                tokenizer.add_special_case(token, [{ORTH: token}])
            self._spacy_cache = (special_cases, tokenizer, _spacy_glued_pairs(tokenizer))
        return self._spacy_cache[1:]

    def __getstate__(self) -> dict[str, Any]:
        # spaCy objects are rebuilt on demand: this keeps pickling (datasets' map, multiprocessing) light and stable.
        state = self.__dict__.copy()
        state["_spacy_cache"] = None
        return state

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """fastai's tokens for one document, without the leading `xxbos` (added with `add_special_tokens=True`).

        The whole text goes through fastai's rules and spaCy (special tokens in the text are kept whole by spaCy, as in
        fastai), instead of the base class's split on added tokens, which would run the rules on fragments.
        """
        return self._tokenize(text)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        spacy_tokenizer, _ = self._spacy()
        return [replace_space(token.text) for token in spacy_tokenizer(apply_rules(text))]

    def _convert_token_to_id(self, token: str) -> int:
        return self.encoder.get(token, self.encoder[self.unk_token])

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < len(self.itos):
            raise IndexError(f"Token id {index} is outside the vocabulary (size {len(self.itos)}).")
        return self.itos[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        _, glued_pairs = self._spacy()
        return detokenize(tokens, glued_pairs, starts_document=True, lang=self.lang)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        """Readable text. A sequence that does not start with xxbos (after any padding) continues earlier text, like
        the new tokens that the text-generation pipeline decodes and appends to the prompt, so it starts with the
        space that separates it from that text (none before punctuation)."""
        token_ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        content = [i for i in token_ids if i != self.pad_token_id]
        starts_document = not content or content[0] == self.bos_token_id
        tokens = self.convert_ids_to_tokens(token_ids, skip_special_tokens=skip_special_tokens)
        _, glued_pairs = self._spacy()
        return detokenize(tokens, glued_pairs, starts_document=starts_document, lang=self.lang)

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"Vocabulary path ({save_directory}) should be a directory.")
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_file = os.path.join(save_directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(self.itos, f, ensure_ascii=False, indent=0)
            f.write("\n")
        return (vocab_file,)


# Saved tokenizers name this file in `auto_map` and get a copy of it, so that they load without this package
# (`AutoTokenizer.from_pretrained(path, trust_remote_code=True)`).
AwdLstmTokenizer.register_for_auto_class("AutoTokenizer")

__all__ = ["AwdLstmTokenizer"]
