"""The attention back-end switch: our Triton kernels inside the diffusers DiT match SDPA.

On CPU the kernels run in the Triton interpreter (slow), so the shapes stay tiny.
"""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention

from dopsd_scale.attention import TritonZImageAttnProcessor, apply_attention_backend, resolve_backend
from dopsd_scale.models import Condition, get_spec
from dopsd_scale.trainer import Trainer

pytest.importorskip("triton")


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="attention_backend"):
        resolve_backend("xformers", torch.device("cpu"))
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="flash-attn is not installed"):
            resolve_backend("flash_attn", torch.device("cpu"))


def test_triton_processor_matches_sdpa_forward_and_backward(debug_models):
    spec = get_spec("zimage", debug_models["pipeline"])
    ref = spec.load_transformer()
    ours = copy.deepcopy(ref)
    apply_attention_backend(ours, "triton")
    processors = [m.processor for m in ours.modules() if isinstance(m, Attention)]
    assert len(processors) == 4 and all(isinstance(p, TritonZImageAttnProcessor) for p in processors)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *spec.latent_shape(32, 32), generator=gen)
    feats = torch.randn(2, 9, ref.config.cap_feat_dim, generator=gen)
    cond = Condition(feats, torch.arange(9)[None] < torch.tensor([[9], [5]]))  # a padded caption
    sigma = torch.tensor([0.9, 0.4])
    outs = []
    for model in (ref, ours):
        v = spec.velocity(model, x, sigma, cond)
        v.square().mean().backward()
        outs.append((v.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-4)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], g, atol=1e-5, rtol=1e-3, msg=name)


def test_training_with_triton_gives_the_same_losses_as_sdpa(make_config):
    losses = {}
    for backend in ("sdpa", "triton"):
        cfg = make_config(
            "objective.num_steps=1",
            "objective.sigmas=[1.0]",
            "run.max_steps=3",
            f"model.attention_backend={backend}",
            "metrics.val_every=-1",
            "checkpoint.save_final=false",
            "checkpoint.export_final=false",
            "checkpoint.resume=none",
        )
        trainer = Trainer(cfg)
        losses[backend] = []
        for _ in range(3):
            stats = trainer.train_step(next(trainer.loader)).main
            trainer.step += 1
            losses[backend].append(float(stats.loss))
    assert losses["triton"] == pytest.approx(losses["sdpa"], rel=1e-3)
