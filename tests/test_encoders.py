"""Encoders: the student prompt features equal ZImagePipeline's, and the VLM graft is exact."""

from __future__ import annotations

import pytest
import torch
from diffusers import ZImagePipeline
from PIL import Image
from transformers import AutoModel, AutoTokenizer, Qwen3VLForConditionalGeneration

from dopsd_scale.encoders.debug import build_debug_vlm
from dopsd_scale.encoders.text import PromptEncoder
from dopsd_scale.encoders.vlm import GraftError, VLMTeacherContext, graft_language_model

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
    ctx = VLMTeacherContext.from_pretrained(vlm_dir, text_encoder=prompt_encoder.model,
                                            text_tokenizer=prompt_encoder.tokenizer)
    lm = ctx.model.model.language_model.state_dict()
    te = prompt_encoder.model.state_dict()
    assert set(lm) == set(te)
    for key, value in te.items():
        torch.testing.assert_close(lm[key], value, rtol=0, atol=0)
    # the graft really changed something: the VLM's own weights were different
    assert not torch.equal(plain.model.language_model.state_dict()["layers.0.mlp.up_proj.weight"],
                           te["layers.0.mlp.up_proj.weight"])
    for prompt in PROMPTS:
        inputs = ctx.build_inputs(None, prompt)
        via_vlm = ctx.model(**inputs, output_hidden_states=True).hidden_states[-2]
        via_te = prompt_encoder.model(input_ids=inputs["input_ids"], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(via_vlm, via_te, atol=1e-5, rtol=1e-5)


def test_teacher_context_holds_the_image(prompt_encoder, debug_models):
    ctx = VLMTeacherContext.from_pretrained(debug_models["teacher_vlm"], text_encoder=prompt_encoder.model,
                                            min_pixels=32 * 32, max_pixels=64 * 64)
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
    ctx = VLMTeacherContext.from_pretrained(debug_models["teacher_vlm"], text_encoder=prompt_encoder.model,
                                            min_pixels=32 * 32, max_pixels=64 * 64, max_tokens=16)
    img = Image.new("RGB", (32, 32), (0, 200, 0))
    feats = ctx.encode([img], ["a very long prompt " * 20])[0]
    assert feats.shape[0] == 16
    tiny = VLMTeacherContext.from_pretrained(debug_models["teacher_vlm"], max_tokens=3,
                                             min_pixels=32 * 32, max_pixels=64 * 64)
    with pytest.raises(ValueError, match="cut the image tokens"):
        tiny.build_inputs(img, "x")


def test_graft_refuses_mismatched_rotary_base(prompt_encoder, debug_models):
    tok = AutoTokenizer.from_pretrained(str(debug_models["teacher_vlm"]))
    vlm = build_debug_vlm(tok)
    vlm.config.text_config.rope_parameters["rope_theta"] = 10_000.0
    with pytest.raises(GraftError, match="rope_theta"):
        graft_language_model(vlm, prompt_encoder.model)


def test_graft_refuses_mismatched_width(debug_models):
    from transformers import Qwen3Config, Qwen3Model

    tok = AutoTokenizer.from_pretrained(str(debug_models["teacher_vlm"]))
    wide = Qwen3Model(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    with pytest.raises(GraftError, match="hidden_size"):
        graft_language_model(build_debug_vlm(tok), wide)


def test_text_encoder_loads_as_the_pipeline_class(debug_models):
    model = AutoModel.from_pretrained(str(debug_models["pipeline"] / "text_encoder"))
    assert type(model).__name__ == "Qwen3Model"
