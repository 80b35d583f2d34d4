"""Image preprocessing matching open_clip's eval transform and HF's CLIP image processor.

``preprocess_image(pil, cfg) -> np.float32 [3, H, W]`` reproduces, pixel for pixel:

* ``convention="open_clip"``: open_clip's ``image_transform(..., is_train=False)`` on a PIL
  image (torchvision on PIL): ``shortest`` = Resize(shortest edge) + CenterCrop,
  ``squash`` = Resize((H, W)), ``longest`` = ResizeKeepRatio(longest) + CenterCropOrPad(fill);
  then ``convert("RGB")``, ToTensor (``x / 255``) and Normalize.
* ``convention="hf"``: ``transformers`` ``CLIPImageProcessorPil`` (the PIL backend): RGB
  conversion first (alpha composited on white), PIL resize of the shortest edge, floor-offset
  center crop, ``float32(float64(x) * rescale_factor)``, Normalize. (The default torchvision
  backend of ``CLIPImageProcessor`` resizes a uint8 tensor instead, which agrees to within
  about one uint8 step.)

Only numpy and PIL are needed (no torch), so data pipelines can import this freely.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from cgjax.data.schema import read_json

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_PIL_CODES = {int(v): k for k, v in _RESAMPLE.items()}


def _pair(size) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"image size must be an int or (height, width), got {size}")
    return size


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Eval-time preprocessing.

    size: output ``(H, W)`` (an int means square). mean / std: per channel, on the [0, 1]
    scale. interpolation: ``bicubic | bilinear | nearest | lanczos | box | hamming``.
    resize_mode: ``shortest`` (resize the shortest edge, center crop), ``longest`` (resize the
    longest edge, pad with ``fill_color``), ``squash`` (resize to ``size``). resize_size: the
    shortest edge before the crop (HF ``size.shortest_edge``; default: ``size``).
    convention: ``open_clip`` or ``hf`` (see the module docstring). rescale_factor: HF only.
    """

    size: int | tuple[int, int] = 224
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0
    resize_size: int | None = None
    convention: str = "open_clip"
    rescale_factor: float = 1 / 255
    do_center_crop: bool = True
    do_normalize: bool = True

    def __post_init__(self):
        object.__setattr__(self, "size", _pair(self.size))
        mean = (self.mean,) * 3 if isinstance(self.mean, (int, float)) else tuple(float(m) for m in self.mean)
        std = (self.std,) * 3 if isinstance(self.std, (int, float)) else tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values, got {mean} and {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; expected one of {sorted(_RESAMPLE)}")
        if self.resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"unknown resize_mode {self.resize_mode!r}; expected shortest, longest or squash")
        if self.convention not in ("open_clip", "hf"):
            raise ValueError(f"unknown convention {self.convention!r}; expected open_clip or hf")

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size

    @classmethod
    def from_open_clip(cls, preprocess_cfg: Mapping[str, Any]) -> "PreprocessConfig":
        """From open_clip's ``preprocess_cfg`` (``PreprocessCfg`` fields: size, mode, mean, std,
        interpolation, resize_mode, fill_color), e.g. ``open_clip_config.json['preprocess_cfg']``
        or ``dataclasses.asdict(model.visual.preprocess_cfg)``."""
        cfg = dict(preprocess_cfg) if isinstance(preprocess_cfg, Mapping) else dataclasses.asdict(preprocess_cfg)
        if cfg.get("mode", "RGB") != "RGB":
            raise ValueError(f"only RGB preprocessing is supported, got mode {cfg['mode']!r}")
        interp = cfg.get("interpolation") or "bicubic"
        if interp == "random":  # open_clip: eval uses bicubic
            interp = "bicubic"
        return cls(
            size=cfg.get("size", 224),
            mean=tuple(cfg.get("mean") or OPENAI_CLIP_MEAN),
            std=tuple(cfg.get("std") or OPENAI_CLIP_STD),
            interpolation=interp,
            resize_mode=cfg.get("resize_mode") or "shortest",
            fill_color=int(cfg.get("fill_color") or 0),
        )

    @classmethod
    def from_hf_image_processor(cls, cfg: Mapping[str, Any]) -> "PreprocessConfig":
        """From an HF ``preprocessor_config.json`` dict (``CLIPImageProcessor``: ``size``,
        ``crop_size``, ``resample``, ``image_mean``, ``image_std``, ``do_*``, ``rescale_factor``)
        or an image processor object (its ``to_dict()``)."""
        if not isinstance(cfg, Mapping):
            cfg = cfg.to_dict()
        if cfg.get("do_rescale", True) is False:
            raise ValueError("image processors with do_rescale=False are not supported")
        resample = cfg.get("resample", 3)
        interp = _PIL_CODES.get(int(resample)) if not isinstance(resample, str) else resample.lower()
        if interp is None:
            raise ValueError(f"unknown PIL resample code {resample!r}")
        size = cfg.get("size", {"shortest_edge": 224})
        crop = cfg.get("crop_size", size)
        do_crop = bool(cfg.get("do_center_crop", True))
        if isinstance(crop, Mapping):
            crop = (crop["height"], crop["width"]) if "height" in crop else crop.get("shortest_edge")
        if isinstance(size, Mapping) and "shortest_edge" in size:
            if "longest_edge" in size and size["longest_edge"] is not None:
                raise ValueError("image processors with size.longest_edge are not supported")
            mode, resize_size = "shortest", int(size["shortest_edge"])
            out = crop if do_crop else resize_size
        elif isinstance(size, Mapping) and "height" in size:
            mode, resize_size = "squash", None
            out = (size["height"], size["width"])
            if do_crop and _pair(crop) != _pair(out):
                raise ValueError("squash resize followed by a different center crop is not supported")
        elif isinstance(size, (int, list, tuple)):
            mode, resize_size = "shortest", _pair(size)[0]
            out = crop if do_crop else resize_size
        else:
            raise ValueError(f"unsupported image processor size {size!r}")
        if cfg.get("do_resize", True) is False:
            raise ValueError("image processors with do_resize=False are not supported")
        if not do_crop and mode == "shortest":
            raise ValueError("a shortest-edge resize without a center crop gives variable sizes; not supported")
        return cls(
            size=out,
            mean=tuple(cfg.get("image_mean") or OPENAI_CLIP_MEAN),
            std=tuple(cfg.get("image_std") or OPENAI_CLIP_STD),
            interpolation=interp,
            resize_mode=mode,
            resize_size=resize_size,
            convention="hf",
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            do_center_crop=do_crop,
            do_normalize=bool(cfg.get("do_normalize", True)),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_hf_image_processor(self) -> dict:
        """The ``preprocessor_config.json`` of a ``CLIPImageProcessor`` doing this preprocessing
        (``convention="hf"``; :meth:`from_hf_image_processor` reads it back to an equal config)."""
        if self.convention != "hf":
            raise ValueError("only convention='hf' configs map to an HF image processor")
        h, w = self.size
        if self.resize_mode == "shortest":
            size = {"shortest_edge": int(self.resize_size or min(h, w))}
        elif self.resize_mode == "squash":
            size = {"height": h, "width": w}
        else:
            raise ValueError(f"resize_mode {self.resize_mode!r} has no HF image processor equivalent")
        return {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": size,
                "resample": int(_RESAMPLE[self.interpolation]), "do_center_crop": self.do_center_crop,
                "crop_size": {"height": h, "width": w}, "do_rescale": True, "rescale_factor": self.rescale_factor,
                "do_normalize": self.do_normalize, "image_mean": list(self.mean), "image_std": list(self.std),
                "do_convert_rgb": True}


PREPROCESS_MODES = ("auto", "hf")


def llava_preprocess_config(llava_checkpoint: str, vision_image_size: Any, mode: str = "auto") -> PreprocessConfig:
    """How cgjax preprocesses a LLaVA checkpoint's images (training, inference, export): its
    ``preprocessor_config.json`` (``mode="auto"``), else HF CLIP preprocessing at the tower's
    ``vision_image_size`` (``mode="hf"`` forces that)."""
    if mode not in PREPROCESS_MODES:
        raise ValueError(f"preprocess mode must be auto or hf, got {mode!r}")
    path = os.path.join(llava_checkpoint, "preprocessor_config.json")
    if mode == "auto" and os.path.exists(path):
        return PreprocessConfig.from_hf_image_processor(read_json(path))  # a corrupt file: a DataError naming it
    size = vision_image_size
    return PreprocessConfig(size=tuple(size) if not isinstance(size, int) else size, convention="hf")


# ----------------------------------------------------------------------------- helpers


def _shortest_edge_size(h: int, w: int, s: int) -> tuple[int, int]:
    """torchvision ``Resize(int)`` / HF ``get_resize_output_image_size`` output ``(h, w)``."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = s, int(s * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _keep_ratio_size(h: int, w: int, target: tuple[int, int], longest: float) -> tuple[int, int]:
    """open_clip ``ResizeKeepRatio.get_params`` (no randomness)."""
    ratio_h, ratio_w = h / target[0], w / target[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return round(h / ratio), round(w / ratio)


def _resize(img: Image.Image, hw: tuple[int, int], interp: str) -> Image.Image:
    if (img.height, img.width) == tuple(hw):  # torchvision returns the image unchanged
        return img
    return img.resize((hw[1], hw[0]), _RESAMPLE[interp])


def _center_crop_or_pad_tv(x: np.ndarray, out: tuple[int, int], fill: int) -> np.ndarray:
    """torchvision ``center_crop`` / open_clip ``center_crop_or_pad`` on an ``[H, W, C]`` array."""
    h, w = x.shape[:2]
    ch, cw = out
    if ch > h or cw > w:
        top, left = ((ch - h) // 2 if ch > h else 0), ((cw - w) // 2 if cw > w else 0)
        bottom, right = ((ch - h + 1) // 2 if ch > h else 0), ((cw - w + 1) // 2 if cw > w else 0)
        x = np.pad(x, ((top, bottom), (left, right), (0, 0)), constant_values=fill)
        h, w = x.shape[:2]
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return x[top:top + ch, left:left + cw]


def _center_crop_hf(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """``transformers.image_transforms.center_crop`` on an ``[H, W, C]`` array."""
    h, w = x.shape[:2]
    ch, cw = out
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0 and top + ch <= h and left + cw <= w:
        return x[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((nh, nw) + x.shape[2:], x.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[tp:tp + h, lp:lp + w] = x
    top, left = top + tp, left + lp
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def _to_rgb_hf(img: Image.Image) -> Image.Image:
    """HF ``convert_to_rgb``: transparency composited onto white."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise TypeError(f"expected a PIL image or a uint8 [H, W(, C)] array, got {type(image).__name__} {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


# ----------------------------------------------------------------------------- API


def preprocess_image(image: Any, cfg: PreprocessConfig) -> np.ndarray:
    """One PIL image (or uint8 ``[H, W, C]`` array) -> normalised ``np.float32 [3, H, W]``."""
    img = _as_pil(image)
    out_hw = cfg.size
    if cfg.convention == "hf":
        img = _to_rgb_hf(img)
    if cfg.resize_mode == "squash":
        img = _resize(img, out_hw, cfg.interpolation)
    elif cfg.resize_mode == "longest":
        img = _resize(img, _keep_ratio_size(img.height, img.width, out_hw, 1.0), cfg.interpolation)
    elif cfg.convention == "open_clip" and out_hw[0] != out_hw[1]:
        # open_clip: non-square shortest -> ResizeKeepRatio(size), always bicubic
        img = _resize(img, _keep_ratio_size(img.height, img.width, out_hw, 0.0), "bicubic")
    else:
        s = cfg.resize_size if cfg.resize_size is not None else out_hw[0]
        img = _resize(img, _shortest_edge_size(img.height, img.width, s), cfg.interpolation)
    if cfg.convention == "open_clip":
        img = img.convert("RGB")
    x = np.asarray(img, dtype=np.uint8)
    if x.ndim == 2:
        x = x[:, :, None]
    if cfg.resize_mode == "longest":
        x = _center_crop_or_pad_tv(x, out_hw, cfg.fill_color)
    elif cfg.resize_mode == "shortest" and cfg.do_center_crop:
        x = _center_crop_hf(x, out_hw) if cfg.convention == "hf" else _center_crop_or_pad_tv(x, out_hw, 0)
    x = np.ascontiguousarray(x.transpose(2, 0, 1))
    if cfg.convention == "hf":
        y = (x.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    else:
        y = x.astype(np.float32) / np.float32(255)
    if cfg.do_normalize:
        mean = np.asarray(cfg.mean, np.float32)[:, None, None]
        std = np.asarray(cfg.std, np.float32)[:, None, None]
        y = (y - mean) / std
    return y.astype(np.float32, copy=False)


def preprocess_batch(images: Sequence[Any], cfg: PreprocessConfig) -> np.ndarray:
    """A list of PIL images -> ``np.float32 [B, 3, H, W]``."""
    if len(images) == 0:
        return np.zeros((0, 3) + tuple(cfg.size), np.float32)
    return np.stack([preprocess_image(im, cfg) for im in images])
