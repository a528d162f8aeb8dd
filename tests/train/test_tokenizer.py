"""train.tokenizer: the byte tokenizer's layout of specials and symbols, and its round trip."""
import pytest

from train.tokenizer import BOS, EOS, PAD, ByteTokenizer

TOK = ByteTokenizer()


def test_tokenizer_layout_and_round_trip():
  assert (TOK.PAD, TOK.BOS, TOK.EOS) == (256, 257, 258)
  assert TOK.vocab_size == 512
  text = "<bos>Naïve <E17> lives in <A4>.\n<K0><V49> 12345<eos><pad>"
  ids = TOK.encode(text)
  assert TOK.decode(ids) == text
  assert ids[0] == BOS and ids[-2:] == [EOS, PAD]
  assert TOK.encode("<E17>") == [TOK.symbol("E", 17)] and TOK.encode("a") == [97]
  assert len({TOK.symbol(c, i) for c, n in (("E", 128), ("A", 25), ("K", 50), ("V", 50)) for i in range(n)}) == 253
  assert max(TOK.symbol(c, n - 1) for c, n in (("E", 128), ("A", 25), ("K", 50), ("V", 50))) == 511
  with pytest.raises(ValueError, match="<E128> is not in the vocabulary"):
    TOK.encode("<E128>")
  with pytest.raises(ValueError, match="token id"):
    TOK.decode([512])
