"""A tiny byte-level BPE tokenizer with Qwen's special tokens and chat template.

The real Qwen3 / Qwen3-VL tokenizers are downloads; tests and the debug flavor build this one
instead, save it with `save_pretrained`, and load it back through `AutoTokenizer`, the same path
a real tokenizer takes. Byte-level BPE encodes any string, so no caption is ever unencodable.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen's chat layout, reduced to what the encoders use: user turns with text and images.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "a red circle on a blue background",
    "a green square and a yellow triangle on a white background",
    "an anime girl with long purple hair in a school uniform, cherry blossoms",
    "a black cat sitting on an orange sofa, soft light, detailed illustration",
    "user assistant system image picture photo style colour color small large",
]


def build_debug_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a fixed corpus (deterministic, well under a second)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )


def save_debug_tokenizer(out_dir: str | Path) -> PreTrainedTokenizerFast:
    tok = build_debug_tokenizer()
    tok.save_pretrained(str(out_dir))
    return tok
