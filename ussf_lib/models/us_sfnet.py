"""US-SFNet (paper section 2.2, Fig. 2): stem, four stages of Conv-FFT blocks, DropBlock, classification head.

Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ussf_lib.errors import UserError
from ussf_lib.models.conv_fft import BRANCHES, ActLayer, ConvFFTBlock, NormLayer, check_branches, conv_norm_act
from ussf_lib.models.dropblock import FittedDropBlock2d

#: Stage names, in order; :meth:`USSFNet.feature_maps` returns these keys after ``"stem"``.
STAGE_NAMES: tuple[str, ...] = ("stage1", "stage2", "stage3", "stage4")


def min_input_size() -> int:
    """Smallest square input US-SFNet accepts: the stride-2 stem and three 2x2 poolings must leave >= 1 pixel."""
    return 15  # stem: 15 -> 8; pools: 8 -> 4 -> 2 -> 1


class Transition(nn.Sequential):
    """Between stages: ``AvgPool2d(2, 2)`` -> point-wise conv (``in_ch -> out_ch``) -> norm (if any), no activation.

    The norm keeps the rule "every conv is followed by a norm"; no activation, because the next block adds
    this output to its branches and applies GELU to the sum (like ResNet's projection shortcut).
    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.
    """

    def __init__(self, in_ch: int, out_ch: int, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__(OrderedDict(
            pool=nn.AvgPool2d(kernel_size=2, stride=2),
            proj=conv_norm_act(in_ch, out_ch, 1, norm_layer=norm_layer, act_layer=None),
        ))


class USSFNet(nn.Module):
    """US-SFNet for ``num_classes``-way classification of ultrasound images.

    Introduced in ``notebooks/03_build_conv_fft_block.ipynb``.

    Layout (paper section 2.2): stem ``Conv3x3/2 -> BN -> GELU`` (3x224x224 -> 32x112x112); stages of
    ``depths`` = [3, 6, 3, 3] :class:`ConvFFTBlock` with ``widths`` = 32/64/128/256 channels; between two
    stages a :class:`Transition` (2x2 average pooling + point-wise conv doubling the channels); DropBlock
    after stage 2 and stage 3; head ``global average pool -> [LayerNorm] -> [Dropout] -> Linear``.

    Choices the paper leaves open, all constructor arguments (defaults in brackets):

    * ``fft_norm`` ["ortho"], ``spatial_expansion`` [1.0], ``freq_groups`` [1], ``norm_layer``
      [``nn.BatchNorm2d``], ``act_layer`` [``nn.GELU``], ``freq_autocast`` [True]: inside the block, see
      :class:`ConvFFTBlock`.
      ``norm_layer`` also sets the norm of the stem and of the transitions (BN after the point-wise conv).
    * ``drop_block_p`` [0.1] and ``drop_block_size`` [7]: DropBlock's own ImageNet setting (keep
      probability 0.9, block 7; Ghiasi et al., 2018), with a constant rate (no schedule). The block shrinks
      to the largest odd size that fits the feature map (after stages 2 and 3: 56x56 and 28x28 at 224 px
      keep 7; 8x8 and 4x4 at 32 px use 7 and 3), so small images work. ``drop_block_p=0`` turns it off.
    * ``head_norm`` [False] and ``head_dropout`` [0.0]: "a typical classification head" is read as ResNet's
      global average pooling followed by one linear layer; ``head_norm=True`` adds a LayerNorm before it
      (ConvNeXt's head) and ``head_dropout`` a dropout.

    Ablations, not the paper's model (every block alike; see :class:`ConvFFTBlock`):

    * ``branches`` [("spatial", "freq")]: ``("spatial",)`` drops every frequency branch (blocks
      ``GELU(x + spatial(x))``, registry ``*_nofreq``), ``("freq",)`` every spatial branch (blocks
      ``GELU(x + freq(x))``, ``*_nospatial``).
    * ``freq_transform`` ["rfft2"]: ``"polyphase"`` runs the frequency branches' convolutions on the even and
      odd columns of the feature map instead of its half spectrum (``*_nofft``; how and why in
      :class:`~ussf_lib.models.conv_fft.FrequencyBranch`). Only the two transforms change, so any difference
      in results is the Fourier domain's doing:

      - parameters: exactly the parent's (the same modules, parameter names and shapes: a parent's state
        dict loads into it), 22,761,572 for ``us_sfnet_nofft`` and 478,076 for ``us_sfnet_tiny_nofft``;
      - convolution MACs: exactly the parent's at every input size, because the convolutions get a tensor
        of exactly the half spectrum's shape ``2C x H x (W//2+1)`` (9,507,004,416 for ``us_sfnet`` at 224 px;
        18,227,200 for ``us_sfnet_tiny`` at 64 px);
      - total MACs (:func:`~ussf_lib.models.complexity.count_macs`): the parent's less its FFTs, i.e. less the
        ``_fft_r2c`` and ``_fft_c2r`` entries of :func:`~ussf_lib.models.complexity.mac_breakdown` (an
        analytic ``2.5 N log2 N`` estimate each); the padding, slicing and interleaving that replace them
        are copies, counted as 0 MACs, as norms and activations are. At 224 px ``us_sfnet`` counts
        9,593,062,104 and ``us_sfnet_nofft`` 9,507,005,440 (0.90 % fewer); at 64 px ``us_sfnet_tiny``
        18,637,056 and ``us_sfnet_tiny_nofft`` 18,227,456 (2.2 % fewer). ``tests/test_ablations.py`` checks
        these relations (not the figures) at several sizes.

      For scale: ``us_sfnet_nofreq`` has 3,063,140 parameters and 2.15 GMACs at 224 px, ``us_sfnet_nospatial``
      19,744,292 and 7.47 GMACs: the frequency branches hold most of the network.

    Convolutions use Kaiming-normal initialisation (fan-out, as torchvision's ResNet), norms weight 1 and
    bias 0. The network is fully convolutional: any input of at least 15x15 pixels works, odd sizes
    included. ``forward`` has no Python branching on values, so it compiles with ``torch.compile``.
    """

    def __init__(
        self,
        num_classes: int = 4,
        in_chans: int = 3,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (3, 6, 3, 3),
        *,
        fft_norm: str = "ortho",
        spatial_expansion: float = 1.0,
        freq_groups: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
        act_layer: ActLayer = nn.GELU,
        drop_block_p: float = 0.1,
        drop_block_size: int = 7,
        head_norm: bool = False,
        head_dropout: float = 0.0,
        freq_autocast: bool = True,
        branches: Sequence[str] = BRANCHES,
        freq_transform: str = "rfft2",
    ) -> None:
        super().__init__()
        widths, depths = tuple(widths), tuple(depths)
        if len(widths) != len(STAGE_NAMES) or len(depths) != len(STAGE_NAMES):
            raise UserError(f"widths={widths} and depths={depths} must each have 4 entries, one per stage")
        if min(widths) < 1 or min(depths) < 1:
            raise UserError(f"widths={widths} and depths={depths} must be positive; e.g. (32, 64, 128, 256), (3, 6, 3, 3)")
        if not 0.0 <= head_dropout < 1.0:
            raise UserError(f"head_dropout={head_dropout} is not a dropout rate; use a value in [0, 1)")
        self.num_classes = num_classes
        self.widths, self.depths = widths, depths
        self.branches, self.freq_transform = check_branches(branches), freq_transform

        self.stem = conv_norm_act(in_chans, widths[0], 3, stride=2, norm_layer=norm_layer, act_layer=nn.GELU)
        block_kwargs = dict(fft_norm=fft_norm, spatial_expansion=spatial_expansion, freq_groups=freq_groups,
                            norm_layer=norm_layer, act_layer=act_layer, freq_autocast=freq_autocast,
                            branches=self.branches, freq_transform=freq_transform)
        # Index i holds what runs before / inside / after stage i+1, so forward is one uniform loop.
        self.transitions = nn.ModuleList(
            [nn.Identity()] + [Transition(widths[i - 1], widths[i], norm_layer) for i in range(1, 4)]
        )
        self.stages = nn.ModuleList(
            nn.Sequential(*[ConvFFTBlock(w, **block_kwargs) for _ in range(d)]) for w, d in zip(widths, depths)
        )
        self.drop_blocks = nn.ModuleList(
            FittedDropBlock2d(drop_block_p, drop_block_size) if i in (1, 2) else nn.Identity() for i in range(4)
        )
        self.head = nn.Sequential(OrderedDict(
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1),
            norm=nn.LayerNorm(widths[-1]) if head_norm else nn.Identity(),
            drop=nn.Dropout(head_dropout) if head_dropout > 0 else nn.Identity(),
            fc=nn.Linear(widths[-1], num_classes),
        ))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_maps(self, x: Tensor) -> dict[str, Tensor]:
        """Outputs of the stem and of each stage (stages 2 and 3 after their DropBlock), keyed by name."""
        out = {"stem": self.stem(x)}
        x = out["stem"]
        for name, trans, stage, drop in zip(STAGE_NAMES, self.transitions, self.stages, self.drop_blocks):
            x = drop(stage(trans(x)))
            out[name] = x
        return out

    def forward_features(self, x: Tensor) -> Tensor:
        """The last stage's feature map, ``(B, widths[-1], H/16, W/16)`` roughly (floors at odd sizes)."""
        x = self.stem(x)
        for trans, stage, drop in zip(self.transitions, self.stages, self.drop_blocks):
            x = drop(stage(trans(x)))
        return x

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    @torch.no_grad()
    def stage_shapes(self, image_size: int | tuple[int, int], in_chans: int | None = None) -> dict[str, tuple[int, ...]]:
        """Shapes ``(C, H, W)`` of :meth:`feature_maps` for one image of ``image_size`` (runs a forward pass in eval mode)."""
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        c = in_chans if in_chans is not None else self.stem[0].in_channels
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            maps = self.feature_maps(torch.zeros(1, c, h, w, device=p.device, dtype=p.dtype))
        finally:
            self.train(was_training)
        return {k: tuple(v.shape[1:]) for k, v in maps.items()}
