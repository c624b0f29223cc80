import pytest
import torch

from mtx_dist.models import Block, ContrastiveModel, get_preset


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("preset,visual,total", [
    # OpenCLIP ViT-B-16 / ViT-L-14: 86.19 M / 303.97 M image tower with projection, 149.62 M / 427.62 M in all
    ("vit-b16", 86_192_640, 149_620_737),
    ("vit-l14", 303_966_208, 427_616_513),
])
def test_parameter_counts_match_openclip(preset, visual, total):
    with torch.device("meta"):
        model = ContrastiveModel.from_preset(preset)
    assert _count(model.visual) == visual
    assert _count(model) == total


@pytest.mark.parametrize("preset", ["vit-b16"])
def test_parameter_counts_equal_open_clip_models(preset, open_clip):
    name = {"vit-b16": "ViT-B-16"}[preset]
    with torch.device("meta"):
        ours = ContrastiveModel.from_preset(preset)
        ref = open_clip.create_model(name, device="meta")
    assert _count(ours.visual) == _count(ref.visual)
    assert _count(ours.text) == sum(p.numel() for n, p in ref.named_parameters()
                                    if not n.startswith("visual.") and n != "logit_scale")


def test_block_names_and_features_equal_timm_block(timm):
    torch.manual_seed(0)
    ours = Block(64, 4).eval()
    ref = timm.models.vision_transformer.Block(dim=64, num_heads=4, mlp_ratio=4.0, qkv_bias=True,
                                               norm_layer=torch.nn.LayerNorm, act_layer=torch.nn.GELU).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(3, 17, 64)
    want = ref(x)
    # relative to the outputs' magnitude (~4 here): another implementation's summation order, in fp32
    torch.testing.assert_close(ours(x), want, rtol=0, atol=1e-6 * max(1.0, float(want.abs().max())))


def test_text_tower_is_causal_and_pools_eot():
    torch.manual_seed(0)
    model = ContrastiveModel.from_preset("micro").eval()
    L = model.spec.text.context_length
    text = torch.zeros(2, L, dtype=torch.long)
    text[:, 0], text[:, 1], text[:, 2] = 49406, 320, 49407
    text[1, 5] = 1234  # a token after EOT must not change the EOT feature (causal attention)
    feats = model.encode_text(text)
    torch.testing.assert_close(feats[0], feats[1], rtol=0, atol=1e-6)


def test_forward_shapes_scale_and_backward():
    torch.manual_seed(0)
    model = ContrastiveModel.from_preset("micro")
    spec = model.spec
    image = torch.randn(4, 3, spec.vision.image_size, spec.vision.image_size)
    text = torch.randint(1, 49000, (4, spec.text.context_length))
    text[:, -1] = 49407
    img, txt, scale, bias = model(image, text)
    assert bias is None  # only the SigLIP loss adds a logit bias
    assert img.shape == txt.shape == (4, spec.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(4))
    assert scale.shape == () and abs(scale.item() - 1 / 0.07) < 1e-4
    (img @ txt.t() * scale).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p is not model.text.token_embedding.weight)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model(image, text)[2].item() == pytest.approx(100.0)  # clamped at 100


def test_unknown_preset_error():
    with pytest.raises(KeyError, match="unknown model preset 'vit-h99'"):
        get_preset("vit-h99")


def _close(got: torch.Tensor, want: torch.Tensor, rel: float) -> None:
    """Equal within ``rel`` of the compared values' largest magnitude."""
    torch.testing.assert_close(got, want, rtol=0, atol=rel * max(1e-30, float(want.abs().max())))


@pytest.mark.parametrize("causal", [False, True])
def test_block_output_at_one_position_equals_that_row_of_the_full_block(causal):
    # The towers' last block runs only the pooled token (Block.forward's `at`): its output and every
    # gradient (block parameters and input) equal the full block's read at that position.
    torch.manual_seed(0)
    blk = Block(32, 4, causal=causal)
    x = torch.randn(5, 9, 32, requires_grad=True)
    for at in (0, 4, torch.tensor([8, 0, 3, 5, 8])):
        rows = torch.arange(5), (torch.full((5,), at) if isinstance(at, int) else at)
        want, got = blk(x)[rows], blk(x, at=at)
        assert got.shape == (5, 32)
        _close(got, want, 1e-6)
        weights = torch.randn(5, 32)
        params = [x, *blk.parameters()]
        for g, w in zip(torch.autograd.grad((got * weights).sum(), params),
                        torch.autograd.grad((want * weights).sum(), params)):
            _close(g, w, 1e-5)


def test_towers_features_equal_running_every_block_on_every_token():
    torch.manual_seed(0)
    model = ContrastiveModel.from_preset("micro")
    v, t = model.visual, model.text
    image = torch.randn(3, 3, v.spec.image_size, v.spec.image_size)
    text = torch.zeros(3, 7, dtype=torch.long)
    text[:, 0], text[:, 1:4] = 49406, torch.randint(1, 49000, (3, 3))
    text[0, 6], text[1, 4], text[2, 2] = 49407, 49407, 49407  # EOT at 6, 4 and 2; padding after it
    x = v.ln_pre(v.tokens(image))
    for blk in v.blocks:
        x = blk(x)
    _close(model.visual(image), v.ln_post(x[:, 0]) @ v.proj, 1e-6)
    x = t.token_embedding(text) + t.pos_embed[:7]
    for blk in t.blocks:
        x = blk(x)
    _close(model.text(text), t.ln_final(x[torch.arange(3), torch.tensor([6, 4, 2])]) @ t.proj, 1e-6)
