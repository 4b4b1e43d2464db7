"""LoRA mode: a trainable student adapter and its EMA teacher adapter on one frozen base (peft).

D-OPSD's teacher is the same network as the student. In LoRA mode both are adapters of one
diffusers transformer: `student` (trained) and `teacher` (its EMA; only for `teacher.kind=ema`).
The base weights never change, are stored once (in memory and nowhere in checkpoints), and the
roll-out switches adapters between the teacher and student forwards without copying a weight.

Facts this relies on (peft 0.21, diffusers 0.42; see the tests):
- peft's and diffusers' `set_adapter` rewrite `requires_grad` on every switch (the active adapter
  becomes trainable, the others frozen). That breaks FSDP2 mixed precision when the first forward
  of a step is the teacher's (pytorch#186998) and ZeRO-2, which hooks only the parameters that
  were trainable at `deepspeed.initialize`. So the adapters are set up once (student trainable,
  teacher frozen) and a forward switches only the layers' active-adapter flag (`use_adapter`):
  LoRA layers read nothing else to pick their adapter, and `requires_grad` never changes.
  peft has no public setter that leaves `requires_grad` alone, hence the private `_active_adapter`
  (diffusers itself assigns the active adapter directly for old peft layers).
- The two adapters get different random lora_A at creation: the teacher starts as a copy of the
  student (lora_B is zero in both, so both start as the base).
- The teacher adapter has no dropout (its forward is deterministic in training mode); the student's
  is `lora.dropout` (0 by default: a dropout would make the on-policy roll-out random too).
- Adapters are kept in fp32 whatever the base's dtype (the LoRA forward casts its input to the
  adapter's dtype and the sum back), so AdamW and the 0.9999 EMA are not rounded away.
- The EMA runs on the factors: the teacher's update is EMA(B) EMA(A), not EMA(BA); the difference
  is second order in the per-step change (the usual LoRA-EMA practice).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

STUDENT = "student"
TEACHER = "teacher"
FACTORS = ("lora_A", "lora_B")


def peft_config(rank: int, alpha: float, target_modules: str, dropout: float = 0.0):
    """peft's LoraConfig; `target_modules` is a regex matched against full module names."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=target_modules, lora_dropout=dropout, init_lora_weights=True
    )


def add_adapters(
    model: nn.Module, rank: int, alpha: float, target_modules: str, dropout: float = 0.0, teacher: bool = True
) -> None:
    """Add the student (and teacher) adapters to a diffusers transformer, before any sharding.

    Afterwards: the base is frozen, the student adapter trainable and active, the teacher adapter
    a frozen copy of the student's, all adapter weights in fp32.
    """
    model.add_adapter(peft_config(rank, alpha, target_modules, dropout), adapter_name=STUDENT)
    if teacher:
        with warnings.catch_warnings():  # a second adapter on purpose
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            model.add_adapter(peft_config(rank, alpha, target_modules, 0.0), adapter_name=TEACHER)
    model.set_adapter(STUDENT)
    layers = lora_layers(model)
    with torch.no_grad():
        for layer in layers:
            for factor in FACTORS:
                for adapter in getattr(layer, factor).values():
                    adapter.to(torch.float32)
        if teacher:
            for t, s in zip(*adapter_pairs(model)):
                t.copy_(s)
    trainable = {id(p) for p in adapter_params(model, STUDENT)}
    wrong = [n for n, p in model.named_parameters() if p.requires_grad != (id(p) in trainable)]
    if wrong:
        raise RuntimeError(f"LoRA set-up left {len(wrong)} parameters with the wrong requires_grad, e.g. {wrong[0]}")


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """peft's LoRA layers of `model`, in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def is_lora_model(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_params(model: nn.Module, adapter: str) -> list[torch.Tensor]:
    """One adapter's parameters, found structurally (layer.lora_A[adapter].weight ...), in module
    order: the same order for every adapter, so two lists pair element by element."""
    params = []
    for layer in lora_layers(model):
        for factor in FACTORS:
            module = getattr(layer, factor)[adapter]
            params.extend(p for _, p in sorted(module.named_parameters(), key=lambda item: item[0]))
    return params


def adapter_pairs(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(teacher parameters, student parameters), paired element by element."""
    return adapter_params(model, TEACHER), adapter_params(model, STUDENT)


def adapter_keys(model: nn.Module, adapter: str) -> list[str]:
    """State-dict names of one adapter's parameters (`<module>.lora_A.<adapter>.weight` ...)."""
    ids = {id(p) for p in adapter_params(model, adapter)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@contextlib.contextmanager
def use_adapter(layers: list[nn.Module], adapter: Optional[str]) -> Iterator[None]:
    """Forwards inside run with `adapter` active (None: the bare base), then the previous one.

    Only the layers' active-adapter flag changes: no weight is copied, `requires_grad` is untouched.
    Never run a backward inside (gradient checkpointing recomputes with the adapter active then).
    """
    previous = [layer._active_adapter for layer in layers]
    names = [] if adapter is None else [adapter]
    for layer in layers:
        layer._active_adapter = names
    try:
        yield
    finally:
        for layer, active in zip(layers, previous):
            layer._active_adapter = active


class AdapterView(nn.Module):
    """The model as seen with another adapter active: the teacher (`teacher`) or the base (None).

    Called like the model (the specs' `velocity` takes it for a network), so the trainer and the
    validation grids run a teacher forward with no knowledge of LoRA. It holds no weights of its
    own: its parameters are the model's.
    """

    def __init__(self, model: nn.Module, adapter: Optional[str]):
        super().__init__()
        self.inner = model
        self.adapter = adapter
        self._layers: Optional[list[nn.Module]] = None

    def forward(self, *args, **kwargs):
        if self._layers is None:
            self._layers = lora_layers(self.inner)
        with use_adapter(self._layers, self.adapter):
            return self.inner(*args, **kwargs)


@torch.no_grad()
def attach_adapter(
    model: nn.Module, state: dict[str, torch.Tensor], rank: int, alpha: float, adapter: str = "default"
) -> None:
    """Inject one trained adapter (peft names, `<module>.lora_A.weight`) into a plain transformer,
    as training ran it (scale alpha / rank, no dropout): for sampling from a LoRA checkpoint."""
    import re

    from .lora_files import adapter_modules

    targets = "^(" + "|".join(re.escape(m) for m in adapter_modules(state)) + ")$"
    model.add_adapter(peft_config(rank, alpha, targets, 0.0), adapter_name=adapter)
    for key, value in state.items():
        module, factor, param = key.rsplit(".", 2)
        target = getattr(getattr(model.get_submodule(module), factor)[adapter], param)
        target.copy_(value.to(target.dtype))
