"""Encoders: the student prompt features equal ZImagePipeline's, and the VLM graft is exact."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from transformers import AutoModel, AutoTokenizer, Qwen3VLForConditionalGeneration

from dopsd_scale.encoders.debug import build_debug_image_processor, build_debug_vlm
from dopsd_scale.encoders.text import PromptEncoder
from dopsd_scale.encoders.vlm import GraftError, VLMTeacherContext, check_tokenizers_agree, graft_language_model

PROMPTS = ["a red circle on a blue background", "an anime girl with long purple hair, cherry blossoms"]


@pytest.fixture(scope="module")
def prompt_encoder(debug_models):
    return PromptEncoder.from_pipeline(debug_models["pipeline"])


def test_prompt_features_match_the_pipeline(prompt_encoder, debug_models):
    pipe = ZImagePipeline.from_pretrained(str(debug_models["pipeline"]))
    ref = pipe.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)[0]
    ours = prompt_encoder.encode(PROMPTS)
    assert [r.shape for r in ref] == [o.shape for o in ours]
    assert ours[0].shape[0] != ours[1].shape[0]  # padding removed: lengths differ
    for r, o in zip(ref, ours):
        torch.testing.assert_close(o, r.float())


def test_graft_copies_weights_and_text_only_hidden_states_agree(prompt_encoder, debug_models):
    vlm_dir = debug_models["teacher_vlm"]
    plain = Qwen3VLForConditionalGeneration.from_pretrained(str(vlm_dir))
    ctx = VLMTeacherContext.from_pretrained(
        vlm_dir, text_encoder=prompt_encoder.model, text_tokenizer=prompt_encoder.tokenizer
    )
    lm = ctx.model.model.language_model.state_dict()
    te = prompt_encoder.model.state_dict()
    assert set(lm) == set(te)
    for key, value in te.items():
        torch.testing.assert_close(lm[key], value, rtol=0, atol=0)
    # the graft really changed something: the VLM's own weights were different
    assert not torch.equal(
        plain.model.language_model.state_dict()["layers.0.mlp.up_proj.weight"], te["layers.0.mlp.up_proj.weight"]
    )
    for prompt in PROMPTS:
        inputs = ctx.build_inputs(None, prompt)
        via_vlm = ctx.model(**inputs, output_hidden_states=True).hidden_states[-2]
        via_te = prompt_encoder.model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(via_vlm, via_te, atol=1e-5, rtol=1e-5)


def test_teacher_context_holds_the_image(prompt_encoder, debug_models):
    ctx = VLMTeacherContext.from_pretrained(
        debug_models["teacher_vlm"], text_encoder=prompt_encoder.model, min_pixels=32 * 32, max_pixels=64 * 64
    )
    red = Image.new("RGB", (48, 32), (220, 30, 30))
    blue = Image.new("RGB", (48, 32), (30, 30, 220))
    a, b = ctx.encode([red, blue], [PROMPTS[0]] * 2)
    text_only = prompt_encoder.encode([PROMPTS[0]])[0]
    assert a.shape == b.shape and a.shape[1] == prompt_encoder.dim
    assert a.shape[0] > text_only.shape[0]  # image tokens were added
    assert not torch.allclose(a, b)  # and the image changes the context
    inputs = ctx.build_inputs(red, PROMPTS[0])
    n_image = int(inputs["mm_token_type_ids"].sum())
    assert n_image == int(inputs["image_grid_thw"][0].prod()) // 4


def test_teacher_context_truncates_text_not_image(prompt_encoder, debug_models):
    ctx = VLMTeacherContext.from_pretrained(
        debug_models["teacher_vlm"],
        text_encoder=prompt_encoder.model,
        min_pixels=32 * 32,
        max_pixels=64 * 64,
        max_tokens=16,
    )
    img = Image.new("RGB", (32, 32), (0, 200, 0))
    feats = ctx.encode([img], ["a very long prompt " * 20])[0]
    assert feats.shape[0] == 16
    tiny = VLMTeacherContext.from_pretrained(
        debug_models["teacher_vlm"], max_tokens=3, min_pixels=32 * 32, max_pixels=64 * 64
    )
    with pytest.raises(ValueError, match="cut the image tokens"):
        tiny.build_inputs(img, "x")


def real_pair_vlm(tok, seed: int = 1):
    """A tiny Qwen3-VL with the real pair's positional fields: Qwen3-VL-4B-Instruct's text config has
    rope_theta 5e6 with interleaved multimodal RoPE (sections [24, 20, 20] of 64 frequency pairs;
    here [3, 3, 2] of the tiny head's 8), where Z-Image's Qwen3-4B text encoder has 1e6."""
    vlm = build_debug_vlm(tok, seed=seed)
    text = vlm.config.text_config
    text.rope_parameters = {
        **text.rope_parameters,
        "rope_theta": 5_000_000.0,
        "mrope_section": [3, 3, 2],
        "mrope_interleaved": True,
    }
    return Qwen3VLForConditionalGeneration(vlm.config).eval()


def test_graft_keeps_the_vlm_positions_of_the_real_pair(prompt_encoder, debug_models, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(debug_models["teacher_vlm"]))
    vlm_dir = tmp_path / "vlm"
    real_pair_vlm(tok).save_pretrained(str(vlm_dir))
    tok.save_pretrained(str(vlm_dir))
    build_debug_image_processor().save_pretrained(str(vlm_dir))
    kept = VLMTeacherContext.from_pretrained(
        vlm_dir, text_encoder=prompt_encoder.model, text_tokenizer=prompt_encoder.tokenizer
    )
    assert kept.describe()["positions"] == "vlm"
    assert kept.describe()["graft"]["differences"]["rope.rope_theta"] == [1_000_000.0, 5_000_000.0]
    text = VLMTeacherContext.from_pretrained(vlm_dir, text_encoder=prompt_encoder.model, positions="text")
    inputs = kept.build_inputs(None, PROMPTS[1])
    reference = prompt_encoder.model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states[-2]
    via_kept = kept.model(**inputs, output_hidden_states=True).hidden_states[-2]
    via_text = text.model(**inputs, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(via_text, reference, atol=1e-5, rtol=1e-5)  # the other choice: exact text positions
    assert (via_kept - reference).abs().max() > 1e-4  # the default really keeps the VLM's own rotary base


# The added tokens of the two real tokenizers (tokenizer_config.json of Qwen3-4B and of
# Qwen3-VL-4B-Instruct: the same table, ids 151643-151668), on a base vocabulary of 151643 tokens.
REAL_ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]


class _Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


def test_vocabulary_agreement_on_the_real_tokenizer_tables():
    base = {f"tok{i}": i for i in range(151643)}
    real = {**base, **{t: 151643 + i for i, t in enumerate(REAL_ADDED_TOKENS)}}
    check_tokenizers_agree(_Vocab(real), _Vocab(dict(real)))
    check_tokenizers_agree(_Vocab(real), _Vocab({**real, "<|extra|>": 151669}))  # one side's extra token: fine
    with pytest.raises(GraftError, match="image_pad"):
        check_tokenizers_agree(_Vocab(real), _Vocab({k: v for k, v in real.items() if k != "<|image_pad|>"}))
    with pytest.raises(GraftError, match="'<think>' has id"):
        check_tokenizers_agree(_Vocab(real), _Vocab({**real, "<think>": 5}))


def test_graft_refuses_mismatched_width(debug_models):
    from transformers import Qwen3Config, Qwen3Model

    tok = AutoTokenizer.from_pretrained(str(debug_models["teacher_vlm"]))
    wide = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    with pytest.raises(GraftError, match="hidden_size"):
        graft_language_model(build_debug_vlm(tok), wide)


def test_text_encoder_loads_as_the_pipeline_class(debug_models):
    model = AutoModel.from_pretrained(str(debug_models["pipeline"] / "text_encoder"))
    assert type(model).__name__ == "Qwen3Model"
