"""Explanations. pytorch-grad-cam takes seconds to import, so it loads only when a map is asked
for: the CLI and the app can list the method names without it."""
# "rollout": gradient-weighted attention rollout (Chefer et al., 2021) read from the CLS row;
# "token-rollout": the same rollout read from every output token the head is sensitive to;
# "head-rollout": the same rollout with the last block read through one selected head (per-head selection);
# "query-attention": the head's own question-conditioned attention over the image tokens (CMI-MTL's
# QQ-Former, the baseline's pooling), gradient-free;
# "head-attention": the selected head's [CLS] attention of the last backbone block alone, and
# "plain-head-rollout": that row carried back through the plain (Abnar & Zuidema, 2020) rollout of the
# blocks before it: head-rollout without gradients, read from the cached backbone pass, so the same map
# for every model on one frozen backbone, question and answer. Ours; the rest pytorch-grad-cam's.
METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "rollout", "token-rollout",
                "head-rollout", "plain-head-rollout", "head-attention", "query-attention", "scorecam", "ablationcam")
# The default where a user does not choose, for every model: the selected head's attention, which hit
# within four questions of head-rollout on SLAKE validation (83 vs 87 of 210; on test 69 of 217 each) and
# needs no gradient pass, so the three maps of a click cost ~10 ms instead of ~140 ms
# (docs/experiments.md, Saliency 5).
DEFAULT_METHOD = "head-attention"
MODEL_DEFAULT_METHOD: dict[str, str] = {}
# Menu methods whose maximum fell in the named organ's box less often than a random point on SLAKE
# test (docs/experiments.md, Saliency): the app labels them so.
BELOW_RANDOM = ("eigencam",)


def default_method(model_name: str) -> str:
    return MODEL_DEFAULT_METHOD.get(model_name, DEFAULT_METHOD)


def supports(model, method: str) -> bool:
    """Every method works on every model but `query-attention`, which needs a model whose
    `has_query_attention` is true (a question-conditioned attention over the image tokens, read by
    its `image_attention`: the baseline's pooling, CMI-MTL's QQ-Former); CMDPI has none, nor
    CMI-MTL's w/o-QQ-Former ablation."""
    return method != "query-attention" or model.has_query_attention


SLOW_METHODS = ("scorecam", "ablationcam")   # one forward per feature channel: seconds to minutes on CPU
GRADIENT_FREE = ("query-attention", "plain-head-rollout", "head-attention")   # no target answer
BACKBONE_ONLY = ("plain-head-rollout", "head-attention")   # the image backbone's alone: no question, no model

__all__ = ["BACKBONE_ONLY", "BELOW_RANDOM", "DEFAULT_METHOD", "GRADIENT_FREE", "METHOD_NAMES", "SLOW_METHODS", "captioned",
           "default_method", "explain",
           "supports", "overlay"]


def __getattr__(name):
    if name in ("captioned", "explain", "overlay"):
        from medvqa.explain import gradcam

        return getattr(gradcam, name)
    raise AttributeError(f"module 'medvqa.explain' has no attribute {name!r}")
