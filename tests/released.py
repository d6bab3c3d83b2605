"""A directory written the way PFN releases PLaMo 2 (pfnet/plamo-2-1b), at small shapes: it stands in
for a download in the tests. What makes it the released layout:

  - config.json with the keys of the released 1B config, the ones our model does not use too
    (linear_type, n_expert, sparse_step, use_predefined_initial_state, auto_map, tokenizer_class, ...);
  - tokenizer.jsonl: the five control pieces, the 256 <0xXX> byte pieces, then normal pieces with
    log-frequency scores (a Unigram-style vocabulary built from text);
  - tokenizer_config.json, special_tokens_map.json, and the remote code files beside them;
  - the weights in bfloat16, sharded over two safetensors files with model.safetensors.index.json;
  - no lineage.json and no training state: nothing of ours.
"""
import collections
import json
import math
import os

import torch

import corpus
from plamo2 import PLaMo2, PLaMo2Config

SPECIALS = [["<|plamo:unk|>", 0.0, "UNKNOWN"], ["<|plamo:bos|>", 0.0, "CONTROL"],
            ["<|plamo:eos|>", 0.0, "CONTROL"], ["<|plamo:pad|>", 0.0, "CONTROL"],
            ["<|plamo:op|>", 0.0, "CONTROL"]]
BYTES = [[f"<0x{b:02X}>", 0.0, "BYTE"] for b in range(256)]

# The released 1B config.json's keys, with values at our small shapes where they are shapes.
CONFIG = {
    "architectures": ["Plamo2ForCausalLM"],
    "attention_window_size": 16,
    "auto_map": {"AutoConfig": "modeling_plamo.Plamo2Config", "AutoModelForCausalLM": "modeling_plamo.Plamo2ForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3,
    "capacity_factor": 1.0,
    "eval_attention_n_bit": None, "eval_mlp_n_bit": None,
    "fp8_accum_dtype": "bfloat16",
    "full_attention_idx": [],
    "group_size": 1024,
    "hidden_size": 64, "hidden_size_per_head": 32,
    "image_feature_size": None, "image_proj_type": "linear", "image_token_id": None,
    "intermediate_size": 96,
    "k_expert": None,
    "linear_type": "normal",
    "mamba_chunk_size": 8, "mamba_d_conv": 4, "mamba_d_state": 8, "mamba_enabled": True, "mamba_num_heads": 2,
    "mamba_step": 2,
    "max_position_embeddings": 10485760,
    "model_type": "plamo2",
    "n_expert": None,
    "num_attention_heads": 2, "num_hidden_layers": 4, "num_key_value_heads": 1,
    "rms_norm_eps": 1e-06,
    "shared_intermediate_size": None,
    "sliding_window": 16,
    "sparse_intermediate_size": None, "sparse_step": None,
    "tie_word_embeddings": True,
    "tokenizer_class": "PlamoTokenizer",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.2",
    "use_cache": True,
    "use_predefined_initial_state": False,
}
TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False,
    "auto_map": {"AutoTokenizer": ["tokenization_plamo.PlamoTokenizer", None]},
    "bos_token": "<|plamo:bos|>", "clean_up_tokenization_spaces": False, "cls_token": None,
    "eos_token": "<|plamo:eos|>", "local_file_only": True, "mask_token": None,
    "model_max_length": 1000000000000000019884624838656, "pad_token": "<|plamo:pad|>", "sep_token": None,
    "sp_model_kwargs": {}, "tokenizer_class": "PlamoTokenizer", "unk_token": "<|plamo:unk|>",
}
SPECIAL_TOKENS_MAP = {"bos_token": "<|plamo:bos|>", "eos_token": "<|plamo:eos|>", "pad_token": "<|plamo:pad|>",
                      "unk_token": "<|plamo:unk|>"}


def vocabulary(texts, size, max_len=4):
    """Rows of a Unigram-style tokenizer.jsonl of `size` entries: the specials, the bytes, then the
    most frequent substrings of texts (up to max_len characters) scored by their log frequency."""
    counts = collections.Counter()
    for t in texts:
        for n in range(1, max_len + 1):
            counts.update(t[i:i + n] for i in range(len(t) - n + 1))
    total = sum(counts.values())
    top = [p for p, _ in counts.most_common() if "<|" not in p][:size - len(SPECIALS) - len(BYTES)]
    return SPECIALS + BYTES + [[p, math.log(counts[p] / total), "NORMAL", None] for p in top]


def write(path, vocab_size=1500, seed=0):
    """The released layout at path; returns path."""
    os.makedirs(path, exist_ok=True)
    c = corpus.generate_corpus(seed=seed, target_bytes=60_000)
    rows = vocabulary(c.train, vocab_size)
    with open(os.path.join(path, "tokenizer.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    config = {**CONFIG, "vocab_size": len(rows)}
    torch.manual_seed(seed)
    model = PLaMo2(PLaMo2Config.from_dict(config)).to(torch.bfloat16)
    model.save_hf(path, max_shard_bytes=150_000)  # two shards and an index
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    for name, obj in (("config.json", config), ("tokenizer_config.json", TOKENIZER_CONFIG),
                      ("special_tokens_map.json", SPECIAL_TOKENS_MAP), ("generation_config.json",
                                                                        {"bos_token_id": 1, "eos_token_id": 2})):
        with open(os.path.join(path, name), "w") as f:
            json.dump(obj, f, indent=2)
    for name in ("tokenization_plamo.py", "modeling_plamo.py"):
        with open(os.path.join(path, name), "w") as f:
            f.write(f"# {name}: PFN's remote code ships here (not needed by this project)\n")
    return path


def user_data(path, seed=0):
    """What a user brings: a directory of text (.txt and .jsonl), conversations, preference pairs and
    an evaluation set of their own (JSONL), under path. Returns {name: path}."""
    c = corpus.generate_corpus(seed=seed + 1, target_bytes=40_000)
    text = os.path.join(path, "my_text")
    os.makedirs(os.path.join(text, "more"), exist_ok=True)
    with open(os.path.join(text, "a.txt"), "w", encoding="utf-8") as f:
        f.write("\n\n\n".join(c.train[:60]) + "\n")
    with open(os.path.join(text, "more", "b.jsonl"), "w", encoding="utf-8") as f:
        for d in c.train[60:120] + c.val:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    qa = [("東京の天気は?", "晴れです。"), ("What is 2 + 3?", "5."), ("犬は何と鳴きますか。", "ワンと鳴きます。"),
          ("Say hello.", "Hello!"), ("日本の首都は?", "東京です。"), ("Name a color.", "Blue.")]
    files = {"text": text}
    for name, rows in (("conversations", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                                          for q, a in qa * 4]),
                       ("pairs", [{"prompt": [{"role": "user", "content": q}], "chosen": a, "rejected": a[::-1] + "?"}
                                  for q, a in qa * 2]),
                       ("eval", [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                  "task": "ja" if ord(q[0]) > 127 else "en"} for q, a in qa])):
        files[name] = os.path.join(path, f"my_{name}.jsonl")
        with open(files[name], "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return files
