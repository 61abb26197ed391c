"""Byte-level tokenizer of the zoo LM: ids 0..255 are bytes, then a few specials."""
from __future__ import annotations

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
VOCAB_SIZE = 259


class ByteTokenizer:
    pad_token_id = PAD_ID
    bos_token_id = BOS_ID
    eos_token_id = EOS_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str | bytes, add_bos: bool = True) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return ([BOS_ID] if add_bos else []) + list(data)

    def decode_bytes(self, ids) -> bytes:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256)

    def decode(self, ids) -> str:
        # Special ids are dropped; partial UTF-8 sequences are replaced, never raised on.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")
