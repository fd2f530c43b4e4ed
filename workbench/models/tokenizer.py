"""Train a small byte-level BPE tokenizer for a T5- or BART-family backbone.

The embedded backbone (``vlt5-tiny``) and the unit tests need a tokenizer that exists without a
download. A byte-level BPE (the GPT-2 / BART scheme) encodes *any* text, so a tokenizer trained on
ShapesWorld captions still turns an unseen word into bytes instead of ``<unk>``.

The special tokens follow each family's conventions, so that the HF model code finds them where it
expects them:

- T5:   ``<pad>`` = 0 (also the decoder start token), ``</s>`` = 1, ``<unk>`` = 2;
  every sequence ends with ``</s>``.
- BART: ``<s>`` = 0, ``<pad>`` = 1, ``</s>`` = 2 (also the decoder start token), ``<unk>`` = 3;
  every sequence is ``<s> ... </s>``.
"""

from __future__ import annotations

from collections.abc import Iterable

# The ids of the special tokens are their positions in these lists.
SPECIAL_TOKENS = {
    "t5": {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
    "bart": {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
}
_ORDER = {"t5": ["<pad>", "</s>", "<unk>"], "bart": ["<s>", "<pad>", "</s>", "<unk>"]}
_BYTE_ALPHABET_SIZE = 256


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, family: str = "t5", min_frequency: int = 1):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Args:
        texts: the training corpus (any iterable of strings, e.g. captions and prompts).
        vocab_size: the size of the vocabulary, special tokens and the 256 byte symbols included;
            must exceed ``256 + number of special tokens``.
        family: ``"t5"`` or ``"bart"``: decides the special tokens and the post-processing
            (see the module docstring).
        min_frequency: a merge needs this many occurrences to enter the vocabulary.

    Returns:
        a ``transformers.PreTrainedTokenizerFast`` with pad/eos/unk (and bos for BART) set; it
        saves and loads with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in SPECIAL_TOKENS:
        raise ValueError(f"family must be one of {sorted(SPECIAL_TOKENS)}, got {family!r}")
    specials = _ORDER[family]
    minimum = _BYTE_ALPHABET_SIZE + len(specials) + 1
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be an int >= {minimum} (256 byte symbols + {len(specials)} special "
            f"tokens + at least one merge), got {vocab_size!r}"
        )
    texts = [t for t in texts]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty iterable of strings")

    tok = Tokenizer(models.BPE())
    # add_prefix_space: the first word of a sentence gets the same tokens as the same word later on.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        # Seeding the full byte alphabet is what makes every input encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)

    ids = {t: tok.token_to_id(t) for t in specials}
    if family == "t5":
        post = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", ids["</s>"])]
        )
    else:
        post = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", ids["<s>"]), ("</s>", ids["</s>"])],
        )
    tok.post_processor = post
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS[family])
