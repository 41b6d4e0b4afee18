"""torch.compile scopes: each repeated block alone, or the whole model (ussf_lib.models.compiling)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ussf_lib import cli
from ussf_lib.errors import UserError
from ussf_lib.models import ConvFFTBlock, build_model
from ussf_lib.models.compiling import (
    COMPILE_MODES,
    COMPILE_SCOPES,
    RECOMPILE_LIMIT,
    compile_model,
    mark_batch_dynamic,
    repeated_blocks,
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # graph counts are per test
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(("name", "count", "kind"), [("us_sfnet", 3 + 6 + 3 + 3, "ConvFFTBlock"),
                                                     ("resnet101", 3 + 4 + 23 + 3, "Bottleneck"),
                                                     ("densenet121", 6 + 12 + 24 + 16, "_DenseLayer"),
                                                     ("convnext_base", 3 + 3 + 27 + 3, "CNBlock"),
                                                     ("swin_v2_s", 2 + 2 + 18 + 2, "SwinTransformerBlockV2"),
                                                     ("vit_b_16", 12, "EncoderBlock")])
def test_repeated_blocks_are_the_outermost_blocks(name, count, kind):
    blocks = repeated_blocks(build_model(name, 4, image_size=224))
    assert len(blocks) == count and {type(b).__name__ for b in blocks} == {kind}


def test_every_registered_model_has_blocks_to_compile_alone():
    from ussf_lib.models import list_models

    assert all(repeated_blocks(build_model(name, 4, image_size=224)) for name in list_models())


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_block_scope_compiles_each_block_in_place_and_matches_eager():
    torch.manual_seed(0)
    eager = build_model("us_sfnet_tiny", 4, image_size=32, drop_block_p=0.0)
    model = copy.deepcopy(eager)
    keys = list(model.state_dict())
    compiled, how = compile_model(model, backend="aot_eager", scope="blocks")
    assert compiled is model and list(model.state_dict()) == keys  # checkpoints load either way
    blocks = [m for m in model.modules() if isinstance(m, ConvFFTBlock)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    assert model.stem._compiled_call_impl is None  # the parts between the blocks stay eager
    assert f"{len(blocks)} ConvFFTBlock blocks" in how
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss, grads = _train_step(compiled, x, y)
    loss_ref, grads_ref = _train_step(eager, x, y)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    # One graph per distinct block shape (tiny US-SFNet: four stages of one width each), not one per block.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == len({b.freq.convs[0][0].in_channels for b in blocks})
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT


def test_model_scope_and_models_without_blocks_compile_whole():
    model = build_model("us_sfnet_tiny", 4, image_size=32)
    compiled, how = compile_model(model, backend="aot_eager", scope="model")
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is model
    assert "whole model" in how and all(b._compiled_call_impl is None for b in repeated_blocks(model))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    compiled, how = compile_model(plain, backend="aot_eager", scope="blocks")
    assert compiled._orig_mod is plain and "no repeated blocks" in how
    assert compiled(torch.randn(2, 3, 8, 8)).shape == (2, 2)


def test_bad_scope_or_mode_names_the_flag():
    with pytest.raises(UserError, match="--compile-scope layers: use one of blocks, model"):
        compile_model(nn.Linear(2, 2), scope="layers")
    with pytest.raises(UserError, match="--compile-mode fast"):
        compile_model(nn.Linear(2, 2), mode="fast")
    with pytest.raises(UserError, match="--compile-mode reduce-overhead"):  # CUDA graphs: not supported here
        compile_model(nn.Linear(2, 2), mode="reduce-overhead")


def test_cli_choices_are_the_library_ones():
    cv = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["cv"]._actions
              if a.dest == "compile_scope")
    bench = next(a for a in cli.build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                 if a.dest == "compile_mode")
    assert tuple(cv.choices) == COMPILE_SCOPES and tuple(bench.choices) == COMPILE_MODES


def test_cv_compile_flags_reach_the_training_settings(tmp_path):
    args = cli.build_parser().parse_args(["cv", "--data", str(tmp_path), "--compile", "--compile-scope", "blocks",
                                          "--compile-mode", "max-autotune-no-cudagraphs"])
    train = cli.cv_config_from_args(args, out=str(tmp_path / "run"), model="us_sfnet_tiny").train_config()
    assert (train.compile, train.compile_scope, train.compile_mode) == (True, "blocks", "max-autotune-no-cudagraphs")
    defaults = cli.build_parser().parse_args(["cv", "--data", str(tmp_path)])
    assert (defaults.compile, defaults.compile_scope, defaults.compile_mode) == (False, "model", "default")


def test_cli_refuses_an_unknown_scope_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--quick", "--compile", "--compile-scope", "layers"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile-scope" in err[0] and "blocks" in err[0]


@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU code generation needs a C++ compiler (g++)")
@pytest.mark.parametrize("scope", COMPILE_SCOPES)
def test_inductor_compile_matches_eager_on_the_same_batch(scope):
    """Inductor generates the fused kernels (C++ on CPU, Triton on CUDA) around torch's own FFTs; a training
    step of the compiled model must give eager's loss and gradients (about 45 s per scope on 2 cores).
    The batch is marked dynamic as the training loop marks it; at 16 images CPU convolution specializes it,
    which a strict mark would turn into an error."""
    torch.manual_seed(0)
    eager = build_model("us_sfnet_tiny", 4, image_size=32, drop_block_p=0.0)
    model, _ = compile_model(copy.deepcopy(eager), backend="inductor", scope=scope)
    x, y = mark_batch_dynamic(torch.randn(16, 3, 32, 32)), torch.arange(16) % 4
    loss, grads = _train_step(model, x, y)
    loss_ref, grads_ref = _train_step(eager, x, y)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-4, atol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4)
