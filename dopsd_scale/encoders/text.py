"""The student condition: Z-Image's prompt features from its Qwen3 text encoder.

Exactly what ZImagePipeline feeds its DiT: the prompt in a user turn of the chat template (with
the generation prompt), truncated to `max_length`, hidden_states[-2], padding removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )


def load_pipeline_text_encoder(path: str | Path, dtype: torch.dtype, device: str):
    """(tokenizer, model) from `tokenizer/` and `text_encoder/` of a diffusers pipeline directory
    (AutoModel: the Qwen3 backbone of a Qwen3ForCausalLM checkpoint, same hidden states, no logits)."""
    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    return tokenizer, AutoModel.from_pretrained(str(path / "text_encoder"), dtype=dtype).to(device)


class PromptEncoder:
    """Prompts -> list of unpadded [L_i, D] features (the DiT's caption input)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        model: PreTrainedModel,
        max_length: int = 512,
        hidden_layer: int = -2,
    ):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.hidden_layer = hidden_layer

    @classmethod
    def from_pipeline(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", **kw):
        """Load `tokenizer/` and `text_encoder/` from a diffusers pipeline directory."""
        return cls(*load_pipeline_text_encoder(path, dtype, device), **kw)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def describe(self) -> dict:
        """What the manifest records about this encoder."""
        return {"hidden_layer": self.hidden_layer, "max_length": self.max_length, "template": "chat/user"}

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        texts = [chat_prompt(self.tokenizer, p) for p in prompts]
        # Right padding to the longest prompt, not to max_length as the pipeline does: the model
        # is causal, so the real tokens' hidden states are the same and short batches are cheap.
        enc = self.tokenizer(
            texts,
            padding="longest",
            padding_side="right",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = enc.input_ids.to(self.device)
        mask = enc.attention_mask.to(self.device).bool()
        hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        feats = hidden[self.hidden_layer]
        return [f[m].float().cpu() for f, m in zip(feats, mask)]
