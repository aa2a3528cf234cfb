"""Offline tiny models: random weights from a config and a tokenizer trained on the spot.

Nothing here touches the network. The tokenizer is byte-level BPE, so every string
encodes (unknown words fall back to bytes); it is trained on the texts the run will
see, so frequent words are single tokens and a small model learns fast. The same
texts and seed give the same tokenizer and the same initial weights.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from ftexp.errors import ConfigError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"


def build_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, seq2seq: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; BOS is prepended to every encoding."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if seq2seq:  # T5 style: no BOS, EOS closes the sequence
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    else:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, tok.token_to_id(BOS))])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    return fast


def build_config(family: str, vocab_size: int, tokenizer, *, hidden_size: int = 128, num_layers: int = 2,
                 num_heads: int = 4, intermediate_size: int = 512, max_position_embeddings: int = 512):
    """A transformers config for a tiny model of ``family`` (llama | falcon | t5 | gpt_neox)."""
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                           num_hidden_layers=num_layers, num_attention_heads=num_heads,
                           num_key_value_heads=num_heads, max_position_embeddings=max_position_embeddings,
                           tie_word_embeddings=True, **ids)
    if family == "falcon":
        from transformers import FalconConfig
        # Falcon-7B's layout: one shared key/value head (multi-query), attention and MLP in parallel
        return FalconConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, ffn_hidden_size=intermediate_size,
                            max_position_embeddings=max_position_embeddings, multi_query=True, parallel_attn=True,
                            bias=False, new_decoder_architecture=False, alibi=False, **ids)
    if family == "gpt_neox":
        from transformers import GPTNeoXConfig
        return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                             num_attention_heads=num_heads, intermediate_size=intermediate_size,
                             max_position_embeddings=max_position_embeddings, rotary_pct=0.25,
                             use_parallel_residual=True, tie_word_embeddings=False, **ids)
    if family == "t5":
        from transformers import T5Config
        return T5Config(vocab_size=vocab_size, d_model=hidden_size, d_kv=hidden_size // num_heads,
                        d_ff=intermediate_size, num_layers=num_layers, num_decoder_layers=num_layers,
                        num_heads=num_heads, feed_forward_proj="gated-gelu",
                        # transformers 5 always ties T5's head to its embeddings when building from a
                        # config; tie=True also keeps the d_model**-0.5 output scaling a tied head needs
                        # (False would drop it and start the loss near 60 instead of ln(vocab)).
                        tie_word_embeddings=True,
                        decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    raise ConfigError(f"model.tiny.family={family!r}; valid: llama, falcon, gpt_neox, t5")


def build_model(config, seed: int):
    """Random-weight model from ``config``; the seed fixes the initial weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model
