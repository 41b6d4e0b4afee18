"""Ablations of the Conv-FFT block: ``us_sfnet[_tiny]_nofreq``, ``_nospatial`` and ``_nofft`` (one model class,
:class:`~ussf_lib.models.USSFNet`, with ``branches`` / ``freq_transform``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ussf_lib import cli
from ussf_lib.errors import UserError
from ussf_lib.evaluation.report import beside_the_paper, results_table
from ussf_lib.models import (
    ABLATIONS,
    MODEL_REGISTRY,
    ConvFFTBlock,
    FrequencyBranch,
    SpatialBranch,
    USSFNet,
    build_model,
    check_image_size,
    get_spec,
    list_models,
)
from ussf_lib.models.complexity import count_macs, count_parameters, mac_breakdown
from ussf_lib.models.conv_fft import width_interleave, width_polyphase
from ussf_lib.paper import PAPER_ARCHITECTURE, PAPER_CLASSES

PARENTS = ("us_sfnet", "us_sfnet_tiny")
SUFFIXES = ("nofreq", "nospatial", "nofft")
ABLATION_NAMES = [f"{p}_{s}" for p in PARENTS for s in SUFFIXES]
TINY_ABLATIONS = [f"us_sfnet_tiny_{s}" for s in SUFFIXES]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, num_classes: int = 4, **kwargs) -> USSFNet:
    torch.manual_seed(0)
    return build_model(name, num_classes, image_size=32, **kwargs)


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode checks see every term."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def blocks(model: nn.Module) -> list[ConvFFTBlock]:
    found = [m for m in model.modules() if isinstance(m, ConvFFTBlock)]
    assert len(found) == sum(model.depths)
    return found


def _no_fft(*args, **kwargs):
    raise AssertionError("a Fourier transform ran")


# --- registry ---------------------------------------------------------------------------------------

def test_the_six_ablations_are_registered_after_the_papers_models(capsys):
    names = list_models()
    assert names[:2] == list(PARENTS) and names[-6:] == ABLATION_NAMES and len(names) == 14 + 6
    assert set(ABLATIONS) == set(SUFFIXES)
    for name in ABLATION_NAMES:
        spec, parent = get_spec(name), get_spec(name.rsplit("_", 1)[0])
        assert spec.ablation_of == parent.name and spec.head == parent.head
        assert (spec.min_image_size, spec.size_multiple) == (parent.min_image_size, parent.size_multiple)
        assert "ablation" in spec.description
    assert all(MODEL_REGISTRY[p].ablation_of is None for p in PARENTS)
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out.split()[-6:] == ABLATION_NAMES


@pytest.mark.parametrize("name", ABLATION_NAMES)
def test_image_sizes_are_checked_as_for_the_parent(name):
    parent = get_spec(name).ablation_of
    for size in (14, 15, 16, 33, 224):
        outcomes = []
        for model in (parent, name):
            try:
                check_image_size(model, size)
                outcomes.append("ok")
            except UserError:
                outcomes.append("refused")
        assert outcomes[0] == outcomes[1], size
    with pytest.raises(UserError, match="too small"):
        build_model(name, 4, image_size=14)


def test_an_ablation_keeps_its_defining_arguments():
    with pytest.raises(UserError, match="us_sfnet_tiny_nofreq fixes branches"):
        build_model("us_sfnet_tiny_nofreq", 4, branches=("spatial", "freq"))
    with pytest.raises(UserError, match="fixes freq_transform"):
        build_model("us_sfnet_nofft", 4, freq_transform="rfft2")
    model = build_model("us_sfnet_tiny_nofft", 3, fft_norm="backward", head_norm=True)  # other arguments pass
    assert model.freq_transform == "polyphase" and model.num_classes == 3


def test_invalid_branches_or_transform_are_user_errors():
    for bad in ((), ("fourier",), ("spatial", "spatial")):
        with pytest.raises(UserError, match="branches"):
            ConvFFTBlock(8, branches=bad)
    with pytest.raises(UserError, match="freq_transform"):
        ConvFFTBlock(8, freq_transform="dct")
    with pytest.raises(UserError, match="freq_transform"):
        ConvFFTBlock(8, branches=("spatial",), freq_transform="dct")  # checked even where unused
    assert ConvFFTBlock(8, branches=("freq", "spatial")).branches == ("spatial", "freq")  # the paper's order


# --- structure --------------------------------------------------------------------------------------

@pytest.mark.parametrize("parent", PARENTS)
def test_every_block_has_exactly_the_ablations_branches(parent):
    torch.manual_seed(0)
    expected = {"": ("spatial", "freq", "rfft2"), "_nofreq": ("spatial", None, None),
                "_nospatial": (None, "freq", "rfft2"), "_nofft": ("spatial", "freq", "polyphase")}
    for suffix, (spatial, freq, transform) in expected.items():
        model = build_model(parent + suffix, 4, image_size=224)
        assert model.branches == tuple(b for b in (spatial, freq) if b)
        for block in blocks(model):
            assert isinstance(block.spatial, SpatialBranch) if spatial else block.spatial is None
            assert isinstance(block.freq, FrequencyBranch) if freq else block.freq is None
            if freq:
                assert block.freq.transform == transform
        kinds = {type(m) for m in model.modules()}
        assert (SpatialBranch in kinds) == bool(spatial) and (FrequencyBranch in kinds) == bool(freq)
        keys = model.state_dict().keys()
        assert any(".spatial." in k for k in keys) == bool(spatial)
        assert any(".freq." in k for k in keys) == bool(freq)


@pytest.mark.parametrize("parent", PARENTS)
def test_nofft_has_the_parents_parameters_exactly(parent):
    torch.manual_seed(0)
    full = build_model(parent, 4, image_size=224)
    nofft = build_model(f"{parent}_nofft", 4, image_size=224)
    assert count_parameters(nofft) == count_parameters(full)
    assert count_parameters(nofft, trainable_only=False) == count_parameters(full, trainable_only=False)
    own, theirs = nofft.state_dict(), full.state_dict()
    assert list(own) == list(theirs) and all(own[k].shape == theirs[k].shape for k in own)
    nofft.load_state_dict(theirs)  # the same convolutions: the parent's weights fit as they are
    # The branch ablations split the parent's block parameters between them; stem, transitions and head are shared.
    outside = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("stages."))
    parts = [count_parameters(build_model(f"{parent}_{s}", 4)) for s in ("nofreq", "nospatial")]
    assert sum(parts) == count_parameters(full) + outside


@pytest.mark.parametrize(("parent", "sizes"), [("us_sfnet", [32, (24, 19)]), ("us_sfnet_tiny", [32, 33, (40, 27), 64])])
def test_nofft_macs_are_the_parents_less_its_ffts(parent, sizes):
    """The convolutions see a tensor of exactly the half spectrum's shape, so their MACs are the parent's at
    every size, odd widths included; the total differs by the FFTs' analytic estimate alone (USSFNet's docstring)."""
    full, nofft = build(parent), build(f"{parent}_nofft")
    for size in sizes:
        ours, theirs = mac_breakdown(nofft, size), mac_breakdown(full, size)
        ffts = theirs.pop("_fft_r2c") + theirs.pop("_fft_c2r")
        assert ffts > 0 and ours == theirs, size
        assert count_macs(nofft, size) == count_macs(full, size) - ffts


def test_nofft_runs_no_fourier_transform(monkeypatch):
    for name in ("rfft2", "irfft2", "fft2", "ifft2", "rfft", "irfft", "fftn", "rfftn", "irfftn"):
        monkeypatch.setattr(torch.fft, name, _no_fft)
    x = torch.randn(2, 3, 33, 32)
    for name in ("us_sfnet_tiny_nofft", "us_sfnet_tiny_nofreq"):
        model = build(name)
        F.cross_entropy(model(x), torch.tensor([0, 1])).backward()  # forward and backward, in train mode
        assert all(p.grad is not None for p in model.parameters())
    for name in ("us_sfnet_tiny", "us_sfnet_tiny_nospatial"):  # the patch does catch the Fourier branches
        with pytest.raises(AssertionError, match="a Fourier transform ran"):
            build(name)(x)
    monkeypatch.undo()
    assert not any(k.startswith("_fft") for k in mac_breakdown(build("us_sfnet_nofft"), 32))


# --- what the blocks compute ------------------------------------------------------------------------

@pytest.mark.parametrize("width", [12, 11, 1, 2])
def test_width_polyphase_is_a_lossless_half_spectrum_shaped_rearrangement(width):
    x = torch.randn(2, 3, 5, width)
    stacked = width_polyphase(x)
    assert stacked.shape == (2, 6, 5, width // 2 + 1)
    assert stacked.shape[-2:] == torch.fft.rfft2(x).shape[-2:]  # the half spectrum's shape
    assert torch.equal(stacked[:, :3, :, : (width + 1) // 2], x[..., 0::2])  # [even | odd] as [real | imag]
    assert torch.equal(stacked[:, 3:, :, : width // 2], x[..., 1::2])
    assert torch.equal(width_interleave(stacked, width), x)


def test_nofreq_block_is_gelu_of_identity_plus_spatial():
    torch.manual_seed(0)
    block = ConvFFTBlock(8, branches=("spatial",)).eval()
    randomize_norms(block)
    x = torch.randn(2, 8, 15, 12)
    with torch.no_grad():
        spatial = block.spatial(x)
        assert not torch.allclose(spatial, torch.zeros_like(x))
        torch.testing.assert_close(block(x), F.gelu(x + spatial), rtol=0, atol=0)
    # The same in the registered model's blocks, and the paper's block with its frequency branch removed agrees.
    model = build("us_sfnet_tiny_nofreq").eval()
    randomize_norms(model)
    paper_block = ConvFFTBlock(model.widths[0]).eval()
    paper_block.spatial.load_state_dict(model.stages[0][0].spatial.state_dict())
    x = torch.randn(2, model.widths[0], 9, 10)
    with torch.no_grad():
        expected = F.gelu(x + paper_block.spatial(x))
        torch.testing.assert_close(model.stages[0][0](x), expected, rtol=0, atol=0)


def test_nospatial_block_is_gelu_of_identity_plus_freq():
    torch.manual_seed(0)
    block = ConvFFTBlock(8, branches=("freq",)).eval()
    randomize_norms(block)
    x = torch.randn(2, 8, 15, 12)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.gelu(x + block.freq(x)), rtol=0, atol=0)


@pytest.mark.parametrize("hw", [(16, 16), (15, 9), (8, 7)])
def test_nofft_branch_is_the_same_convolutions_on_even_and_odd_columns(hw):
    """Value and gradient: polyphase -> the parent branch's convs -> interleave, against the parent's branch
    with the same weights (which differs: the transform is the only thing that changed)."""
    torch.manual_seed(0)
    fourier = FrequencyBranch(6)
    randomize_norms(fourier)
    branch = FrequencyBranch(6, transform="polyphase")
    branch.load_state_dict(fourier.state_dict())
    fourier.eval(), branch.eval()
    x = torch.randn(3, 6, *hw, requires_grad=True)
    out = branch(x)
    expected = width_interleave(fourier.convs(width_polyphase(x)), hw[1])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, fourier(x), atol=1e-3)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    block = ConvFFTBlock(6, freq_transform="polyphase").eval()
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.gelu(x + block.spatial(x) + block.freq(x)), rtol=0, atol=0)


def test_nofft_branch_follows_autocast_and_memory_format_as_the_fft_branch():
    torch.manual_seed(0)
    model = build("us_sfnet_tiny_nofft").eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 33, 33)
    with torch.no_grad():
        reference = model(x)
        conv_dtypes = set()
        for m in model.modules():
            if isinstance(m, FrequencyBranch):
                m.convs[0][0].register_forward_hook(lambda mod, inp, out: conv_dtypes.add(out.dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        assert conv_dtypes == {torch.bfloat16} and torch.allclose(low.float(), reference, atol=0.1)
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.to(memory_format=torch.channels_last)), reference, atol=1e-5, rtol=1e-4)
        block = model.stages[0][0]
        y = torch.randn(2, model.widths[0], 9, 7).to(memory_format=torch.channels_last)
        assert block.freq(y).is_contiguous(memory_format=torch.channels_last)
        assert model.double()(x.double()).dtype == torch.float64


# --- shapes, gradients, compile ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ABLATION_NAMES)
def test_forward_shapes(name):
    model = build(name, num_classes=3).eval()
    sizes = [(32, 32), (33, 33), (15, 15), (40, 27)] if name.startswith("us_sfnet_tiny") else [(32, 32)]
    with torch.no_grad():
        for hw in sizes:
            assert model(torch.randn(2, 3, *hw)).shape == (2, 3)
        assert model.stage_shapes(32) == build(get_spec(name).ablation_of).stage_shapes(32)


@pytest.mark.parametrize("name", TINY_ABLATIONS)
def test_gradients_reach_every_parameter_and_a_step_trains(name):
    model = build(name, drop_block_p=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    for block in blocks(model):
        for branch in (block.spatial, block.freq):
            if branch is not None:
                assert sum(float(p.grad.abs().sum()) for p in branch.parameters()) > 0
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("name", TINY_ABLATIONS)
def test_torch_compile_traces_without_graph_breaks(name):
    torch._dynamo.reset()
    model = build(name)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    torch._dynamo.reset()


# --- an ablation is not the paper's model -----------------------------------------------------------

def test_paper_figures_are_shown_beside_the_papers_architecture_only():
    us_sfnets = {n for n, s in MODEL_REGISTRY.items() if n.startswith("us_sfnet") and s.ablation_of is None}
    assert set(PAPER_ARCHITECTURE) == us_sfnets == set(PARENTS)
    for name in PARENTS:
        assert beside_the_paper(name, PAPER_CLASSES)
    summary = {"accuracy": {"mean": 0.9, "std": 0.01}, "classes": list(PAPER_CLASSES)}
    assert "paper US-SFNet (%)" in results_table(summary, model="us_sfnet_tiny").columns
    for name in ABLATION_NAMES:
        assert not beside_the_paper(name, PAPER_CLASSES)
        assert "paper US-SFNet (%)" not in results_table(summary, model=name).columns
