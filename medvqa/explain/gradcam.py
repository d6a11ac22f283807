"""Saliency for any medvqa model: the Grad-CAM family through pytorch-grad-cam, and gradient-
weighted attention rollout (DESIGN §7).

The model is wrapped as `pixels -> answer logits` with the tokenised question held inside the
wrapper; the target layer is the norm before a ViT block's attention (a third of the way in by
default: the last block's maps rarely point at the named organ), and the ViT tokens
are reshaped to their patch grid (CLS dropped). The CAM object is built per call with `with`, so
its hooks never outlive the call and never touch a model being trained.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from scipy.ndimage import gaussian_filter

from pytorch_grad_cam import (AblationCAM, EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM,
                              XGradCAM)
from pytorch_grad_cam.ablation_layer import AblationLayerVit
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from medvqa.data import InputError
from medvqa.explain import DEFAULT_METHOD, GRADIENT_FREE, METHOD_NAMES, SLOW_METHODS, supports

ROLLOUTS = {"rollout": "cls", "token-rollout": "tokens", "head-rollout": "head"}   # method -> readout
PLAIN = {"plain-head-rollout": None, "head-attention": -1}   # gradient-free: method -> first block (None: `layer`)
CAM_METHODS = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "xgradcam": XGradCAM, "layercam": LayerCAM,
               "eigencam": EigenCAM, "scorecam": ScoreCAM, "ablationcam": AblationCAM}


class ImageToLogits(nn.Module):
    """pixels (B, 3, S, S) -> answer logits (B, C) for one fixed question."""

    def __init__(self, encoders, model, text: dict):
        super().__init__()
        self.encoders, self.model, self.text = encoders, model, text

    def forward(self, pixel_values):
        # The backbone is frozen; a leaf that requires grad gives the hooked activations a graph.
        px = pixel_values if pixel_values.requires_grad else pixel_values.detach().requires_grad_(True)
        return self.head(self.image_tokens(px))

    def image_tokens(self, pixel_values):
        """(B, 3, S, S) -> (B, 1+N, Di): the backbone's [CLS] then patch tokens, as the heads read them."""
        g, loc = self.encoders.encode_image(pixel_values)
        return torch.cat([g[:, None], loc], 1)

    def head(self, image_tokens):
        """(B, 1+N, Di) backbone tokens -> (B, C) logits."""
        return self.model(self.batch(image_tokens))["logits"]

    def batch(self, image_tokens):
        """The model's input batch: the backbone tokens with the question repeated B times."""
        B = image_tokens.shape[0]
        return {"image_tokens": image_tokens, **{k: v.expand(B, *v.shape[1:]) for k, v in self.text.items()}}


def vit_reshape(grid: int):
    def reshape(tokens):                       # (B, 1+N, C) -> (B, C, grid, grid)
        t = tokens[:, -grid * grid:]
        return t.reshape(t.shape[0], grid, grid, t.shape[-1]).permute(0, 3, 1, 2)
    return reshape


OUTLIER_MADS = 6.0   # a token this many scaled MADs above its image's median norm is an outlier


def outlier_tokens(tokens: torch.Tensor, k: float = OUTLIER_MADS) -> torch.Tensor:
    """(N, D) patch tokens of one image -> (N,) bool: norm above median + k·1.4826·MAD (a robust
    z-score; the MAD, not the std, so a few huge tokens cannot hide themselves by inflating it).
    The high-norm tokens ViTs without registers write into background patches (Darcet et al. 2024)."""
    n = tokens.norm(dim=-1)
    med = n.median()
    return n > med + k * 1.4826 * (n - med).abs().median()


def default_layer(encoders, method: str = DEFAULT_METHOD) -> int:
    """A third of the way into the image backbone. On SLAKE validation (60 questions, baseline-slake,
    `medvqa pointing-game --split validate --layers …`) GradCAM++ hit 6.7 / 13.3 / 15.0 / 28.3 / 25.0 %
    reading blocks 11 / 8 / 6 / 4 / 2 of DINOv2-S: the last blocks' maps are global, not local.
    head-rollout starts two thirds in (block 8): on SLAKE validation (210 questions, three models) it
    hit as often as from block 4 (41.43 / 41.43 / 41.43 against 41.43 / 41.43 / 40.95) at half the cost."""
    n = len(encoders.image.encoder.layer)
    return 2 * n // 3 if method in ("head-rollout", "plain-head-rollout") else n // 3


def explain(encoders, model, image: Image.Image, question: str, method: str = DEFAULT_METHOD,
            target: int | None = None, batch_size: int = 32, layer: int | None = None,
            cached: dict | None = None) -> np.ndarray:
    """Saliency map (H×W float32 in [0, 1], the image's own size) for answer class `target`
    (default: the predicted answer), read at the input of ViT block `layer` (default: `default_layer`,
    chosen on SLAKE validation by the pointing game); for a rollout, the block it starts from.
    `cached`: the image's backbone pass (medvqa.encode.Backbone.encode): then the target, the query attention and the rollout's first
    blocks need no backbone pass of their own."""
    return explain_models(encoders, [model], image, question, method, [target], batch_size, layer, cached)[0]


def explain_models(encoders, models, image: Image.Image, question: str, method: str = DEFAULT_METHOD,
                   targets=None, batch_size: int = 32, layer: int | None = None,
                   cached: dict | None = None, text: dict | None = None) -> list[np.ndarray]:
    """`explain` for several models that read the same backbone `encoders`, one map per model (and
    per entry of `targets`, default each model's predicted answer). A rollout's gradient pass through
    the backbone blocks is run once for all of them (`gradient_rollouts`); the other methods run per model.
    `text`: the question's encoding (Encoders.question_inputs), when already computed."""
    if method not in METHOD_NAMES:
        raise InputError(f"unknown saliency method {method!r}; choose one of {', '.join(METHOD_NAMES)}")
    text = encoders.question_inputs([question]) if text is None else text   # the text backbone is shared too
    wrappers = [ImageToLogits(encoders, m, text).eval() for m in models]
    targets = list(targets) if targets is not None else [None] * len(models)
    x = encoders.preprocess([image])                                                   # (1, 3, S, S)
    tokens = None if cached is None else cached["tokens"][None]                        # (1, 1+N, Di)
    blocks = encoders.image.encoder.layer
    layer = default_layer(encoders, method) if layer is None else layer
    if not -len(blocks) <= layer < len(blocks):
        raise InputError(f"layer {layer}: the image backbone has {len(blocks)} blocks")
    if method in PLAIN:      # the backbone's own attention: one map serves every model
        start = (layer if PLAIN[method] is None else PLAIN[method]) % len(blocks)
        states = cached["blocks"] if cached is not None else _block_inputs(encoders, x)
        maps = [plain_head_rollout(encoders, states, start)] * len(models)
    elif method in ROLLOUTS:   # the target of each model comes from its head on the shared pass
        start = layer % len(blocks)
        maps = gradient_rollouts(wrappers, x, targets, start=start, readout=ROLLOUTS[method],
                                 block_input=None if cached is None else cached["blocks"][start][None])
    else:
        maps = [_model_map(w, x, t, method, blocks[layer].norm1, batch_size, tokens) for w, t in zip(wrappers, targets)]
    scaled: dict = {}   # a map shared by several models is resized once
    for m in maps:
        if id(m) not in scaled:
            scaled[id(m)] = _image_map(m, image)
    return [scaled[id(m)] for m in maps]


def _model_map(wrapper, x, target, method, norm, batch_size, tokens) -> np.ndarray:
    """A map of the Grad-CAM family read at `norm`, or the query attention: (grid, grid) or (S, S)."""
    if method == "query-attention":   # gradient-free: no target, no backbone layer
        return query_attention(wrapper, x, tokens=tokens)                                # (grid, grid)
    if target is None:
        with torch.no_grad():
            target = int((wrapper(x) if tokens is None else wrapper.head(tokens)).argmax(-1))
    kw = {"ablation_layer": AblationLayerVit()} if method == "ablationcam" else {}
    with CAM_METHODS[method](model=wrapper, target_layers=[norm],
                             reshape_transform=vit_reshape(wrapper.encoders.grid), **kw) as cam:
        if method in SLOW_METHODS:
            cam.batch_size = batch_size
        return cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]          # (S, S) in [0, 1]


def _image_map(m: np.ndarray, image: Image.Image) -> np.ndarray:
    """A map on the patch grid (or the backbone's input size) -> the image's own size, min-max scaled to [0, 1]."""
    m = np.nan_to_num(m.astype(np.float32))
    out = np.asarray(Image.fromarray(m).resize(image.size, Image.BILINEAR), dtype=np.float32)
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)


@contextmanager
def eager_attention(vit):
    """Attention probabilities are only materialised (and returned) by the eager kernel; the fused
    SDPA one that answers use stays the default outside this block."""
    before = vit.config._attn_implementation
    vit.set_attn_implementation("eager")
    try:
        yield
    finally:
        vit.set_attn_implementation(before)


ROLLOUT_SIGMA = 1.0   # patches; see gradient_rollout
# The head whose [CLS] attention "head-rollout" reads in the last block: head 3 of 6 (index 2) of
# DINOv2-S's block 12, chosen on SLAKE validation among every block's heads (docs/experiments.md, Saliency).
ROLLOUT_HEAD = 2


def relevance(attn, grads, tokens, until: int | None = None) -> torch.Tensor:
    """Chefer et al.'s rollout, Eq. 5–6: R ← R + Ā R over the blocks, R = I at the start, with
    Ā = mean_heads((∇A ⊙ A)⁺) and the key columns of each block's outlier input tokens zeroed
    (`outlier_tokens`), so that no relevance flows through a high-norm artefact token.
    attn, grads: per block (1, heads, T, T); tokens: each block's input (1, T, D); `until`: the
    number of blocks to use (default all). -> R (T, T)."""
    T = attn[0].shape[-1]
    R = torch.eye(T)                                                    # (T, T)
    for a, g, t in list(zip(attn, grads, tokens))[:until]:
        keep = torch.ones(T)
        keep[1:] = (~outlier_tokens(t[0, 1:])).float()                  # (T,): the [CLS] key is always kept
        R = R + ((g * a).clamp(min=0).mean(1)[0] * keep) @ R
    return R


def attention_probs(block, h) -> torch.Tensor:
    """A DINOv2 block's attention probabilities from its input h (1, T, D) -> (1, heads, T, T), as its
    eager kernel computes them (the cached pass ran the fused one, which returns none)."""
    a = block.attention
    x = block.norm1(h)
    q, k = (p(x).view(1, -1, a.num_attention_heads, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj))
    return (q @ k.transpose(-1, -2) * a.scaling).softmax(-1)


def _block_inputs(encoders, x) -> torch.Tensor:
    """(1, 3, S, S) -> (L+1, T, D) the input of each image block, as medvqa.encode caches them."""
    with torch.no_grad():
        return torch.cat(encoders.image(pixel_values=x, output_hidden_states=True).hidden_states)


@torch.no_grad()
def plain_head_rollout(encoders, states, start: int, sigma: float = ROLLOUT_SIGMA) -> np.ndarray:
    """Head ROLLOUT_HEAD's [CLS] row of the last block carried back through the plain rollout (the
    heads' mean attention, outlier keys removed; `relevance` with unit gradients) of blocks `start`
    to the last but one; `start` = the last block: that head's attention alone. Gradient-free: the
    blocks' inputs `states` (L+1, T, D) come from the backbone pass. -> (grid, grid) float32."""
    blocks = encoders.image.encoder.layer
    ins = [states[i][None] for i in range(start, len(blocks))]                # each (1, T, D)
    A = [attention_probs(b, h) for b, h in zip(blocks[start:], ins)]          # each (1, heads, T, T)
    T = states.shape[-2]
    R = relevance(A[:-1], [torch.ones(())] * (len(A) - 1), ins[:-1]) if len(A) > 1 else torch.eye(T)   # (T, T)
    g = encoders.grid
    m = (A[-1][0, ROLLOUT_HEAD, 0] @ R)[-g * g:].reshape(g, g).float().numpy()
    return gaussian_filter(m, sigma) if sigma > 0 else m


def gradient_rollout(wrapper: ImageToLogits, x, target: int | None, start: int = 0, sigma: float = ROLLOUT_SIGMA,
                     readout: str = "cls", block_input=None) -> np.ndarray:
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, CVPR 2021, "Generic
    attention-model explainability"; `relevance`) from block `start` on, for answer `target`
    (None: the predicted one). Unlike a CAM it follows
    attention back from the tokens the head reads to the patches they gathered from.
    readout "cls": the map is the CLS token's row of R over the patch grid (Chefer's choice for a
    classifier on [CLS]). "tokens": the rows of every output token h_t, weighted by |∇h_t · h_t|,
    since no head here reads only the CLS token (CMI-MTL's QQ-Former cross-attends to all of them);
    the magnitude, because a token that argues against the answer is read as much as one that
    argues for it (on SLAKE validation the signed weights localised worse: docs/decisions.md).
    "head" (per-head selection): the last block's Ā is replaced by one head's [CLS] attention
    (ROLLOUT_HEAD), carried back through R of the blocks before it; the heads' mean there is where the
    gradient-weighted maps lose the organ (docs/experiments.md, Saliency).
    The grid is then Gaussian-smoothed (σ = 1 patch): a single patch's peak is noise, a region's
    is not. Only blocks `start` on run with gradients, from `block_input` (1, T, D), the input of
    block `start` (medvqa.encode caches it; else one gradient-free pass computes it).
    -> (grid, grid) float32."""
    return gradient_rollouts([wrapper], x, [target], start, sigma, readout, block_input)[0]


def gradient_rollouts(wrappers: list[ImageToLogits], x, targets: list, start: int = 0, sigma: float = ROLLOUT_SIGMA,
                      readout: str = "cls", block_input=None) -> list[np.ndarray]:
    """`gradient_rollout` for several models on one backbone (the `encoders` of `wrappers[0]`): one
    eager forward of blocks `start` on with a graph, shared by all of them; then per model only its
    head on the output and the input gradients of its target logit (torch.autograd.grad, so that
    nothing accumulates in any weight's .grad and no model's gradients reach another's map)."""
    vit = wrappers[0].encoders.image
    blocks = vit.encoder.layer[start:]
    if block_input is None:
        with torch.no_grad():
            block_input = vit(pixel_values=x, output_hidden_states=True).hidden_states[start]
    attn, inputs = [], []                                               # each (1, heads, T, T); (1, T, D)
    hooks = [b.attention.register_forward_hook(lambda m, i, o: attn.append(o[1])) for b in blocks]
    try:
        with eager_attention(vit):
            h = block_input.detach().clone().requires_grad_(True)       # (1, T, D)
            for b in blocks:                                            # Dinov2Model.forward from block `start`
                inputs.append(h.detach())
                h = b(h, None)
            h = vit.layernorm(h)                                        # (1, T, D)
    finally:
        for hk in hooks:
            hk.remove()
    A = [a.detach() for a in attn]
    g = wrappers[0].encoders.grid
    maps = []
    for w, target in zip(wrappers, targets):
        logits = w.head(h)[0]                                           # (C,)
        target = int(logits.argmax()) if target is None else target
        *grads, dh = torch.autograd.grad(logits[target], attn + [h], retain_graph=True)
        if readout == "head":
            row = A[-1][0, ROLLOUT_HEAD, 0] @ relevance(A, grads, inputs, until=len(A) - 1)   # (T,)
        else:
            R = relevance(A, grads, inputs)
            row = R[0] if readout == "cls" else (dh * h.detach())[0].sum(-1).abs() @ R        # (T,)
        m = row[-g * g:].reshape(g, g).numpy()
        maps.append(gaussian_filter(m, sigma) if sigma > 0 else m)
    return maps


def query_attention(wrapper: ImageToLogits, x, sigma: float = ROLLOUT_SIGMA, tokens=None) -> np.ndarray:
    """The head's own question-conditioned attention over the image tokens, on the patch grid:
    CMI-MTL's QQ-Former cross-attention averaged over heads, layers and queries, or the baseline's
    pooling weights. No gradient, so one map per question whatever the `target`. Smoothed like the
    rollout (σ = 1 patch): unsmoothed, its maximum sits on single high-attention patches, and on
    SLAKE validation CMI-MTL's map hit the named organ 24.29 % unsmoothed vs 29.05 % smoothed
    (docs/decisions.md). `tokens`: the image's backbone tokens (1, 1+N, Di), when already computed.
    -> (grid, grid) float32."""
    if not supports(wrapper.model, "query-attention"):
        raise InputError("query-attention reads a question-conditioned attention over the image tokens, which "
                         f"this {type(wrapper.model).__name__} does not have (CMI-MTL and the baseline do); "
                         "use head-attention")
    with torch.no_grad():
        tokens = wrapper.image_tokens(x) if tokens is None else tokens
        a = wrapper.model.image_attention(wrapper.batch(tokens))[0]                       # (1+N,)
    g = wrapper.encoders.grid
    m = a[-g * g:].reshape(g, g).float().numpy()
    return gaussian_filter(m, sigma) if sigma > 0 else m


def overlay(image: Image.Image, cam: np.ndarray, opacity: float = 0.5, colormap: str = "jet") -> Image.Image:
    """The map coloured with a matplotlib colormap, blended over the image."""
    import matplotlib

    rgb = (matplotlib.colormaps[colormap](cam)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(rgb), float(np.clip(opacity, 0, 1)))


def captioned(image: Image.Image, caption: str, cam: np.ndarray | None = None, opacity: float = 0.5,
              colormap: str = "jet") -> Image.Image:
    """The image with `caption` (the map's method and target) written above it and, when a map is
    given, the map blended over it with a colour bar on the right (map value 0 at the bottom, 1 at the
    top): the saved PNG says what it shows without the app around it."""
    import matplotlib
    from PIL import ImageDraw, ImageFont

    body = overlay(image, cam, opacity, colormap) if cam is not None else image.convert("RGB")
    w, h = body.size
    font = ImageFont.load_default(size=max(11, min(w, h) // 28))
    pad = font.size // 2
    top = font.size + 2 * pad
    bar = (3 * font.size + 2 * pad) if cam is not None else 0
    out = Image.new("RGB", (w + bar, h + top), "white")
    out.paste(body, (0, top))
    d = ImageDraw.Draw(out)
    d.text((pad, pad), caption, fill="black", font=font)
    if cam is not None:
        ramp = np.linspace(1, 0, h)[:, None].repeat(font.size, 1)                       # (h, bar width): 1 on top
        strip = (matplotlib.colormaps[colormap](ramp)[..., :3] * 255).astype(np.uint8)
        out.paste(Image.fromarray(strip), (w + pad, top))
        for v, y in ((1, top), (0, top + h - font.size)):
            d.text((w + pad + font.size + 2, y), str(v), fill="black", font=font)
    return out
