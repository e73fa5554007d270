"""Placeholder: replaced by the tokenizer branch (i25-tok)."""


class Qwen2Tokenizer:
    @classmethod
    def from_pretrained(cls, path):
        raise NotImplementedError
