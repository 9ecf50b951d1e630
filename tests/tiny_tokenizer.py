"""A tiny word-level tokenizer shared by the model and generation tests."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def make_tokenizer(n_words: int = 40) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: <|pad|>=0, <|eos|>=1, <|bos|>=2, <unk>=3, then w0, w1, ..."""
    tokens = ["<|pad|>", "<|eos|>", "<|bos|>", "<unk>"] + [f"w{i}" for i in range(n_words)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", eos_token="<|eos|>", bos_token="<|bos|>",
        unk_token="<unk>", padding_side="left",
    )
