"""A small byte-level BPE, trained here on the synthetic world's copy and prompts: what a checkpoint a
user brings ships (GPT-2/Qwen2-style: merges, a regex pre-tokenizer, no BOS, <|endoftext|> as EOS and
pad, a second end token as Qwen2's <|im_end|>), at a few thousand tokens instead of 150k."""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aigc_dist.data.prompts import text_prompt
from aigc_dist.demo.world import WorldConfig, make_world
from aigc_dist.models.tokenizer import TextTokenizer

BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@cache
def _trained(vocab_size: int) -> str:
    world = make_world(WorldConfig(num_users=2000, num_items=800, candidates_per_user=5, seed=11))
    texts = [copy for _, _, copy in world.training_records()]
    texts += [text_prompt([("segment", u["segment"]), ("locale", u["locale"])], [("title", i["title"])])
              for u, i, _ in world.training_records(2000)]  # fmt: skip
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte: any text encodes
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer.to_str()  # cached as text: each caller gets its own Tokenizer object


def bpe_tokenizer(vocab_size: int = 3000) -> TextTokenizer:
    """The trained BPE with a tokenizer_config.json that `transformers.AutoTokenizer` reads."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>", "model_max_length": 512, "clean_up_tokenization_spaces": False,
              "additional_special_tokens": list(BPE_SPECIALS[1:])}  # fmt: skip
    return TextTokenizer(Tokenizer.from_str(_trained(vocab_size)), config, "test BPE")
