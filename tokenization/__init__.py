"""Text front end: normalization, language identification, segmentation and the subword tokenizer.

Torch-free and cheap to import: hazm, jieba and ``tokenizers`` are loaded on first use.

    from sokhan.tokenization import Tokenizer, normalize, detect_language
    tok = Tokenizer.load("runs/sample/tokenize/tokenizer.json")
    ids = tok.encode("کتاب‌ها را خواندم")        # language detected by script
    assert tok.decode(ids) == normalize("کتاب‌ها را خواندم", "fa")
"""

from sokhan.tokenization.langid import LANGUAGES, detect_language
from sokhan.tokenization.normalize import normalize
from sokhan.tokenization.segment import SegmenterConfig, pretokenize, segment
from sokhan.tokenization.tokenizer import SPECIAL_TOKENS, Tokenizer, lang_token

__all__ = [
    "LANGUAGES", "SPECIAL_TOKENS", "SegmenterConfig", "Tokenizer", "detect_language", "lang_token", "normalize",
    "pretokenize", "segment",
]
