"""Small in-memory LM artifacts for the engine's request and streaming tests: a random-weight model on the
byte-level tokenizer, and one on a chat checkpoint's tokenizer (the byte-level vocabulary plus Qwen2's
turn tokens and a chat template), which `write_tokenizer_dir` writes out for transformers to open."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer

from aigc_dist.data.prompts import PromptTemplate
from aigc_dist.engine.text import prompt_conditioning
from aigc_dist.models.artifact import Artifact
from aigc_dist.models.llama import LlamaLM, LMConfig
from aigc_dist.models.tokenizer import TextTokenizer, byte_level_tokenizer

TOK = byte_level_tokenizer()
TEMPLATE = PromptTemplate(max_field_chars=24, max_prompt_tokens=128)
# Qwen2's chat template, shortened, with a BOS and a rule that makes the template refuse a conversation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer() -> TextTokenizer:
    raw = Tokenizer.from_str(TOK.files()["tokenizer.json"].decode())
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    config = {**TOK.config, "chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}
    return TextTokenizer(raw, config, "test chat checkpoint")


def write_tokenizer_dir(directory: Path, tokenizer: TextTokenizer) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in tokenizer.files().items():
        (directory / name).write_bytes(data)
    return directory


def lm_artifact(tokenizer: TextTokenizer = TOK, seed: int = 0, context: int = 192) -> Artifact:
    """A random 2-layer LM (init std 0.3, so greedy tokens are not float-rounding ties) as an artifact."""
    torch.manual_seed(seed)
    model = LlamaLM(LMConfig(vocab_size=tokenizer.vocab_size, num_hidden_layers=2, hidden_size=32,
                             intermediate_size=88, max_position_embeddings=context, initializer_range=0.3)).eval()
    meta = {"name": "t", "version": "v1", "digest": "0" * 64}
    return Artifact("lm", model, model.config, tokenizer, prompt_conditioning(TEMPLATE), meta)
