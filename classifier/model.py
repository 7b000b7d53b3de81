"""The classifier ensemble: K timm networks that each map a nucleus patch to P(mitotic).

    ens = ClassifierEnsemble.from_pretrained("runs/demo/classifier")   # run folder or its model/
    probs = ens.predict(images_uint8)      # (N, K) per-member probabilities
    feats = ens.features(images_uint8)     # (N, D) penultimate features, mean over members

Each member is `timm.create_model(name, num_classes=1)` behind a fixed input
transform (`Preprocess`): upsample (the paper feeds 64x64 patches to ResNet34
upsampled x4), then normalise either the paper's way (divide by the image's
99th percentile) or with a channel mean/std. The transform and a per-member
Platt calibration (scale, bias on the logit, fitted on validation data) are
part of the exported folder, so scoring applies exactly what training used.

Exported folder: `config.json` {"format": "mitosis-ldm/classifier", model_name,
model_kwargs, input_size, upsample, normalisation, member_seeds, calibration,
feature_dim, ...} and `member-K.safetensors` per member.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mitosis_ldm.artifacts import CLASSIFIER, FORMAT, expect_artifact, held_warnings
from mitosis_ldm.errors import UserError
from mitosis_ldm.io import atomic_dir, read_json, write_json

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class ModelConfig:
    """What each ensemble member is (the `model:` section)."""

    name: str = "resnet34"                 # any timm model name
    model_kwargs: dict = field(default_factory=dict)  # extra timm kwargs, e.g. {channels: [32, 64, 128, 256]}
    pretrained: bool = False               # ImageNet weights from the model hub
    input_size: int = 64                   # patch side the classifier is trained on
    upsample: int = 4                      # the network sees input_size * upsample pixels
    normalisation: str = "percentile"      # percentile (the paper's) | meanstd
    percentile: float = 99.0
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    drop_rate: float = 0.0


def _timm_kwargs(cfg: ModelConfig) -> dict:
    kwargs = dict(cfg.model_kwargs)
    for key, value in kwargs.items():
        if isinstance(value, list):  # YAML lists -> the tuples timm's constructors expect
            kwargs[key] = tuple(value)
    if cfg.drop_rate:
        kwargs["drop_rate"] = cfg.drop_rate
    return kwargs


def build_network(cfg: ModelConfig, pretrained: bool | None = None) -> nn.Module:
    """`timm.create_model(name, num_classes=1)`; hub and name problems become one-line errors."""
    import timm

    pretrained = cfg.pretrained if pretrained is None else pretrained
    if not timm.is_model(cfg.name):
        raise UserError(f"model.name: '{cfg.name}' is not a timm model (see timm.list_models())")
    if pretrained:
        _check_hub_reachable(cfg.name)
    try:
        return timm.create_model(cfg.name, num_classes=1, pretrained=pretrained, **_timm_kwargs(cfg))
    except TypeError as err:
        raise UserError(f"model.model_kwargs: timm model '{cfg.name}' rejects {cfg.model_kwargs} ({err})") from None
    except Exception as err:  # hub / network errors come in many types (OSError, HfHubHTTPError, ...)
        if not pretrained:
            raise
        reason = " ".join(str(err).split())[:160]
        raise UserError(f"model.pretrained: cannot fetch pretrained weights for '{cfg.name}' from the model hub "
                        f"({type(err).__name__}: {reason}); set model.pretrained=false or pre-fill the hub "
                        f"cache (HF_HOME)") from None


def _check_hub_reachable(name: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not after a minute of download retries, when the model hub cannot be reached."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}:
        return  # weights must come from the local cache; timm's own error says if they are not there
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as err:
        raise UserError(f"model.pretrained: cannot reach the model hub ({host}: {err.strerror or err}) to fetch "
                        f"pretrained weights for '{name}'; set model.pretrained=false, or pre-fill the hub cache "
                        f"and set HF_HUB_OFFLINE=1") from None


UPSAMPLE_RANGE = (1, 16)  # model.upsample: what training accepts and a classifier folder's config.json may hold


class Preprocess(nn.Module):
    """uint8-range images (B, 3, H, W) float in [0, 255] -> the network's input."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.normalisation not in ("percentile", "meanstd"):
            raise UserError(f"model.normalisation: must be percentile or meanstd, got '{cfg.normalisation}'")
        self.kind = cfg.normalisation
        self.q = cfg.percentile / 100.0
        self.upsample = int(cfg.upsample)
        self.register_buffer("mean", torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0,
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 255]
        if self.kind == "percentile":
            # the paper: each image divided by its own 99th percentile (all channels together)
            scale = torch.quantile(x.flatten(1), self.q, dim=1).clamp_min(1.0)  # (B,)
            x = x / scale.view(-1, 1, 1, 1)
        else:
            x = (x - self.mean) / self.std
        if self.upsample > 1:
            x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return x  # (B, 3, H*u, W*u)


class MitosisClassifier(nn.Module):
    """One ensemble member: fixed preprocessing + a timm network with a single logit."""

    def __init__(self, cfg: ModelConfig, pretrained: bool | None = None):
        super().__init__()
        self.preprocess = Preprocess(cfg)
        self.net = build_network(cfg, pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) in [0, 255]
        return self.net(self.preprocess(images)).squeeze(1)  # (B,) logits

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.net.forward_features(self.preprocess(images))
        return self.net.forward_head(x, pre_logits=True)  # (B, D)


def to_network_input(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [0, 255]."""
    return torch.from_numpy(np.require(images_uint8, np.uint8, ["C", "W"])).permute(0, 3, 1, 2).float()


def fit_size(image: np.ndarray, size: int, name: str = "image") -> np.ndarray:
    """The documented wrong-size rule: larger images are centre-cropped to `size`, smaller ones refused."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise UserError(f"{name}: image is {h}x{w} pixels, smaller than the classifier's input "
                        f"{size}x{size}; resize or re-cut it (larger images are centre-cropped)")
    if h == size and w == size:
        return image
    y0, x0 = (h - size) // 2, (w - size) // 2
    return image[y0: y0 + size, x0: x0 + size]


class ClassifierEnsemble:
    """K calibrated members sharing one preprocessing recipe; loaded from one folder."""

    def __init__(self, cfg: ModelConfig, members: list[MitosisClassifier], seeds: list[int],
                 calibration: list[tuple[float, float]] | None = None, extra: dict | None = None):
        self.cfg = cfg
        self.member_models = members
        self.seeds = list(seeds)
        self.calibration = [tuple(c) for c in (calibration or [(1.0, 0.0)] * len(members))]
        self.extra = dict(extra or {})
        for m in self.member_models:
            m.eval()

    # -- the names other stages use -----------------------------------------
    @property
    def members(self) -> int:
        return len(self.member_models)

    @property
    def patch_size(self) -> int:
        return int(self.cfg.input_size)

    @property
    def feature_dim(self) -> int:
        return int(self.member_models[0].net.num_features)

    @property
    def device(self) -> torch.device:
        return next(self.member_models[0].parameters()).device

    def to(self, device) -> "ClassifierEnsemble":
        """Move every member to `device`: scoring runs there, and its results still come back as NumPy arrays."""
        for m in self.member_models:
            m.to(device)
        return self

    def _batches(self, images_uint8: np.ndarray, batch_size: int):
        images = np.asarray(images_uint8)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        if images.shape[1:3] != (self.patch_size, self.patch_size):
            images = np.stack([fit_size(im, self.patch_size) for im in images]) if len(images) else images
        for start in range(0, len(images), batch_size):
            yield to_network_input(images[start: start + batch_size]).to(self.device)

    @torch.no_grad()
    def logits(self, images_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Calibrated logits (N, K)."""
        out = []
        for x in self._batches(images_uint8, batch_size):
            x = self.member_models[0].preprocess(x)  # members share the recipe: normalise once
            cols = [a * m.net(x).squeeze(1) + b for m, (a, b) in zip(self.member_models, self.calibration)]  # K x (B,)
            out.append(torch.stack(cols, 1))
        return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, self.members), np.float32)

    def predict(self, images_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """P(mitotic) per member, (N, K) float32."""
        from scipy.special import expit  # 1 / (1 + exp(-x)) overflows in float32 below about -88

        return expit(self.logits(images_uint8, batch_size)).astype(np.float32)

    @torch.no_grad()
    def features(self, images_uint8: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Penultimate-layer features averaged over members, (N, D) float32."""
        out = []
        for x in self._batches(images_uint8, batch_size):
            x = self.member_models[0].preprocess(x)
            out.append(torch.stack([m.net.forward_head(m.net.forward_features(x), pre_logits=True)
                                    for m in self.member_models]).mean(0))  # (B, D)
        return torch.cat(out).float().cpu().numpy() if out else np.zeros((0, self.feature_dim), np.float32)

    # -- persistence --------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format": FORMAT[CLASSIFIER],
            "model_name": self.cfg.name,
            "model_kwargs": self.cfg.model_kwargs,
            "input_size": self.cfg.input_size,
            "upsample": self.cfg.upsample,
            "normalisation": {"kind": self.cfg.normalisation, "percentile": self.cfg.percentile,
                              "mean": self.cfg.mean, "std": self.cfg.std},
            "drop_rate": self.cfg.drop_rate,
            "members": self.members,
            "member_seeds": self.seeds,
            "calibration": [{"scale": a, "bias": b} for a, b in self.calibration],
            "feature_dim": self.feature_dim,
            **self.extra,
        }

    def save_pretrained(self, path, overwrite: bool = False) -> Path:
        with atomic_dir(path, overwrite) as tmp:
            for k, member in enumerate(self.member_models):
                save_file({n: t.detach().contiguous().cpu() for n, t in member.net.state_dict().items()},
                          str(tmp / f"member-{k}.safetensors"))
            write_json(tmp / "config.json", self.config_dict())
        return Path(path)

    @classmethod
    def from_pretrained(cls, path, flag: str = "--classifier") -> "ClassifierEnsemble":
        with held_warnings():  # torch's warnings about a config's odd layers, shown only if the load succeeds
            return cls._from_pretrained(path, flag)

    @classmethod
    def _from_pretrained(cls, path, flag: str) -> "ClassifierEnsemble":
        folder = expect_artifact(path, CLASSIFIER, flag)
        meta = read_json(folder / "config.json", "classifier config")
        cfg, seeds, calibration = _parse_config(meta, folder / "config.json")
        members = []
        for k in range(len(seeds)):
            weights = folder / f"member-{k}.safetensors"
            if not weights.exists():
                raise UserError(f"{weights}: missing ({len(seeds)} members listed in config.json)")
            try:
                member = MitosisClassifier(cfg, pretrained=False)
            except UserError as err:
                raise UserError(f"{folder / 'config.json'}: {err}") from None
            except Exception as err:  # timm constructors reject odd kwargs with many exception types
                raise UserError(f"{folder / 'config.json'}: fields 'model_name'/'model_kwargs' do not build a "
                                f"network ({type(err).__name__}: {_short(err)})") from None
            try:
                state = load_file(str(weights))
            except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
                raise UserError(f"{weights}: not a readable safetensors file ({_short(err)})") from None
            try:
                missing, unexpected = member.net.load_state_dict(state, strict=False)
            except RuntimeError as err:  # shape mismatches
                raise UserError(f"{weights}: does not fit '{cfg.name}' as config.json describes it "
                                f"({_short(err)})") from None
            if missing or unexpected:
                raise UserError(f"{weights}: does not fit '{cfg.name}' (missing {list(missing)[:2]}, "
                                f"unexpected {list(unexpected)[:2]})")
            members.append(member)
        if "feature_dim" in meta and meta["feature_dim"] != members[0].net.num_features:
            raise UserError(f"{folder / 'config.json'}: field 'feature_dim' is {meta['feature_dim']!r} but "
                            f"'{cfg.name}' has {members[0].net.num_features} features")
        known = {"format", "model_name", "model_kwargs", "input_size", "upsample", "normalisation", "drop_rate",
                 "members", "member_seeds", "calibration", "feature_dim"}
        extra = {k: v for k, v in meta.items() if k not in known}
        return cls(cfg, members, seeds, calibration, extra)


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:160]


def _parse_config(meta, where: Path) -> tuple[ModelConfig, list[int], list[tuple[float, float]] | None]:
    """The exported config.json -> (ModelConfig, member seeds, calibration); wrong types and contradictions
    become one line naming the field."""
    def need(ok: bool, field: str, expected: str):
        if not ok:
            raise UserError(f"{where}: field '{field}' must be {expected}")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    need(isinstance(meta, dict), "<root>", "a JSON object")
    for key in ("model_name", "input_size", "upsample", "normalisation", "member_seeds"):
        need(key in meta, key, "present")
    norm = meta["normalisation"]
    need(isinstance(meta["model_name"], str), "model_name", "a timm model name (a string)")
    need(isinstance(meta.get("model_kwargs", {}), dict), "model_kwargs", "an object")
    need(is_int(meta["input_size"]) and 8 <= meta["input_size"] <= 4096, "input_size", "an integer in [8, 4096]")
    low, high = UPSAMPLE_RANGE
    need(is_int(meta["upsample"]) and low <= meta["upsample"] <= high, "upsample", f"an integer in [{low}, {high}]")
    need(isinstance(norm, dict) and norm.get("kind") in ("percentile", "meanstd"), "normalisation.kind",
         "percentile or meanstd")
    need(is_num(norm.get("percentile", 99.0)) and 0 < norm.get("percentile", 99.0) <= 100, "normalisation.percentile",
         "a number in (0, 100]")
    for key in ("mean", "std"):
        value = norm.get(key, IMAGENET_MEAN)
        need(isinstance(value, list) and len(value) == 3 and all(is_num(v) for v in value), f"normalisation.{key}",
             "a list of 3 numbers")
    need(all(v > 0 for v in norm.get("std", IMAGENET_STD)), "normalisation.std", "positive")
    need(is_num(meta.get("drop_rate", 0.0)) and 0 <= meta.get("drop_rate", 0.0) < 1, "drop_rate", "a number in [0, 1)")
    seeds = meta["member_seeds"]
    need(isinstance(seeds, list) and 0 < len(seeds) <= 64 and all(is_int(s) for s in seeds), "member_seeds",
         "a non-empty list of integers")
    need(meta.get("members", len(seeds)) == len(seeds), "members",
         f"the number of member_seeds ({len(seeds)})")
    calibration = meta.get("calibration", [])
    need(isinstance(calibration, list) and all(isinstance(c, dict) and is_num(c.get("scale")) and is_num(c.get("bias"))
                                               for c in calibration), "calibration", "a list of {scale, bias} numbers")
    need(len(calibration) in (0, len(seeds)), "calibration", f"one entry per member ({len(seeds)})")
    cfg = ModelConfig(name=meta["model_name"], model_kwargs=meta.get("model_kwargs", {}), pretrained=False,
                      input_size=meta["input_size"], upsample=meta["upsample"], normalisation=norm["kind"],
                      percentile=float(norm.get("percentile", 99.0)), mean=list(norm.get("mean", IMAGENET_MEAN)),
                      std=list(norm.get("std", IMAGENET_STD)), drop_rate=float(meta.get("drop_rate", 0.0)))
    return cfg, list(seeds), [(float(c["scale"]), float(c["bias"])) for c in calibration] or None
