"""The default frame encoder: tubelet patching equals a strided Conv3d, tokens count as
documented, slices attend only within themselves, and the Qwen2.5-VL-size tower has
Qwen2.5-VL's parameter count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unimoe.model.config import AudioLMConfig
from unimoe.model.params import parameter_breakdown
from unimoe.model.transformer import meta_model
from unimoe.model.vision import FrameViT

torch.set_num_threads(2)


def small_vit(**kw) -> FrameViT:
    torch.manual_seed(0)
    args = dict(hidden_size=24, width=16, depth=2, num_heads=2, intermediate_size=32, patch_size=4,
                temporal_patch_size=2, merge_size=2, image_size=16, num_frames=4)
    args.update(kw)
    return FrameViT(**args)


def test_patch_embedding_equals_a_strided_conv3d():
    vit = small_vit()
    video = torch.rand(1, 4, 3, 16, 16)
    tp, p, w = 2, 4, 16
    conv_w = vit.patch_embed.weight.view(w, 3, tp, p, p)  # the Conv3d weight layout [out, in, t, h, w]
    x = (video - vit.pixel_mean) / vit.pixel_std  # [1, F, 3, H, W]
    ref = F.conv3d(x[0].permute(1, 0, 2, 3).unsqueeze(0), conv_w, stride=(tp, p, p))  # [1, w, G, hp, wp]
    ref = ref[0].permute(1, 2, 3, 0).reshape(2, 16, w)  # [G, hp*wp, w] in row-major patch order
    hp = wp = 4
    xv = x.view(1, 2, tp, 3, hp, p, wp, p).permute(0, 1, 4, 6, 3, 2, 5, 7).reshape(2, hp * wp, -1)
    torch.testing.assert_close(vit.patch_embed(xv), ref, atol=1e-5, rtol=1e-5)


def test_token_count_shape_and_slice_locality():
    vit = small_vit().eval()
    assert vit.num_tokens(4, 16, 16) == 2 * 2 * 2
    assert vit.num_tokens(3, 16, 32) == 2 * 2 * 4  # F padded to a multiple of the temporal patch
    video = torch.rand(2, 4, 3, 16, 16)
    out = vit(video)
    assert out.shape == (2, 8, 24)
    changed = video.clone()
    changed[:, 2:] = torch.rand(2, 2, 3, 16, 16)  # only the second tubelet slice
    out2 = vit(changed)
    torch.testing.assert_close(out2[:, :4], out[:, :4])  # first slice's tokens unchanged
    assert not torch.allclose(out2[:, 4:], out[:, 4:])
    odd = vit(video[:, :3])  # 3 frames -> last frame repeated
    torch.testing.assert_close(odd, vit(torch.cat([video[:, :3], video[:, 2:3]], 1)))


def test_qwen25_vl_sized_tower_parameter_count():
    """Qwen2.5-VL's vision tower, counted by hand: Conv3d patch embed (no bias); 32 blocks of
    RMSNorm, qkv+proj with bias, RMSNorm, SwiGLU with bias; merger RMSNorm + 2-layer MLP."""
    w, f, depth, p, tp, m, out = 1280, 3420, 32, 14, 2, 2, 2048
    block = w + (w * 3 * w + 3 * w) + (w * w + w) + w + 2 * (w * f + f) + (f * w + w)
    merged = m * m * w  # merge_size x merge_size patches are concatenated before the MLP
    merger = w + (merged * merged + merged) + (merged * out + out)
    want = 3 * tp * p * p * w + depth * block + merger
    assert want == 668_684_288
    model = meta_model(AudioLMConfig.from_preset("paper-dense", num_layers=1))
    assert parameter_breakdown(model)["vision"] == want
    assert model.vision.num_tokens(8, 224, 224) == 4 * 8 * 8  # 8 frames at 224 px -> 256 tokens
