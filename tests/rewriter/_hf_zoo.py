"""Hugging Face models in their default configuration (KV cache on, return_dict on), built from small configs
with random weights: no download. Each entry gives the model and how a user calls it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VOCAB = 128
SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclass(frozen=True)
class ZooModel:
    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "decoder", "seq2seq", "encoder", "image"
    token_type_ids: bool = False

    @property
    def generative(self) -> bool:
        return self.kind in ("decoder", "seq2seq")

    def inputs(self, batch: int = 2, length: int = 8, seed: int = 0, full: bool = True) -> dict:
        """The example a user passes: ``full`` adds every tokenizer output (attention_mask, token_type_ids)."""
        gen = torch.Generator().manual_seed(seed)
        if self.kind == "image":
            return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}
        ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
        out = {"input_ids": ids}
        if full:
            mask = torch.ones_like(ids)
            mask[0, : length // 4] = 0  # the first row is left-padded
            out["attention_mask"] = mask
            if self.token_type_ids:
                out["token_type_ids"] = torch.zeros_like(ids)
        if self.kind == "seq2seq":
            out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, max(1, length // 2)), generator=gen)
        return out


def _hf(name: str, **cfg):
    import transformers

    config_cls, model_cls = {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
        "phi3": ("Phi3Config", "Phi3ForCausalLM"), "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM"),
        "t5": ("T5Config", "T5ForConditionalGeneration"), "bart": ("BartConfig", "BartForConditionalGeneration"),
        "bert": ("BertConfig", "BertModel"), "roberta": ("RobertaConfig", "RobertaModel"),
        "distilbert": ("DistilBertConfig", "DistilBertModel"), "vit": ("ViTConfig", "ViTModel"),
    }[name]

    def build():
        torch.manual_seed(0)
        config = getattr(transformers, config_cls)(**cfg)
        return getattr(transformers, model_cls)(config).eval()

    return build


_DEC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=VOCAB, max_position_embeddings=64, **SPECIAL)

ZOO = (
    ZooModel("gpt2", _hf("gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                         bos_token_id=1, eos_token_id=2), "decoder"),
    ZooModel("llama", _hf("llama", **_DEC), "decoder"),
    ZooModel("qwen2", _hf("qwen2", **_DEC), "decoder"),
    ZooModel("mistral", _hf("mistral", **_DEC), "decoder"),
    ZooModel("phi3", _hf("phi3", **_DEC), "decoder"),
    ZooModel("gpt_neox", _hf("gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64, **SPECIAL),
             "decoder"),
    ZooModel("t5", _hf("t5", d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=VOCAB,
                       decoder_start_token_id=0, **SPECIAL), "seq2seq"),
    ZooModel("bart", _hf("bart", d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB,
                         max_position_embeddings=64, decoder_start_token_id=2, forced_eos_token_id=None,
                         **SPECIAL), "seq2seq"),
    ZooModel("bert", _hf("bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0), "encoder", True),
    ZooModel("roberta", _hf("roberta", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=70, pad_token_id=0,
                            bos_token_id=1, eos_token_id=2), "encoder", True),
    ZooModel("distilbert", _hf("distilbert", dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=VOCAB,
                               max_position_embeddings=64, pad_token_id=0), "encoder"),
    ZooModel("vit", _hf("vit", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        image_size=32, patch_size=8), "image"),
)

BY_NAME = {m.name: m for m in ZOO}
