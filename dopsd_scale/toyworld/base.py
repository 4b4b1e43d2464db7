"""The toy world's model directory: a tiny in-context few-step DiT with its text encoder.

Layout of a toy model directory (what the `toyworld` model spec loads, and what export writes):
  toyworld.json   world and conventions: image size, how the reference reaches the network,
                  the sampler's schedule (shift, steps); measured quality once pretrained
  transformer/    ZImageTransformer2DModel in pixel space (patch 4 on 16x16 RGB)
  text_encoder/   a tiny Qwen3 (random, frozen weights): the caption features the DiT reads
  tokenizer/      a word-level tokenizer over the world's vocabulary, with Qwen's chat template

The DiT is Z-Image's own class; only its size differs. The reference image (the teacher's
context) enters as extra input channels: [noisy image 3 | reference 3 | flag 1]; the flag is 1
where a reference is given, so the same network serves the prompt-only student (zeros, flag 0)
and the in-context teacher. Of the 7 output channels the first 3 are the prediction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

from ..encoders.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

WORLD_FILE = "toyworld.json"
IMAGE_CHANNELS = 3
REFERENCE_MODES = ("channels",)
# ~1.97M parameters: what a prototype found trainable on 2 CPU cores in about half an hour.
TRANSFORMER = dict(
    all_patch_size=(4,),
    all_f_patch_size=(1,),
    in_channels=2 * IMAGE_CHANNELS + 1,
    dim=128,
    n_layers=4,
    n_refiner_layers=1,
    n_heads=4,
    n_kv_heads=4,
    cap_feat_dim=64,
    axes_dims=[8, 12, 12],
    axes_lens=[256, 16, 16],
)
TEXT_ENCODER = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
)
# Z-Image-Turbo's conventions, kept: time shift 3, so the 4-step schedule is (1, .9, .75, .5).
DEFAULT_WORLD = {
    "kind": "toyworld",
    "version": 1,
    "image_size": 16,
    "reference": "channels",
    "reference_style": "silhouette",
    "shift": 3.0,
    "sample_steps": 4,
}


def build_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: one id per caption word, plus Qwen's special tokens and chat words."""
    words = ["[UNK]", "user", "assistant", "system", *sorted(set(vocabulary))]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL_TOKENS)  # split out before the whitespace split
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        chat_template=CHAT_TEMPLATE,
    )


def build_text_encoder(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> Qwen3Model:
    """Random, frozen Qwen3 features: distinct per word and position, as a real encoder's are."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **TEXT_ENCODER)
    return Qwen3Model(cfg).eval()


def build_transformer(seed: int = 0):
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(**TRANSFORMER)


def read_world(path: str | Path) -> dict:
    """The directory's toyworld.json (raises FileNotFoundError naming the file)."""
    file = Path(path) / WORLD_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not a toy-world model directory")
    return json.loads(file.read_text(encoding="utf-8"))


def write_world(path: str | Path, world: dict) -> None:
    Path(path).mkdir(parents=True, exist_ok=True)
    (Path(path) / WORLD_FILE).write_text(json.dumps(world, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def init_model_dir(out: str | Path, seed: int = 0) -> Path:
    """A fresh (untrained) toy model directory: tokenizer, text encoder, transformer, world file."""
    from .world import VOCABULARY

    out = Path(out)
    tokenizer = build_tokenizer(VOCABULARY)
    tokenizer.save_pretrained(str(out / "tokenizer"))
    build_text_encoder(tokenizer, seed).save_pretrained(str(out / "text_encoder"))
    build_transformer(seed).save_pretrained(str(out / "transformer"))
    write_world(out, dict(DEFAULT_WORLD))
    return out
