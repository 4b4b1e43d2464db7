"""Image (and text) encoders for evaluation: CLIP or DINOv2 from a local path, or plain pixels.

Weights come from local directories only (`local_files_only=True`; nothing downloads at run time),
and the model class follows the directory's own config (`clip`, `clip_vision_model`, `dinov2`,
`dinov2_with_registers`). Preprocessing runs in torch from the saved processor settings (size,
crop, mean, std) rather than through transformers' image processors: those rescale float images
a second time without a word, and they need torchvision, which a broken install turns into an
import error of every vision model (see `check_torchvision`).

The pixel encoder is the fallback that needs no weights: the image centre-cropped, resized to a
small square and flattened. Distances in it are honest pixel distances, named `pixel`.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import ConfigError
from .metrics import fit_square

IMAGE_MODEL_TYPES = ("clip", "clip_vision_model", "dinov2", "dinov2_with_registers")
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PixelEncoder:
    """Flattened pixels of a `size` x `size` centre crop, centred on 0 (no weights needed)."""

    name = "pixel"

    def __init__(self, size: int = 16):
        self.size = size

    def describe(self) -> dict:
        return {"name": self.name, "size": self.size}

    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        return (fit_square(images, self.size) - 0.5).flatten(1)


class ImageEncoder:
    """A transformers vision model with torch-side preprocessing; features on the CPU, float32."""

    def __init__(
        self, path: Path, model_type: str, model: torch.nn.Module, prep: dict, device: str, batch_size: int = 32
    ):
        self.path, self.model_type, self.model, self.prep = path, model_type, model, prep
        self.device, self.batch_size = device, batch_size
        self.name = "CLIP" if model_type.startswith("clip") else "DINOv2"

    def describe(self) -> dict:
        return {"name": self.name, "model_type": self.model_type, "path": str(self.path), **self.prep}

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """One image [3, H, W] in [0, 1] -> normalised pixel values [1, 3, crop_h, crop_w]."""
        p = self.prep
        x = x.float().unsqueeze(0).to(self.device)
        h, w = x.shape[-2:]
        if "shortest_edge" in p:
            scale = p["shortest_edge"] / min(h, w)
            size = (max(1, round(h * scale)), max(1, round(w * scale)))
        else:
            size = (p["height"], p["width"])
        if size != (h, w):
            x = F.interpolate(x, size=size, mode=p["mode"], antialias=True, align_corners=False)
        if p.get("crop"):
            ch, cw = p["crop"]
            top, left = max(0, (x.shape[-2] - ch) // 2), max(0, (x.shape[-1] - cw) // 2)
            x = x[..., top : top + ch, left : left + cw]
        mean = torch.tensor(p["mean"], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(p["std"], device=x.device).view(1, 3, 1, 1)
        return (x.clamp(0, 1) - mean) / std

    @torch.no_grad()
    def encode_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            pixels = torch.cat([self.preprocess(x) for x in images[start : start + self.batch_size]])
            out.append(self._image_features(pixels).float().cpu())
        return torch.cat(out)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.model_type == "clip":
            return _tensor(self.model.get_image_features(pixel_values=pixels))
        if self.model_type == "clip_vision_model":
            return self.model(pixel_values=pixels).image_embeds
        return self.model(pixel_values=pixels).pooler_output  # DINOv2: the layer-normed CLS token


class CLIPEncoder(ImageEncoder):
    """A whole CLIP (both towers): image features, and text features for the CLIP score."""

    def __init__(self, *args, tokenizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer = tokenizer
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(
                prompts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out.append(_tensor(self.model.get_text_features(**tokens)).float().cpu())
        return torch.cat(out)


def _tensor(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (projected features in
    `pooler_output`); 4.x returned the tensor itself."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---- loading ---------------------------------------------------------------------------------
def load_encoder(
    path: str | Path, flag: str, device: str = "cpu", need_text: bool = False, batch_size: int = 32
) -> ImageEncoder:
    """The encoder saved at `path`; errors are one line naming `flag` (the CLI option)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{flag} {path}: no such directory (put the encoder's weights there: config.json, "
            "model.safetensors and its preprocessor/tokenizer files)"
        )
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path}: no config.json (not a transformers model directory)")
    check_torchvision()
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPModel, CLIPVisionModelWithProjection

    model_type = AutoConfig.from_pretrained(str(path), local_files_only=True).model_type
    if model_type not in IMAGE_MODEL_TYPES:
        raise ConfigError(f"{flag} {path}: model type {model_type!r} is not one of {', '.join(IMAGE_MODEL_TYPES)}")
    if need_text and model_type != "clip":
        raise ConfigError(f"{flag} {path}: the CLIP score needs a whole CLIP (text and vision), got {model_type!r}")
    prep = read_preprocessing(path, flag)
    cls = {"clip": CLIPModel, "clip_vision_model": CLIPVisionModelWithProjection}.get(model_type, AutoModel)
    model = cls.from_pretrained(str(path), local_files_only=True).to(device).eval()
    if model_type == "clip":
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return CLIPEncoder(path, model_type, model, prep, device, batch_size, tokenizer=tokenizer)
    return ImageEncoder(path, model_type, model, prep, device, batch_size)


def read_preprocessing(path: Path, flag: str) -> dict:
    """Size, crop, mean, std and resampling from preprocessor_config.json, or from the
    `image_processor` entry of processor_config.json (transformers 5 saves it there)."""
    settings: Optional[dict] = None
    if (path / "preprocessor_config.json").is_file():
        settings = json.loads((path / "preprocessor_config.json").read_text(encoding="utf-8"))
    elif (path / "processor_config.json").is_file():
        settings = json.loads((path / "processor_config.json").read_text(encoding="utf-8")).get("image_processor")
    if not settings:
        raise FileNotFoundError(f"{flag} {path}: no preprocessor_config.json (the image size, crop, mean and std)")
    size = settings.get("size", 224)
    out: dict = {"mode": "bicubic" if settings.get("resample", 3) == 3 else "bilinear"}
    if isinstance(size, int):
        out["shortest_edge"] = size
    elif "shortest_edge" in size:
        out["shortest_edge"] = int(size["shortest_edge"])
    else:
        out["height"], out["width"] = int(size["height"]), int(size["width"])
    crop = settings.get("crop_size")
    if settings.get("do_center_crop", crop is not None) and crop is not None:
        out["crop"] = [crop, crop] if isinstance(crop, int) else [int(crop["height"]), int(crop["width"])]
    out["mean"] = [float(v) for v in settings.get("image_mean", OPENAI_CLIP_MEAN)]
    out["std"] = [float(v) for v in settings.get("image_std", OPENAI_CLIP_STD)]
    return out


def check_torchvision() -> None:
    """Absent is fine; installed but not importable (e.g. a CUDA wheel beside CPU torch) breaks
    every transformers vision model at import: stop with the fix instead."""
    if importlib.util.find_spec("torchvision") is None:
        return
    probe = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        raise ConfigError(
            f"torchvision is installed but cannot be imported ({last}); uninstall it or install "
            "the build that matches torch"
        )


# ---- tiny random encoders (tests, debug runs) ---------------------------------------------------------
def _write_preprocessing(out: Path, size: int, mean, std, processor_type: str) -> None:
    settings = {
        "size": {"shortest_edge": size},
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_resize": True,
        "do_normalize": True,
        "resample": 3,
        "image_mean": list(mean),
        "image_std": list(std),
        "image_processor_type": processor_type,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")


def build_tiny_clip(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random CLIP (32 wide, 2 layers) with a byte-level tokenizer built in memory: any text encodes."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    out = Path(out)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _write_preprocessing(out, image_size, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "CLIPImageProcessor")
    return out


def build_tiny_dinov2(out: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """A random DINOv2 (32 wide, 2 layers, patch 8) with ImageNet mean/std, as real checkpoints ship."""
    from transformers import Dinov2Config, Dinov2Model

    out = Path(out)
    torch.manual_seed(seed)
    config = Dinov2Config(
        image_size=image_size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2
    )
    Dinov2Model(config).save_pretrained(str(out))
    _write_preprocessing(out, image_size, IMAGENET_MEAN, IMAGENET_STD, "BitImageProcessor")
    return out
