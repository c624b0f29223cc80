import math

import pytest
import torch
import torch.nn.functional as F

import mtx_kernels
from mtx_dist.config import OptimConfig
from mtx_dist.evaluate import retrieval_metrics
from mtx_dist.loss import clip_loss
from mtx_dist.models import ContrastiveModel
from mtx_dist.optim import lr_factor, param_groups


def test_clip_loss_equals_hand_computation():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    scale = torch.tensor(10.0)
    logits = 10 * torch.tensor([[0.6, 0.0], [0.8, 1.0]])  # logits[i, j] = scale * <img_i, txt_j>
    i2t = (-math.log(math.exp(logits[0, 0]) / (math.exp(logits[0, 0]) + math.exp(logits[0, 1])))
           - math.log(math.exp(logits[1, 1]) / (math.exp(logits[1, 0]) + math.exp(logits[1, 1])))) / 2
    t2i = (-math.log(math.exp(logits[0, 0]) / (math.exp(logits[0, 0]) + math.exp(logits[1, 0])))
           - math.log(math.exp(logits[1, 1]) / (math.exp(logits[0, 1]) + math.exp(logits[1, 1])))) / 2
    assert clip_loss(img, txt, scale).item() == pytest.approx((i2t + t2i) / 2, rel=1e-6)


def test_clip_loss_is_float32_under_bf16_features():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    ref = clip_loss(a, b, torch.tensor(14.0))
    low = clip_loss(a.bfloat16(), b.bfloat16(), torch.tensor(14.0, dtype=torch.bfloat16))
    assert low.dtype == torch.float32 and low.item() == pytest.approx(ref.item(), rel=2e-2)


def test_weight_decay_groups():
    model = ContrastiveModel.from_preset("micro")
    decay, no_decay = param_groups(model, 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert "visual.blocks.0.attn.qkv.weight" in decayed and "visual.proj" in decayed
    for name in ("logit_scale", "visual.cls_token", "visual.pos_embed", "text.token_embedding.weight",
                 "visual.blocks.0.norm1.weight", "visual.blocks.0.attn.qkv.bias"):
        assert name not in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_cosine_schedule():
    cfg = OptimConfig(warmup_steps=10, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 110) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55) and f[109] > 0.1
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(500, cfg, 110) == pytest.approx(0.1)  # past the horizon: the floor
    assert lr_factor(60, OptimConfig(warmup_steps=10, decay_steps=210), 110) > 0.8  # explicit horizon


@pytest.mark.parametrize("causal", [False, True])
def test_attention_backends_agree(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 16) for _ in range(3))
    ref = mtx_kernels.attention(q, k, v, causal=causal, backend="math")
    torch.testing.assert_close(mtx_kernels.attention(q, k, v, causal=causal, backend="sdpa"), ref, atol=1e-5, rtol=1e-5)
    assert mtx_kernels.resolve_backend("auto") == "sdpa"
    with pytest.raises(mtx_kernels.AttentionBackendError, match="unknown attention backend 'cudnn9'"):
        mtx_kernels.attention(q, k, v, backend="cudnn9")


def test_retrieval_metrics_by_hand():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0]])  # items 1 and 2 swapped
    m = retrieval_metrics(img, txt, ks=(1, 2))
    assert m["i2t_recall_at_1"] == pytest.approx(1 / 3) and m["t2i_recall_at_1"] == pytest.approx(1 / 3)
    assert m["i2t_recall_at_2"] == pytest.approx(1 / 3)  # a miss ranks the match among the zero-score ties
    collapsed = retrieval_metrics(torch.ones(4, 2), torch.ones(4, 2), ks=(1,))
    assert collapsed["i2t_recall_at_1"] == 0.0  # ties count against the match
