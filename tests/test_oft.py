"""OFT core: orthogonality, identity at init, dense reference, merge, energy, COFT, state dicts."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from orthodiff.models.adapters import merge_adapter, unmerge_adapter
from orthodiff.oft import (
    DEFAULT_TARGETS,
    OFTConfig,
    OFTLinear,
    cayley,
    count_parameters,
    hyperspherical_energy,
    inject_oft,
    load_oft_state_dict,
    oft_layers,
    oft_state_dict,
    project_coft,
    project_generator,
    set_oft_enabled,
    skew_from_triangle,
)


def reference_rotation(generator: torch.Tensor, b: int, num_blocks: int) -> torch.Tensor:
    """Dense block-diagonal R written independently: Q from the triangle, R = (I+Q) inv(I-Q)."""
    blocks = []
    for i in range(num_blocks):
        g = generator[min(i, len(generator) - 1)].double()
        q = torch.zeros(b, b, dtype=torch.float64)
        k = 0
        for row in range(b):
            for col in range(row + 1, b):
                q[row, col], q[col, row] = g[k], -g[k]
                k += 1
        eye = torch.eye(b, dtype=torch.float64)
        blocks.append((eye + q) @ torch.linalg.inv(eye - q))
    return torch.block_diag(*blocks)


def randomize(model: nn.Module, scale: float = 0.1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in oft_layers(model):
            layer.oft_generator.copy_(torch.randn(layer.oft_generator.shape, generator=gen) * scale)


class Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


CONVS = {
    "3x3 pad 1": dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    "1x3": dict(in_channels=4, out_channels=5, kernel_size=(1, 3), padding=(0, 1)),
    "3x3 stride 2 dilation 2": dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=2, dilation=2),
    "1x1": dict(in_channels=8, out_channels=4, kernel_size=1),
}


def test_exact_cayley_is_orthogonal():
    q = skew_from_triangle(torch.randn(8, 16 * 15 // 2), 16)
    r = cayley(q)
    assert r.dtype == torch.float32
    assert (r.mT @ r - torch.eye(16)).abs().max() < 1e-5
    assert torch.equal(cayley(torch.zeros(3, 5, 5)), torch.eye(5).expand(3, 5, 5))


def test_neumann_approximates_the_same_rotation_not_its_transpose():
    q = skew_from_triangle(torch.randn(4, 32 * 31 // 2, dtype=torch.float64) * 0.01, 32)
    exact, approx = cayley(q), cayley(q, neumann_terms=5)
    err = (approx - exact).norm() / (exact - torch.eye(32)).norm()
    transposed = (approx - exact.mT).norm() / (exact - torch.eye(32)).norm()
    # Truncation error is O(||Q||^5) relative to the O(||Q||) adaptation.
    assert err < 1e-4, f"Neumann relative error {err:.2e}"
    assert transposed > 1.5, "Neumann path approximates R^T (PEFT's sign bug)"
    orth = (approx.mT @ approx - torch.eye(32)).abs().max()
    assert orth < 1e-4, f"Neumann orthogonality error {orth:.2e}"


@pytest.mark.parametrize("shape", list(CONVS))
def test_conv_identity_at_init_and_dense_reference(shape):
    conv = nn.Conv2d(**CONVS[shape])
    x = torch.randn(2, conv.in_channels, 9, 11)
    expected = conv(x)
    model = Wrap(conv)
    n = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    inject_oft(model, OFTConfig(block_size=n // 2 if n % 2 == 0 else n, targets=["layer"]))
    assert torch.equal(model(x), expected), "OFT conv must be the identity at zero init"

    randomize(model, 0.2)
    layer = model.layer
    dense = reference_rotation(layer.oft_generator.detach(), layer.block_size, layer.num_blocks)
    w = conv.weight.double().reshape(conv.out_channels, -1) @ dense
    ref = F.conv2d(x.double(), w.reshape(conv.weight.shape), conv.bias.double(), conv.stride, conv.padding,
                   conv.dilation)
    assert (model(x).double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("block_share", [False, True])
def test_linear_identity_dense_reference_and_merge(block_share):
    lin = nn.Linear(48, 20)
    x = torch.randn(3, 7, 48)
    expected = lin(x)
    model = Wrap(lin)
    assert inject_oft(model, OFTConfig(block_size=12, block_share=block_share, targets=["layer"])) == ["layer"]
    assert torch.equal(model(x), expected)
    assert count_parameters(model) == (1 if block_share else 4) * 12 * 11 // 2

    randomize(model, 0.3)
    layer = model.layer
    dense = reference_rotation(layer.oft_generator.detach(), 12, 4)
    ref = x.double() @ (lin.weight.double() @ dense).T + lin.bias.double()
    unmerged = model(x)
    assert (unmerged.double() - ref).abs().max() < 1e-5

    weight_before = lin.weight.clone()
    merge_adapter(model)
    assert (model(x) - unmerged).abs().max() < 1e-5
    unmerge_adapter(model)
    assert (lin.weight - weight_before).abs().max() < 1e-6
    assert (model(x) - unmerged).abs().max() < 1e-5


def test_conv_merge_equals_unmerged():
    model = Wrap(nn.Conv2d(3, 8, 3, padding=1))
    inject_oft(model, OFTConfig(num_blocks=3, targets=["layer"]))
    randomize(model, 0.3)
    x = torch.randn(2, 3, 8, 8)
    unmerged = model(x)
    merge_adapter(model)
    assert (model(x) - unmerged).abs().max() < 1e-5


def test_gram_matrix_and_energy_preserved_low_rank_is_not():
    lin = nn.Linear(64, 40)
    w = lin.weight.detach().clone()
    model = Wrap(lin)
    inject_oft(model, OFTConfig(block_size=16, targets=["layer"]))
    randomize(model, 0.5)
    merge_adapter(model)
    w_oft = lin.weight.detach()
    assert (w_oft - w).abs().max() > 1e-2, "the adaptation must actually change W"
    assert (w_oft @ w_oft.T - w @ w.T).abs().max() < 1e-5
    he, he_oft = hyperspherical_energy(w), hyperspherical_energy(w_oft)
    assert abs(he_oft - he) / he < 1e-5

    low_rank = w + 0.5 * torch.randn(40, 2) @ torch.randn(2, 64) / 8
    assert abs(hyperspherical_energy(low_rank) - he) / he > 1e-3


def test_hyperspherical_energy_matches_direct_sum():
    w = torch.randn(5, 7, dtype=torch.float64)
    unit = w / w.norm(dim=1, keepdim=True)
    direct = sum(1 / (unit[i] - unit[j]).norm() for i in range(5) for j in range(5) if i != j)
    assert abs(hyperspherical_energy(w) - direct) < 1e-9


def test_gradcheck_float64():
    model = Wrap(nn.Linear(12, 5))
    inject_oft(model, OFTConfig(block_size=4, targets=["layer"]))
    model.double()
    randomize(model, 0.2)
    layer = model.layer
    for rows in (3, 9):  # fewer / more rows than output features: input- and weight-rotating forward
        x = torch.randn(rows, 12, dtype=torch.float64, requires_grad=True)
        generator = layer.oft_generator.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda g, x: _forward_with(layer, g, x), (generator, x))

    conv_model = Wrap(nn.Conv2d(2, 3, 3, padding=1))
    inject_oft(conv_model, OFTConfig(block_size=6, targets=["layer"]))
    conv_model.double()
    randomize(conv_model, 0.2)
    conv = conv_model.layer
    xc = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    generator = conv.oft_generator.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda g, x: _forward_with(conv, g, x), (generator, xc))


def _forward_with(layer, generator, x):
    original = layer.oft_generator
    del layer.oft_generator
    layer.oft_generator = generator
    try:
        return layer(x)
    finally:
        del layer.oft_generator
        layer.oft_generator = original


@pytest.mark.parametrize("cayley_mode", ["exact", "neumann"])
def test_coft_bound_holds_after_100_steps_at_large_lr(cayley_mode):
    torch.manual_seed(0)
    eps = 1e-3
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8))
    inject_oft(model, OFTConfig(block_size=8, coft=True, eps=eps, cayley=cayley_mode, targets=["0", "2"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    x, y = torch.randn(64, 32), torch.randn(64, 8)
    worst = 0.0
    for _ in range(100):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        project_coft(model)
        for layer in oft_layers(model):
            q = skew_from_triangle(layer.oft_generator.detach().double(), 8)
            exact_distance = (cayley(q) - torch.eye(8, dtype=torch.float64)).norm(dim=(-2, -1))
            float32_distance = (layer.rotation() - torch.eye(8)).norm(dim=(-2, -1))
            worst = max(worst, exact_distance.max().item(), float32_distance.max().item())
    assert worst <= eps, f"max ||R_i - I||_F = {worst:.9g} > eps = {eps}"
    assert worst > 0.9 * eps, "a large learning rate should push blocks to the boundary"


@pytest.mark.parametrize("eps", [1e-3, 0.2, 1.0, 3.0])
def test_rotation_projection_lands_on_the_boundary_along_the_generators_direction(eps):
    """eps in the rotation convention (||R_i - I||_F <= eps, the projection method=coft_rotation uses).
    Blocks outside the ball end exactly on it (float64 Cayley, to 1e-9), scaled along their own
    direction; blocks inside stay untouched. Large eps makes the distance far from linear in Q."""
    torch.manual_seed(0)
    b = 8
    generator = torch.randn(12, b * (b - 1) // 2, dtype=torch.float64) * torch.logspace(-5, 1, 12).unsqueeze(-1)
    original = generator.clone()
    projected = project_generator(generator, b, eps)
    assert torch.equal(generator, original)  # a new tensor: the caller's is not written
    eye = torch.eye(b, dtype=torch.float64)
    before = (cayley(skew_from_triangle(generator, b)) - eye).norm(dim=(-2, -1))
    after = (cayley(skew_from_triangle(projected, b)) - eye).norm(dim=(-2, -1))
    bound = eps * (1 - 1e-5)
    outside = before > bound
    assert outside.any() and (~outside).any()
    torch.testing.assert_close(after[outside], torch.full_like(after[outside], bound), rtol=1e-9, atol=0)
    assert (after <= bound * (1 + 1e-12)).all()
    torch.testing.assert_close(projected[~outside], generator[~outside], rtol=0, atol=0)
    scale = projected[outside].norm(dim=-1) / generator[outside].norm(dim=-1)
    torch.testing.assert_close(projected[outside], generator[outside] * scale.unsqueeze(-1))


def paper_project(blocks: torch.Tensor, eps: float, shared: bool) -> torch.Tensor:
    """The OFT paper code's COFT projection, re-stated on full (r, b, b) generators: each
    block S_i with ||S_i||_F > eps * b^2 / sqrt(r) (eps * b^2 when shared) is moved onto that
    sphere along its own direction; blocks inside are left alone."""
    r, b, _ = blocks.shape
    radius = eps * b * b if shared else eps * b * b / torch.sqrt(torch.tensor(float(r)))
    norms = torch.norm(blocks, dim=(1, 2), keepdim=True)
    return torch.where(norms <= radius, blocks, radius * blocks / norms)


@pytest.mark.parametrize("block_share", [False, True])
def test_paper_coft_projects_as_the_paper_code_does(block_share):
    torch.manual_seed(0)
    eps, b, r = 1e-3, 16, 4  # radius 0.128 (r blocks) or 0.256 (shared) on the full generator
    model = Wrap(nn.Linear(b * r, 8))
    inject_oft(model, OFTConfig(block_size=b, coft=True, eps=eps, coft_norm="paper", block_share=block_share,
                                targets=["layer"]))
    layer = model.layer
    radius = eps * b * b * (1 if block_share else r**-0.5)
    assert layer.paper_radius == pytest.approx(radius)
    # Some blocks inside the ball, some outside (the stored triangle holds 1/sqrt(2) of ||Q||_F).
    scales = torch.tensor([1.5] if block_share else [0.3, 0.9, 1.5, 4.0])[:, None]
    direction = torch.randn_like(layer.oft_generator)
    layer.oft_generator.data = direction / (direction.norm(dim=1, keepdim=True) * 2**0.5) * radius * scales
    full = skew_from_triangle(layer.oft_generator.detach().double(), b)
    expected = paper_project(full, eps, block_share)
    project_coft(model)
    projected = skew_from_triangle(layer.oft_generator.detach().double(), b)
    torch.testing.assert_close(projected, expected, atol=1e-7, rtol=1e-6)
    norms = projected.norm(dim=(1, 2))
    outside = scales.squeeze(1) > 1
    assert torch.allclose(norms[outside], torch.full_like(norms[outside], radius), rtol=1e-6)
    torch.testing.assert_close(projected[~outside], full[~outside])  # inside: untouched
    assert OFTConfig(coft=True).coft_norm == "rotation"  # the default stays this project's exact bound
    with pytest.raises(ValueError, match="coft_norm='generator'"):
        OFTConfig(coft=True, coft_norm="generator")


def test_project_coft_is_noop_for_plain_oft():
    model = Wrap(nn.Linear(16, 4))
    inject_oft(model, OFTConfig(block_size=4, eps=1e-6, targets=["layer"]))
    randomize(model, 1.0)
    before = model.layer.oft_generator.detach().clone()
    project_coft(model)
    assert torch.equal(model.layer.oft_generator, before)


def test_switching_to_neumann_keeps_outputs():
    model = Wrap(nn.Linear(64, 16))
    inject_oft(model, OFTConfig(block_size=16, targets=["layer"]))
    randomize(model, 0.01)
    x = torch.randn(10, 64)
    base = model.layer.base_layer(x)
    exact = model(x)
    model.layer.neumann_terms = 5
    neumann = model(x)
    assert (neumann - exact).norm() < 1e-3 * (exact - base).norm()


def test_dropout_acts_in_train_mode_only():
    torch.manual_seed(0)
    model = Wrap(nn.Linear(64, 16))
    inject_oft(model, OFTConfig(block_size=8, dropout=0.9, targets=["layer"]))
    randomize(model, 0.5)
    x = torch.randn(10, 64)
    model.eval()
    eval_out = model(x)
    assert torch.equal(eval_out, model(x))
    model.train()
    train_outs = [model(x) for _ in range(5)]
    assert all((t - eval_out).abs().max() > 1e-3 for t in train_outs)
    assert (train_outs[0] - train_outs[1]).abs().max() > 1e-3, "dropout masks must be resampled"


def test_disable_and_autocast_keep_float32_rotation():
    model = Wrap(nn.Linear(32, 8))
    inject_oft(model, OFTConfig(block_size=8, targets=["layer"]))
    randomize(model, 0.3)
    x = torch.randn(4, 32)
    set_oft_enabled(model, False)
    assert torch.equal(model(x), model.layer.base_layer(x))
    set_oft_enabled(model, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = model.layer.rotation()
        out = model(x)
    assert r.dtype == torch.float32
    assert (r.mT @ r - torch.eye(8)).abs().max() < 1e-5
    assert (out.float() - model(x)).abs().max() < 0.05


def test_inject_freezes_everything_else_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    inject_oft(model, OFTConfig(block_size=4, targets=["0", "2"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.oft_generator", "2.oft_generator"}
    randomize(model, 0.2)
    state = oft_state_dict(model)
    assert set(state) == trainable

    fresh = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    fresh.load_state_dict({k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "oft_" not in k})
    inject_oft(fresh, OFTConfig(block_size=4, targets=["0", "2"]))
    load_oft_state_dict(fresh, state)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))

    with pytest.raises(KeyError, match="2.oft_generator"):
        load_oft_state_dict(fresh, {"0.oft_generator": state["0.oft_generator"]})
    with pytest.raises(ValueError, match="0.oft_generator"):
        load_oft_state_dict(fresh, {**state, "0.oft_generator": torch.zeros(2, 3)})
    with pytest.raises(KeyError, match="9.oft_generator"):
        load_oft_state_dict(fresh, {**state, "9.oft_generator": torch.zeros(1)})


def test_bad_inputs_give_clear_errors():
    model = nn.Sequential(nn.Linear(30, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"0.*valid block sizes: \[1, 2, 3, 5, 6, 10, 15, 30\]"):
        inject_oft(model, OFTConfig(block_size=4, targets=["0"]))
    with pytest.raises(ValueError, match=r"'to_qq'.*similar.*to_q"):
        inject_oft(nn.ModuleDict({"to_q": nn.Linear(4, 4)}), OFTConfig(block_size=2, targets=["to_qq"]))
    with pytest.raises(TypeError, match="LayerNorm"):
        inject_oft(model, OFTConfig(block_size=2, targets=["1"]))
    assert isinstance(model[0], nn.Linear), "a failed injection must leave the model unchanged"
    with pytest.raises(ValueError, match="not both"):
        OFTConfig(block_size=2, num_blocks=2)


def test_target_matching_follows_peft_convention():
    model = nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(4, 4), "xto_q": nn.Linear(4, 4)})})
    assert inject_oft(model, OFTConfig(block_size=2, targets=["to_q"])) == ["attn.to_q"]
    model = nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(4, 4), "to_k": nn.Linear(4, 4)})})
    assert inject_oft(model, OFTConfig(block_size=2, targets=["re:attn\\.to_[qk]"])) == ["attn.to_q", "attn.to_k"]


SD15_FREE_PARAMETERS = {2: 26.35e6, 4: 13.14e6, 8: 6.54e6, 16: 3.24e6}  # BRIEF.md, independent count


@pytest.mark.parametrize("r", [2, 4, 8, 16])
def test_sd15_target_count_and_free_parameters(r):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)  # diffusers' defaults are SD 1.5's UNet
    names = inject_oft(unet, OFTConfig(num_blocks=r))
    assert len(names) == 144
    free = count_parameters(unet)
    assert round(free / 1e6, 2) == SD15_FREE_PARAMETERS[r] / 1e6  # the brief's figures carry 2 decimals


def test_tiny_unet_inject_merge_and_conv_targets():
    from orthodiff.models.tiny_sd import build_unet

    torch.manual_seed(0)
    unet = build_unet(channels=(32, 64, 64), cross_attention_dim=32, attention_heads=2).eval()
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 7, 32)
    with torch.no_grad():
        base = unet(x, t, text).sample
    names = inject_oft(unet, OFTConfig(num_blocks=4, targets=[*DEFAULT_TARGETS, "conv1"]))
    assert sum(n.endswith("conv1") for n in names) > 0
    with torch.no_grad():
        assert torch.equal(unet(x, t, text).sample, base)
        randomize(unet, 0.05)
        adapted = unet(x, t, text).sample
        assert (adapted - base).abs().max() > 1e-3
        merge_adapter(unet)
        assert (unet(x, t, text).sample - adapted).abs().max() < 1e-4


def test_the_angle_budget_matches_the_briefs_scale_table():
    from orthodiff.oft.scale import plane_angle_budget

    # BRIEF, "What the miniature can and cannot say": about 4 / 7 degrees per plane on tiny SD's
    # b = 16 / 24 blocks, 39 / 91 / 141 on SD 1.5's b = 80 / 160 / 320, at eps 1e-3 (paper convention), r = 4.
    budgets = [plane_angle_budget(1e-3, b, 4) for b in (16, 24, 80, 160, 320)]
    assert budgets == pytest.approx([3.67, 6.73, 39.4, 90.7, 141.5], abs=0.05)
    assert plane_angle_budget(1e-3, 16, 4, block_share=True) > budgets[0]  # sharing drops the 1/sqrt(r)


def test_the_scale_matched_eps_gives_the_tiny_model_sd15s_median_budget():
    from omegaconf import OmegaConf

    from orthodiff.models.tiny_sd import build_unet
    from orthodiff.oft import DEFAULT_TARGETS
    from orthodiff.oft.scale import layer_widths, median_angle_budget, scale_matched_eps
    from orthodiff.reproduce.params import sd15_unet

    with torch.device("meta"):
        sd15, tiny = sd15_unet(), build_unet(latent_channels=8)  # tiny SD v3's architecture
    reference, widths = layer_widths(sd15, DEFAULT_TARGETS), layer_widths(tiny, DEFAULT_TARGETS)
    assert len(reference) == 144 and sorted(set(widths)) == [64, 96]
    eps = scale_matched_eps(widths, reference)
    assert median_angle_budget(eps, widths, 4) == pytest.approx(median_angle_budget(1e-3, reference, 4), rel=1e-5)
    assert median_angle_budget(1e-3, reference, 4) == pytest.approx(106.1, abs=0.1)  # SD 1.5's text inputs, b = 192
    assert 10 * 1e-3 < eps < 100 * 1e-3
    matched = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "method" / "coft_matched.yaml").adapter
    assert matched.eps == pytest.approx(eps, rel=0.02), "conf/method/coft_matched.yaml is out of step with the code"


def test_rotation_stats_read_the_radius_and_the_plane_angles():
    from orthodiff.oft.scale import rotation_stats

    # b = 4, r = 2, eps 0.2 (paper convention): radius 0.2 * 16 / sqrt(2) = 2.26 on ||Q_i||_F.
    layer = OFTLinear(nn.Linear(8, 3), OFTConfig(num_blocks=2, coft=True, eps=0.2, coft_norm="paper"))
    assert rotation_stats([layer]) == {"share on radius": 0.0, "median angle per plane (deg)": 0.0}
    q = math.tan(math.radians(20))  # block 0: planes (0, 1) and (2, 3), each turned by 40 degrees
    with torch.no_grad():
        layer.oft_generator[0] = torch.tensor([q, 0, 0, 0, 0, q])  # triangle order (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)
        layer.oft_generator[1] = torch.full((6,), 10.0)  # far outside: projected onto the radius
    layer.project()
    assert rotation_stats([layer])["share on radius"] == 0.5
    with torch.no_grad():
        layer.oft_generator[1] = layer.oft_generator[0]
    # Independent of the eigenvalues of Q: the angles of R's own eigenvalues e^(+-i theta).
    turned = torch.linalg.eigvals(layer.rotation().double()).angle().abs().rad2deg().flatten()  # R is float32
    assert turned.tolist() == pytest.approx([40.0] * 8, abs=1e-4)
    assert rotation_stats([layer])["median angle per plane (deg)"] == pytest.approx(40.0, abs=1e-4)  # float32 q


def test_a_cached_rotation_is_never_used_after_its_generator_changed():
    torch.manual_seed(0)
    layer = OFTLinear(nn.Linear(8, 4), OFTConfig(num_blocks=2, coft=True, eps=0.5, coft_norm="paper"))
    x = torch.randn(3, 8)

    def fresh(layer):  # the rotation computed anew, for comparison
        return layer._compute_rotation(False).detach()

    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    for change in ("optimizer step", "load_state_dict", "projection", "neumann"):
        with torch.no_grad():
            before = layer(x)
            assert layer.rotation() is layer.rotation()  # cached while nothing changes
            assert layer.rotated_weight() is layer.rotated_weight()
        if change == "optimizer step":
            layer(x).sum().backward()  # with a graph: no cache involved
            optimizer.step()
        elif change == "load_state_dict":
            layer.load_state_dict({**layer.state_dict(), "oft_generator": torch.randn_like(layer.oft_generator)})
        elif change == "projection":
            with torch.no_grad():
                layer.oft_generator.mul_(100)  # far outside the radius...
            layer.rotation()  # ...cached there...
            layer.project()  # ...and pulled back in place
        else:
            layer.neumann_terms = 5
        with torch.no_grad():
            assert torch.equal(layer.rotation(), fresh(layer)), change
            assert torch.equal(layer.rotated_weight(), layer._rotate_weight(layer.base_layer.weight, fresh(layer))), change
            assert not torch.allclose(layer(x), before), change
    reference = OFTLinear(layer.base_layer, OFTConfig(num_blocks=2, cayley="neumann"))
    reference.load_state_dict(layer.state_dict())
    with torch.no_grad():
        cached = layer(x)  # (W R) x with W R reused, against W (R x) computed anew with a graph
    torch.testing.assert_close(cached, reference(x), rtol=1e-6, atol=1e-6)
