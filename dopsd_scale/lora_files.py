"""LoRA adapters as plain tensors: their names, the diffusers LoRA file, merging into a base.

Training keeps two peft adapters on one base (`dopsd_scale.lora`); its checkpoints hold their
tensors under peft's names with the adapter's name inside, `<module>.lora_A.student.weight`.
Everything here works on such state dicts without peft or a process group, so that export,
sampling and offline consolidation need no training state:
- `adapter_to_peft` picks one adapter and drops its name (`<module>.lora_A.weight`), the keys
  `get_peft_model_state_dict` gives and diffusers' LoRA loaders expect;
- `save_diffusers_lora` writes `pytorch_lora_weights.safetensors` through the stock pipeline's
  own `save_lora_weights` (keys `transformer.<module>.lora_A.weight`). The scale alpha / r is
  folded into lora_B and the metadata says `lora_alpha = r`, so every loader (diffusers with or
  without the metadata, ComfyUI-style loaders that assume alpha = r) applies the same weights;
  the metadata says `lora_dropout = 0` (a dropout there would make the stock pipeline's
  inference random: its freshly injected Dropout modules are in training mode);
- `merge_adapter` adds alpha / r * B A into the base weights (a whole model for the pipeline).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
"""diffusers' file name (`LORA_WEIGHT_NAME_SAFE`): what `load_lora_weights(dir)` looks for."""
_ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_[AB])\.(?P<adapter>[^.]+)\.(?P<param>weight|bias)$")
_PEFT_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_[AB])\.(?P<param>weight|bias)$")


@dataclass(frozen=True)
class LoraFileSettings:
    """What a LoRA checkpoint's tensors mean, from the config its run recorded."""

    rank: int
    alpha: float
    teacher_kind: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_run_config(cls, config: dict) -> Optional[LoraFileSettings]:
        """None for a full fine-tuning run (or a config from before LoRA mode existed)."""
        if (config.get("model") or {}).get("finetune", "full") != "lora":
            return None
        lora = config["lora"]
        return cls(int(lora["rank"]), float(lora["alpha"]), (config.get("teacher") or {}).get("kind", "ema"))


def adapter_to_peft(state: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """One adapter's tensors under peft's adapter-free names (`<module>.lora_A.weight`)."""
    out = {}
    for key, value in state.items():
        m = _ADAPTER_KEY.match(key)
        if m and m["adapter"] == adapter:
            out[f"{m['module']}.{m['factor']}.{m['param']}"] = value
    if not out:
        raise ValueError(f"no tensors of the LoRA adapter {adapter!r} among {len(state)} keys")
    return out


def adapter_modules(state: dict[str, torch.Tensor]) -> list[str]:
    """The module names an adapter state dict (peft names) targets, in key order."""
    names = []
    for key in state:
        m = _PEFT_KEY.match(key)
        if m is None:
            raise ValueError(f"{key!r} is not a LoRA tensor name (<module>.lora_A.weight)")
        if m["module"] not in names:
            names.append(m["module"])
    return names


def to_diffusers_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """fp32 tensors with the scale folded into lora_B (so the file means alpha = r)."""
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu", torch.float32)
        out[key] = (value * scale if ".lora_B." in key else value).contiguous()
    return out


def lora_metadata(state: dict[str, torch.Tensor]) -> dict:
    """The LoraConfig diffusers builds when loading the file (rank from lora_B's shape)."""
    rank = next(v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight"))
    return {
        "r": int(rank),
        "lora_alpha": int(rank),
        "target_modules": adapter_modules(state),
        "lora_dropout": 0.0,
        "bias": "none",
    }


def save_diffusers_lora(pipeline_class: str, out_dir: str | Path, state: dict[str, torch.Tensor], scale: float) -> Path:
    """Write `<out_dir>/pytorch_lora_weights.safetensors` with the stock pipeline's own writer."""
    import diffusers

    folded = to_diffusers_lora(state, scale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, pipeline_class).save_lora_weights(
        str(out),
        transformer_lora_layers=folded,
        weight_name=LORA_WEIGHT_NAME,
        transformer_lora_adapter_metadata=lora_metadata(folded),
    )
    return out / LORA_WEIGHT_NAME


def is_lora_dir(path: str | Path) -> bool:
    return (Path(path) / LORA_WEIGHT_NAME).is_file()


@torch.no_grad()
def merge_adapter(model: nn.Module, state: dict[str, torch.Tensor], scale: float) -> None:
    """W += scale * B A (and B's bias into the bias) for every adapted Linear of a plain model,
    computed in fp32 and stored in the weight's dtype."""
    for module_name in adapter_modules(state):
        module = model.get_submodule(module_name)
        a, b = state[f"{module_name}.lora_A.weight"].float(), state[f"{module_name}.lora_B.weight"].float()
        weight = module.weight
        delta = (b @ a) * scale
        weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
        bias = state.get(f"{module_name}.lora_B.bias")
        if bias is not None:
            module.bias.copy_((module.bias.float() + scale * bias.float().to(module.bias.device)).to(module.bias.dtype))


def resolve_lora_dir(path: str | Path) -> Path:
    """A directory holding the LoRA file: the path itself, or its `lora/` (a LoRA run's export)."""
    path = Path(path)
    for candidate in (path, path / "lora"):
        if is_lora_dir(candidate):
            return candidate
    raise FileNotFoundError(f"{path}: no {LORA_WEIGHT_NAME} (neither here nor in lora/)")


def export_lora(spec, state: dict[str, torch.Tensor], scale: float, out_dir: str | Path, merged: bool = False) -> Path:
    """A LoRA run's export: `<out>/lora/` (the family's diffusers LoRA file, which the stock
    pipeline's `load_lora_weights` reads) and, with `merged`, `<out>/merged/`: the base model
    directory (a whole pipeline when the base is one) with the adapter merged into its weights.
    `spec` is the run's model spec; returns the LoRA directory."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    lora_dir = out / "lora"
    save_diffusers_lora(spec.lora_pipeline, lora_dir, state, scale)
    if merged:
        base = spec.load_transformer(torch.float32)
        merge_adapter(base, state, scale)
        spec.export(base, out / "merged")
    return lora_dir
