"""Guidance models: turn a name or a path into a frozen, differentiable model of images in [0, 1].

Every loader resolves the same kinds of names: a hub id, a local folder, or (for CLIP) a built-in
open_clip architecture with a pretrained tag. Failures to find a model are raised as
`GuideNotFoundError` with a message saying what to download and how to pass a local copy instead.
Nothing is cached here: callers keep the models they load.
"""

from __future__ import annotations

import difflib
import os
import pickle
import re
import tempfile
import urllib.request
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F

# ImageNet statistics: the fallback normalization of classifiers that ship no image processor.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Defaults of the DOODL paper's text guidance (LAION CLIP) and of LAION's aesthetic predictor v1,
# a linear head trained on the image embeddings of OpenAI's ViT-L-14.
TEXT_CLIP = ("ViT-L-14", "laion2b_s32b_b82k")
AESTHETIC_CLIP = ("ViT-L-14", "openai")
AESTHETIC_HEAD_FILE = "sa_0_4_vit_l_14_linear.pth"
AESTHETIC_HEAD_URL = (
    f"https://github.com/LAION-AI/aesthetic-predictor/blob/main/{AESTHETIC_HEAD_FILE}?raw=true"
)

_HF_HUB = "hf-hub:"
_LOCAL_DIR = "local-dir:"
_CLIP_CONFIG = "open_clip_config.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


class GuideNotFoundError(OSError):
    """A guidance model could not be found locally nor downloaded."""


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` and crop the center square, differentiably (CLIP's preprocessing).

    Antialiased bilinear filtering has non-negative weights, so values in [0, 1] stay in [0, 1].
    """
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[..., top : top + side, left : left + side]
    if side == size:
        return square
    return F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    return (images - mean_t) / std_t


def _square_size(size: int | Sequence[int]) -> int:
    if isinstance(size, int):
        return size
    height, width = size
    if height != width:
        raise ValueError(f"only square model inputs are supported, got {height}x{width}")
    return int(height)


def _first_parameter(module: torch.nn.Module) -> torch.Tensor:
    return next(module.parameters())


def _freeze(module: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


# Keyword-only, so that each guide's own fields keep their places at the front of its constructor.
@dataclass(frozen=True, kw_only=True)
class Guide(ABC):
    """A frozen network of images and the square, normalized input it expects: what every guide shares."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    @abstractmethod
    def network(self) -> torch.nn.Module:
        """The module whose parameters set the device and dtype of its input."""

    @property
    def device(self) -> torch.device:
        return _first_parameter(self.network).device

    @property
    def dtype(self) -> torch.dtype:
        return _first_parameter(self.network).dtype

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] as the network takes them: center square of `image_size`,
        normalized, on its device and dtype; differentiable."""
        pixels = _normalize(resize_center_crop(images, self.image_size), self.mean, self.std)
        return pixels.to(self.device, self.dtype)


# --- CLIP ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip(Guide):
    """A frozen open_clip model with the preprocessing its image tower expects."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]

    @property
    def network(self) -> torch.nn.Module:
        return self.model

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (float32) of images (B, 3, H, W) in [0, 1]; differentiable."""
        features = self.model.encode_image(self.preprocess(images))
        return F.normalize(features.float(), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings (float32) of the texts."""
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


def check_clip_name(name: str, pretrained: str | None = None) -> str:
    """What open_clip's factory reads for `name` (`_clip_model_name`), once what can be told without
    loading is checked: a built-in architecture needs weights, a known tag or a file."""
    model_name = _clip_model_name(name)
    if model_name.startswith((_HF_HUB, _LOCAL_DIR)):
        return model_name
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    if pretrained is None:
        raise ValueError(
            f"CLIP architecture {name!r} needs `pretrained` weights (a tag or a file), named as "
            f"'ARCHITECTURE TAG'; known tags: {', '.join(tags) or 'none'}."
        )
    # open_clip reads a tag in any case, with - for _ ("LAION2B-S32B-B82K"): its own lookup decides.
    if (
        not open_clip.get_pretrained_cfg(model_name, pretrained)
        and not Path(pretrained).expanduser().is_file()
    ):
        raise GuideNotFoundError(
            f"{pretrained!r} is neither a weights tag of CLIP architecture {name!r} "
            f"({', '.join(tags) or 'none'}) nor a checkpoint file"
        )
    return model_name


def _clip_model_name(name: str) -> str:
    """Resolve `name` to what open_clip's factory reads: a schema-prefixed id or a built-in name."""
    if name.startswith(_HF_HUB):
        return name
    if name.startswith(_LOCAL_DIR):
        folder = Path(name[len(_LOCAL_DIR) :]).expanduser()
    elif Path(name).expanduser().is_dir():
        folder = Path(name).expanduser()
    elif name.replace("/", "-") in open_clip.list_models():
        return name.replace("/", "-")  # OpenAI spells architectures "ViT-L/14"
    else:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        raise GuideNotFoundError(
            f"CLIP model {name!r} is neither a folder nor a built-in open_clip architecture"
            + (f" (close names: {', '.join(close)})" if close else "")
            + ". Pass a folder holding open_clip_config.json and weights, 'local-dir:/path', "
            "'hf-hub:org/repo', or an architecture such as 'ViT-L-14' with a pretrained tag."
        )
    _check_clip_folder(name, folder)
    return _LOCAL_DIR + str(folder)


def _check_clip_folder(name: str, folder: Path) -> None:
    # open_clip silently builds a random model from a folder without weights; refuse instead.
    if not folder.is_dir():
        raise GuideNotFoundError(f"CLIP model {name!r}: folder {folder} does not exist.")
    if not (folder / _CLIP_CONFIG).is_file():
        raise GuideNotFoundError(f"CLIP model {name!r}: folder {folder} holds no {_CLIP_CONFIG}.")
    if not any(path.suffix in _WEIGHT_SUFFIXES for path in folder.iterdir()):
        raise GuideNotFoundError(f"CLIP model {name!r}: folder {folder} holds no weights file.")


def load_clip(
    name: str,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Clip:
    """Load a frozen open_clip model.

    `name` is a built-in architecture (then `pretrained` names its weights: a tag such as
    "laion2b_s32b_b82k" or a checkpoint file), "hf-hub:org/repo", "local-dir:/path", or a path to a
    folder holding open_clip_config.json and weights. A checkpoint file in OpenAI's format (their
    TorchScript release, or a state dict taken from it) gets QuickGELU, the activation it was trained with.
    """
    model_name = check_clip_name(name, pretrained)
    builtin = not model_name.startswith((_HF_HUB, _LOCAL_DIR))
    tag = open_clip.get_pretrained_cfg(model_name, pretrained) if builtin else {}
    # A known tag wins over a file of that name, as in open_clip; otherwise `pretrained` may be a file.
    checkpoint = Path(pretrained).expanduser() if builtin and not tag else None
    from_file = checkpoint is not None and checkpoint.is_file()
    try:
        if from_file:
            model = _clip_from_checkpoint(model_name, checkpoint, device)
        else:
            # open_clip builds an architecture as configured, even when the tag's weights were trained with
            # QuickGELU (OpenAI's, which LAION's aesthetic head expects): match the weights, not the config.
            model = open_clip.create_model(
                model_name,
                pretrained=pretrained if builtin else None,
                device=device,
                force_quick_gelu=bool(tag.get("quick_gelu")),
            )
    except (RuntimeError, OSError, pickle.UnpicklingError) as error:
        if model_name.startswith(_LOCAL_DIR):
            raise  # the folder was checked: its files are there but do not load
        if from_file:
            raise ValueError(
                f"CLIP checkpoint {checkpoint} does not load into the {name!r} architecture: is it this "
                "architecture's weights, as a state dict (possibly under 'state_dict') or OpenAI's "
                f"TorchScript file? Cause: {error}"
            ) from error
        raise GuideNotFoundError(
            f"CLIP model {name!r}"
            + (f" with pretrained={pretrained!r}" if builtin else "")
            + " could not be found locally nor downloaded. Connect once to let open_clip cache it, or "
            "save it to a folder (open_clip_config.json with 'model_cfg' and 'preprocess_cfg', plus "
            "open_clip_model.safetensors) and pass that folder's path."
            f" Cause: {error}"
        ) from error
    preprocess = open_clip.get_model_preprocess_cfg(model)
    return Clip(
        model=_freeze(model, device, dtype),
        tokenizer=open_clip.get_tokenizer(model_name),
        image_size=_square_size(preprocess["size"]),
        mean=tuple(preprocess["mean"]),
        std=tuple(preprocess["std"]),
    )


# Entries of OpenAI's CLIP release (a TorchScript archive) that are not weights; open_clip's own state dicts
# never hold them, so they also mark a state dict taken from OpenAI's file.
_OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def _clip_from_checkpoint(model_name: str, checkpoint: Path, device: str | torch.device) -> torch.nn.Module:
    """A built-in architecture with the weights of a checkpoint file.

    OpenAI's weights were trained with QuickGELU, but open_clip builds the architecture a file is given for
    as configured (GELU for "ViT-L-14") and loads the weights silently: their features would be wrong. An
    OpenAI-format file gets QuickGELU; any other (open_clip's format, e.g. HPSv2's checkpoint wrapped under
    'state_dict') is loaded by open_clip as it is.
    """
    openai_weights = _openai_clip_weights(checkpoint)
    if openai_weights is None:
        return open_clip.create_model(model_name, pretrained=str(checkpoint), device=device)
    model = open_clip.create_model(model_name, pretrained=None, device=device, force_quick_gelu=True)
    expected = model.state_dict().keys()
    missing = sorted(expected - openai_weights.keys())
    if missing:
        examples = ", ".join(missing[:3])
        raise RuntimeError(f"the OpenAI-format file lacks {len(missing)} of the weights, e.g. {examples}")
    model.load_state_dict({key: openai_weights[key] for key in expected})
    return model


def _openai_clip_weights(path: Path) -> dict[str, torch.Tensor] | None:
    """The weights of an OpenAI-format CLIP file (OpenAI's TorchScript release, or a state dict taken from
    it); None for a file of any other format."""
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch deprecates TorchScript, but OpenAI's files are TorchScript
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    state = _peek_state_dict(path)
    if state is None or not any(key in state for key in _OPENAI_ONLY_KEYS):
        return None
    return state


def _is_torchscript(path: Path) -> bool:
    # torch's own test: a TorchScript archive is a zip file holding constants.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(Path(name).name == "constants.pkl" for name in archive.namelist())


def _peek_state_dict(path: Path) -> dict[str, torch.Tensor] | None:
    """A checkpoint's state dict, memory-mapped (its tensors are not read), unwrapped from 'state_dict';
    None where it is no plain state dict (safetensors, a legacy or pickled-object file): open_clip reads
    those or says why not."""
    if path.suffix == ".safetensors":
        return None  # OpenAI never released safetensors
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError):
        return None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    return checkpoint if isinstance(checkpoint, dict) else None


# --- human-preference rewards: PickScore, HPSv2 ----------------------------------------------------

# PickScore (Kirstain et al. 2023): a CLIP ViT-H-14 fine-tuned on Pick-a-Pic preferences, a transformers
# CLIPModel; its repository ships no processor, it uses that of the CLIP it was fine-tuned from.
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
# HPSv2 (Wu et al. 2023): open_clip's ViT-H-14 fine-tuned on HPD v2, released as a checkpoint file.
HPS_ARCHITECTURE = "ViT-H-14"
HPS_CHECKPOINT_URL = "https://huggingface.co/xswu/HPSv2/resolve/main/HPS_v2.1_compressed.pt"


@dataclass(frozen=True)
class TransformersClip(Guide):
    """A frozen transformers CLIPModel (e.g. PickScore) with its tokenizer and image preprocessing."""

    model: torch.nn.Module
    tokenizer: Callable[..., dict[str, torch.Tensor]]

    @property
    def network(self) -> torch.nn.Module:
        return self.model

    @property
    def logit_scale(self) -> float:
        """The learned temperature: a reward such as PickScore is logit_scale * cosine similarity."""
        return float(self.model.logit_scale.exp())

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings (float32) of images (B, 3, H, W) in [0, 1]; differentiable."""
        features = self.model.get_image_features(pixel_values=self.preprocess(images))
        return F.normalize(_pooled(features).float(), dim=-1)

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit-norm embeddings (float32) of the texts."""
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        features = self.model.get_text_features(**{k: v.to(self.device) for k, v in tokens.items()})
        return F.normalize(_pooled(features).float(), dim=-1)


def _pooled(features: torch.Tensor | object) -> torch.Tensor:
    # transformers 5 returns the projected embeddings as `pooler_output` of a model output; 4.x, a tensor.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def load_pickscore(
    model: str | Path = PICKSCORE_MODEL,
    processor: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TransformersClip:
    """Load PickScore, or any transformers CLIPModel, frozen, as a differentiable reward guide.

    `model` and `processor` are hub ids or folders written by `save_pretrained`. The processor (tokenizer,
    input size, normalization) defaults to the one saved with the model; for the official PickScore, which
    has none, to the CLIP it was fine-tuned from (PICKSCORE_PROCESSOR).
    """
    from transformers import AutoConfig, AutoProcessor, CLIPModel

    source = _model_source(model, "reward model")
    if processor is None:
        processor = PICKSCORE_PROCESSOR if source == PICKSCORE_MODEL else source
    processor_source = _model_source(processor, "processor")
    try:
        model_type = AutoConfig.from_pretrained(source).model_type
        if model_type != "clip":
            raise ValueError(f"reward model {source!r} is a {model_type!r} model, not a CLIP model")
        module = CLIPModel.from_pretrained(source)
        loaded = AutoProcessor.from_pretrained(processor_source)
    except OSError as error:
        raise GuideNotFoundError(
            f"reward model {source!r} or its processor {processor_source!r} could not be found locally nor "
            "downloaded. Connect once to let transformers cache them, or pass folders written by "
            "`save_pretrained` (the model's config.json and weights; the processor's tokenizer and "
            f"preprocessor_config.json). Cause: {error}"
        ) from error
    image_processor = getattr(loaded, "image_processor", None)
    tokenizer = getattr(loaded, "tokenizer", None)
    if image_processor is None or tokenizer is None:
        raise ValueError(
            f"processor {processor_source!r} is a {type(loaded).__name__}, not a CLIP processor with a "
            f"tokenizer and an image processor: pass one, e.g. processor={PICKSCORE_PROCESSOR!r}"
        )
    return TransformersClip(
        model=_freeze(module, device, dtype),
        tokenizer=tokenizer,
        image_size=_processor_input_size(image_processor) or module.config.vision_config.image_size,
        mean=tuple(image_processor.image_mean),
        std=tuple(image_processor.image_std),
    )


def load_hps(
    checkpoint: str | Path,
    architecture: str = HPS_ARCHITECTURE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Clip:
    """Load HPSv2 (or v2.1): open_clip's `architecture` with the weights of its checkpoint file,
    e.g. HPS_v2.1_compressed.pt (a state dict under 'state_dict', which open_clip unwraps)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise GuideNotFoundError(
            f"HPSv2 checkpoint {path} does not exist: download HPS_v2.1_compressed.pt from "
            f"{HPS_CHECKPOINT_URL} and pass its path."
        )
    return load_clip(architecture, str(path), device, dtype)


# --- ImageReward ----------------------------------------------------------------------------------

IMAGEREWARD_CHECKPOINT_URL = "https://huggingface.co/THUDM/ImageReward/resolve/main/ImageReward.pt"
IMAGEREWARD_TOKENIZER = "bert-base-uncased"  # BLIP's, with its two added tokens
# ImageReward reports (reward - mean) / std, its training pairs' statistics (its `ImageReward` class).
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
IMAGEREWARD_PROMPT_TOKENS = 35
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # BLIP normalizes as OpenAI's CLIP does
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BLIP_HEAD_WIDTH = 64  # every attention head of BLIP's towers (ViT-B/L, BERT-base) is 64 wide
# BLIP's ViT names -> transformers' BlipVisionModel names: outside the blocks, and inside each block.
_VISION_NAMES = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_BLOCK_NAMES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv"}
_BLOCK_NAMES |= {"attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


@dataclass(frozen=True)
class ImageRewardModel(Guide):
    """ImageReward (Xu et al. 2023): BLIP's ViT sees the image, BLIP's BERT reads the prompt with
    cross-attention to it, and an MLP on the first token gives the reward; frozen, differentiable."""

    vision: torch.nn.Module  # transformers BlipVisionModel
    text: torch.nn.Module  # transformers BlipTextModel, cross-attending to the image
    head: torch.nn.Sequential
    tokenizer: Callable[..., dict[str, torch.Tensor]]

    @property
    def network(self) -> torch.nn.Module:
        return self.vision

    def rewards(self, images: torch.Tensor, prompt: str) -> torch.Tensor:
        """The normalized reward (B,) of images (B, 3, H, W) in [0, 1] for one prompt; differentiable."""
        seen = self.vision(pixel_values=self.preprocess(images)).last_hidden_state
        tokens = self.tokenizer(
            [prompt] * len(images),
            padding="max_length",
            truncation=True,
            max_length=IMAGEREWARD_PROMPT_TOKENS,
            return_tensors="pt",
        )
        read = self.text(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=seen,
            encoder_attention_mask=torch.ones(seen.shape[:-1], dtype=torch.long, device=self.device),
        ).last_hidden_state
        reward = self.head(read[:, 0]).squeeze(-1).float()
        return (reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def imagereward_head(width: int) -> torch.nn.Sequential:
    """ImageReward's MLP (no activations, as released); its dropouts are identities in evaluation, kept as
    places so that the checkpoint's layer numbers fit."""
    linear, gap = torch.nn.Linear, torch.nn.Identity
    return torch.nn.Sequential(
        linear(width, 1024),
        gap(),
        linear(1024, 128),
        gap(),
        linear(128, 64),
        gap(),
        linear(64, 16),
        linear(16, 1),
    )


def _vision_name(key: str) -> str:
    """A BLIP ViT weight's name in transformers' BlipVisionModel (blocks.3.attn.qkv.weight becomes
    encoder.layers.3.self_attn.qkv.weight)."""
    if not key.startswith("blocks."):
        return _VISION_NAMES.get(key, key)
    _, block, rest = key.split(".", 2)
    module, _, kind = rest.rpartition(".")
    return f"encoder.layers.{block}.{_BLOCK_NAMES.get(module, module)}.{kind}"


def _blip_configs(vision: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """The towers' transformers configs, read off the weights' shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width, patch = (
        vision["embeddings.patch_embedding.weight"].shape[0],
        vision["embeddings.patch_embedding.weight"].shape[-1],
    )
    positions = vision["embeddings.position_embedding"].shape[1] - 1
    vision_config = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers.")),
        num_attention_heads=width // BLIP_HEAD_WIDTH,
        image_size=patch * round(positions**0.5),
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP's ViT
    )
    vocabulary, hidden = text["embeddings.word_embeddings.weight"].shape
    text_config = BlipTextConfig(
        vocab_size=vocabulary,
        hidden_size=hidden,
        encoder_hidden_size=width,
        intermediate_size=text["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in text if k.startswith("encoder.layer.")),
        num_attention_heads=hidden // BLIP_HEAD_WIDTH,
        max_position_embeddings=text["embeddings.position_embeddings.weight"].shape[0],
    )
    return vision_config, text_config


def load_imagereward(
    checkpoint: str | Path,
    tokenizer: str | Path = IMAGEREWARD_TOKENIZER,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ImageRewardModel:
    """ImageReward from its released checkpoint (ImageReward.pt: BLIP's ViT and BERT and the MLP, in BLIP's
    names) on transformers' BLIP towers; the sizes are read off the weights. `tokenizer`: a BERT tokenizer
    (hub id or folder); BLIP's two tokens ([DEC], [ENC]) are added as ImageReward adds them."""
    from transformers import BertTokenizer, BlipTextModel, BlipVisionModel

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise GuideNotFoundError(
            f"ImageReward checkpoint {path} does not exist: download ImageReward.pt from "
            f"{IMAGEREWARD_CHECKPOINT_URL} and pass its path."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    parts = {
        prefix: {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        for prefix in ("blip.visual_encoder.", "blip.text_encoder.", "mlp.layers.")
    }
    if not all(parts.values()):
        raise ValueError(
            f"{path} is not an ImageReward checkpoint: it lacks BLIP's towers or the reward's MLP"
        )
    vision_weights = {_vision_name(k): v for k, v in parts["blip.visual_encoder."].items()}
    text_weights = {k: v for k, v in parts["blip.text_encoder."].items() if k != "embeddings.position_ids"}
    vision_config, text_config = _blip_configs(vision_weights, text_weights)
    vision, text = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
    head = imagereward_head(text_config.hidden_size)
    for module, weights in ((vision, vision_weights), (text, text_weights), (head, parts["mlp.layers."])):
        module.load_state_dict(weights, strict=True)
    try:
        words = BertTokenizer.from_pretrained(str(tokenizer))
    except OSError as error:
        raise GuideNotFoundError(
            f"BERT tokenizer {tokenizer!r} could not be found locally nor downloaded: connect once, or pass "
            f"a folder written by `save_pretrained`. Cause: {error}"
        ) from error
    words.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    if len(words) > text_config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer!r} has {len(words)} tokens with BLIP's two, the checkpoint's text tower "
            f"{text_config.vocab_size}: they do not belong together"
        )
    return ImageRewardModel(
        vision=_freeze(vision, device, dtype),
        text=_freeze(text, device, dtype),
        head=_freeze(head, device, dtype),
        tokenizer=words,
        image_size=vision_config.image_size,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
    )


# --- image classifiers ----------------------------------------------------------------------------


def _label_key(label: str) -> str:
    # "Scarlet Red", "scarlet_red" and "scarlet-red" name the same class.
    return re.sub(r"[\s_\-]+", " ", label).strip().casefold()


@dataclass(frozen=True)
class Classifier(Guide):
    """A frozen image classifier, its class names and the preprocessing it expects."""

    module: torch.nn.Module
    labels: tuple[str, ...]

    @property
    def network(self) -> torch.nn.Module:
        return self.module

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits (float32) of images (B, 3, H, W) in [0, 1]; differentiable."""
        output = self.module(self.preprocess(images))
        return getattr(output, "logits", output).float()  # transformers wraps logits in a ModelOutput

    def class_index(self, target: int | str) -> int:
        """The index of a class given by index or by name (case, spaces and underscores ignored)."""
        if isinstance(target, int):
            if not 0 <= target < len(self.labels):
                raise ValueError(
                    f"class index {target} is out of range: the classifier has {len(self.labels)}"
                )
            return target
        keys = [_label_key(label) for label in self.labels]
        if _label_key(target) in keys:
            return keys.index(_label_key(target))
        close = difflib.get_close_matches(_label_key(target), keys, n=5, cutoff=0.5)
        suggestion = ", ".join(repr(self.labels[keys.index(key)]) for key in close)
        raise ValueError(
            f"class {target!r} is not a label of this classifier"
            + (f"; close labels: {suggestion}" if suggestion else f" ({len(self.labels)} labels)")
        )


def _model_source(model: str | Path, what: str = "image classifier") -> str:
    """A local folder, or else a hub id; a name that can only be a path must exist."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    name = str(model)
    # Hub ids are "repo" or "org/repo": anything else that looks like a path is a missing folder.
    if isinstance(model, Path) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise GuideNotFoundError(f"{what} {name!r}: folder {path} does not exist.")
    return name


def _processor_input_size(processor) -> int | None:
    """The side of the square a transformers image processor feeds its model."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = crop or getattr(processor, "size", None)
    if size is None:
        return None
    size = dict(size)
    return size.get("height") or size.get("shortest_edge")


def _transformers_classifier(source: str) -> Classifier:
    """A transformers classifier with the preprocessing of its image processor (ImageNet's if none)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    try:
        module = AutoModelForImageClassification.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise GuideNotFoundError(
            f"image classifier {source!r} could not be found locally nor downloaded. Connect once to let "
            "transformers cache it, or pass the path of a folder written by `save_pretrained` "
            f"(config.json, weights and preprocessor_config.json). Cause: {error}"
        ) from error
    id2label = module.config.id2label
    classifier = Classifier(
        module=module,
        labels=tuple(str(id2label[i]) for i in range(len(id2label))),
        image_size=getattr(module.config, "image_size", None) or 224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):  # no preprocessor_config.json beside the model
        return classifier
    normalizes = getattr(processor, "do_normalize", True)
    return replace(
        classifier,
        image_size=_processor_input_size(processor) or classifier.image_size,
        mean=tuple(processor.image_mean) if normalizes else (0.0, 0.0, 0.0),
        std=tuple(processor.image_std) if normalizes else (1.0, 1.0, 1.0),
    )


def load_classifier(
    model: str | Path | torch.nn.Module,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    labels: Sequence[str] | None = None,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    """Load a frozen image classifier.

    `model` is a transformers image-classification hub id or folder (labels from its config, input
    size and normalization from its image processor), or a torch module mapping normalized images
    to logits (then `labels` is required, and size and normalization default to ImageNet's 224 px
    and statistics). Explicit arguments override what the model ships with.
    """
    if isinstance(model, torch.nn.Module):
        if labels is None:
            raise ValueError("`labels` is required when the classifier is a torch module")
        classifier = Classifier(model, tuple(labels), image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    else:
        classifier = _transformers_classifier(_model_source(model))
    return replace(
        classifier,
        module=_freeze(classifier.module, device, dtype),
        labels=classifier.labels if labels is None else tuple(labels),
        image_size=image_size or classifier.image_size,
        mean=classifier.mean if mean is None else tuple(mean),
        std=classifier.std if std is None else tuple(std),
    )


# --- LAION aesthetic predictor --------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where downloaded guidance files are kept: $XDG_CACHE_HOME/doodl, by default ~/.cache/doodl."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "doodl"


def _download(url: str, destination: Path, timeout: float = 20.0) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        data = response.read()
    # Write beside the target and rename, so an interrupted download never leaves a truncated file.
    with tempfile.NamedTemporaryFile(dir=destination.parent, delete=False) as partial:
        partial.write(data)
    Path(partial.name).replace(destination)


def _default_aesthetic_head() -> Path:
    path = default_cache_dir() / AESTHETIC_HEAD_FILE
    if path.is_file():
        return path
    try:
        _download(AESTHETIC_HEAD_URL, path)
    except OSError as error:  # urllib's URLError and timeouts are OSErrors
        raise GuideNotFoundError(
            f"the LAION aesthetic predictor head {AESTHETIC_HEAD_FILE} is not in {path.parent} and could "
            f"not be downloaded ({error}). Download it from {AESTHETIC_HEAD_URL} and save it as {path}, "
            "or pass its location as `path`."
        ) from error
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"aesthetic head {path}: expected a .pth, .pt or .safetensors file")


def load_aesthetic_head(path: str | Path | None = None, embed_dim: int | None = None) -> torch.nn.Linear:
    """A frozen linear aesthetic scorer on unit-norm CLIP image embeddings (LAION aesthetic predictor v1).

    With no `path`, the ViT-L-14 head is read from the cache dir, downloaded there on first use.
    The embedding width is read from the file; `embed_dim`, when given, is checked against it.
    """
    if path is None:
        path = _default_aesthetic_head()
    path = Path(path).expanduser()
    if not path.is_file():
        raise GuideNotFoundError(f"aesthetic head file {path} does not exist")
    state = _read_state_dict(path)
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or bias is None or weight.ndim != 2 or weight.shape[0] != 1 or bias.shape != (1,):
        raise ValueError(
            f"aesthetic head {path}: expected tensors weight [1, D] and bias [1], found "
            + ", ".join(f"{key} {list(value.shape)}" for key, value in state.items())
        )
    if embed_dim is not None and weight.shape[1] != embed_dim:
        raise ValueError(f"aesthetic head {path} scores {weight.shape[1]}-d embeddings, not {embed_dim}-d")
    head = torch.nn.Linear(weight.shape[1], 1)
    head.load_state_dict({"weight": weight, "bias": bias})
    return head.eval().requires_grad_(False)
