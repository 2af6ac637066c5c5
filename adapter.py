"""
adapter.py — the 3D ViT-Adapter of 3DINO and the three segmentation heads built on a (frozen) 3DINO-ViT.

The ViT-Adapter (Chen et al. 2023) gives a plain ViT the multi-scale, local inductive bias a dense predictor
needs, without touching the pretrained weights: a small CNN (Spatial Prior Module, SPM) sees the raw volume at
1/2 ... 1/16 resolution; an *Injector* writes its multi-scale features into the ViT tokens before each group of
blocks, and an *Extractor* pulls the ViT's semantics back into the multi-scale tokens after it. Both are
multi-scale deformable attention (MSDA, Deformable DETR eq. 2), lifted to 3D by 3DINO (paper, "3D ViT-adapter"):
each query reads P = 4 trilinearly interpolated points per level and head at learned offsets. The result is a
four-level feature pyramid f1..f4 at 1/2, 1/4, 1/8, 1/16 that a UNet-like decoder turns into logits.

    SPM(x) -> c1 (1/2, kept as a volume), c = [c2 | c3 | c4] tokens (1/4, 1/8, 1/16) + level embeddings
    ViT tokens x (1/p) -> for each of the 4 block groups i:
        x <- x + gamma * MSDA(LN(x), values = LN(c))                       Injector   (queries: ViT grid)
        x <- ViT blocks of group i
        c <- c + MSDA(LN(c), values = LN(x));  c <- c + DropPath(ConvFFN(LN(c)))   Extractor (queries: SPM grids)
        (group 3 only: 2 extra extractors)
    f1 = c1 + up(c2) + x1,  f2 = c2 + x2,  f3 = c3 + x3,  f4 = c4 + x4    (x_i = group i's ViT output, resized)

Heads (`build_segmenter(head, vit, in_chans, num_classes)`; every one: (B, C, H, W, D) -> (B, K, H, W, D) and
exposes the backbone as `.vit` so a script can freeze it):
    "vit_adapter_unetr"  ViTAdapterUNETR — the paper's default: adapter pyramid + UNet decoder 256/128/64/32
    "unetr"              UNETR — four intermediate ViT layers + the UNETR decoder; the paper's "Random" baseline
    "linear"             LinearHead — last four layers' patch tokens, two 1x1 "linear" layers, trilinear upsampling

Multi-channel inputs (paper, "Multi-channel finetuning inputs"): the ViT is single-channel, so channels are
folded into the batch `(B, C, H, W, D) -> (B*C, 1, H, W, D)` and go through it independently; the adapter's
Injector/Extractor see the channel *average* of the ViT tokens (the injection is broadcast back to every
channel); the per-channel features are finally concatenated channel-major `(B, C*E, ...)` and projected back
to E (a 1x1 conv in the adapter, Linear + GELU in the UNETR/Linear heads).

Where this file deliberately differs from the reference:
  * MSDA sampling axis order: we sample each query at its own voxel; the reference anchors it at a
    cyclically permuted voxel. `reference_axis_order=True` reproduces the reference for comparison.
  * Norms: GroupNorm instead of SyncBatchNorm in the SPM and on the output levels (see `norm3d`).
  * C = 1: no channel-mixing layer (the reference keeps a randomly initialised C*E -> E projection even for one
    channel); `mix_single_channel=True` restores it.
  * Generalised what the reference hard-codes for ViT-L/16 at 112^3: block groups = depth/4, UNETR and
    Linear layer indices from the depth, any patch size, ViT outputs resized to each level's actual size,
    ConvFFN split by the actual level shapes, position embedding through the backbone's own interpolation.

Shapes follow model.py's legend: volumes (B, C, H, W, D); token grids flattened in C order over (h, w, d);
E the ViT width; p the patch size; Nc = sum of the three SPM token levels.

    python adapter.py      # parameter counts of the heads around vit_large at 112^3 (meta device, no memory)
"""
import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

from configurator import ConfigError
from model import CheckpointError, DropPath, ViT3D, load_checkpoint
from msda_triton import msda

# -----------------------------------------------------------------------------
# small helpers


def norm3d(channels: int) -> nn.Module:
    """The norm after the SPM's convs and on the four output levels. The reference uses SyncBatchNorm, which needs
    a process group and, at the paper's 2 volumes x 4 crops per GPU (our CPU runs: 1-2), estimates its statistics
    from very few, strongly correlated samples and then behaves differently in eval (running stats) than in
    training. GroupNorm normalises each sample on its own — identical in train and eval, fine at batch size 1,
    same parameter count as BatchNorm (a weight and a bias per channel). 32 groups (Wu & He's default) where the
    width allows; the SPM's 32-channel convs then normalise each channel alone (= InstanceNorm with affine)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def reference_points(shapes, device=None, dtype=torch.float32) -> torch.Tensor:
    """Voxel centres of one or more grids, normalised to [0, 1], in (h, w, d) order — the order of the volume
    axes, which is what msda() expects. Grid (H, W, D) contributes ((i+.5)/H, (j+.5)/W, (k+.5)/D) for every voxel,
    flattened in C order; the grids are concatenated. -> (1, sum H*W*D, 3).

    (The reference stores these as (w, h, d) and grid_sample then reads them as (d, w, h).)"""
    pts = []
    for H, W, D in shapes:
        axes = [(torch.arange(n, device=device, dtype=dtype) + 0.5) / n for n in (H, W, D)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (H, W, D, 3)
        pts.append(grid.reshape(-1, 3))  # (H, W, D, 3) -> (H*W*D, 3), C order over (h, w, d)
    return torch.cat(pts)[None]  # (1, sum H*W*D, 3)


def level_tensors(shapes, device=None):
    """spatial_shapes (L, 3) long and level_start_index (L,) long for a list of (H_l, W_l, D_l)."""
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


class ChannelMix(nn.Module):
    """Channel mixing of the paper: per-channel features `(B*C, E, h, w, d)` (channels folded into the batch) ->
    concatenated channel-major `(B, C*E, h, w, d)` (channel c occupies [c*E, (c+1)*E)) -> 1x1 projection to E,
    optionally followed by GELU (the paper's "linear layer ... and a GELU" for UNETR/Linear; the adapter's merge
    conv has no activation, as in the reference). A 1x1 conv on a volume is a Linear on its tokens.

    For C = 1 there is nothing to mix, and we skip the layer: the single-channel path is exactly the plain
    backbone's (no randomly initialised E -> E map that training must first undo). The reference keeps it;
    `mix_single_channel=True` does the same (e.g. to reproduce its two-layer "linear" decoder at C = 1)."""

    def __init__(self, in_chans: int, dim: int, act: bool, mix_single_channel: bool = False):
        super().__init__()
        self.in_chans = in_chans
        self.proj = nn.Conv3d(in_chans * dim, dim, 1) if (in_chans > 1 or mix_single_channel) else None
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        BC, E = x.shape[:2]
        x = x.reshape(BC // self.in_chans, self.in_chans * E, *x.shape[2:])  # (B*C, E, h,w,d) -> (B, C*E, h,w,d)
        return x if self.proj is None else self.act(self.proj(x))


# -----------------------------------------------------------------------------
# 3D multi-scale deformable attention (the module; the sampling itself is msda_triton.msda)


def octant_offsets(n_heads: int, n_levels: int, n_points: int) -> torch.Tensor:
    """Initial sampling offsets of paper Eq. 4, in voxels of each level, (nH, L, P, 3) in (h, w, d) order.

    Head m points to octant m: its sign vector is the binary expansion of m with bit 1 -> +1 and bit 0 -> -1,
    (m=0: (-,-,-), m=1: (-,-,+), m=2: (-,+,-), ..., m=7: (+,+,+)) — Eq. 4's order; point p sits at (p+1) times
    it (radii 1..P voxels along each axis), the same on every level. 2D Deformable DETR spreads the heads at
    equal angles instead; 3DINO fixes 8 heads so that they cover the 8 corners. With another head count the
    octants are cycled (head m -> octant m mod 8) and fewer than 8 heads leave octants uncovered."""
    m = torch.arange(n_heads) % 8
    signs = torch.stack([(m >> 2) & 1, (m >> 1) & 1, m & 1], dim=-1).float() * 2 - 1  # (nH, 3) in {-1, +1}
    radius = torch.arange(1, n_points + 1).float()  # point p -> p + 1
    return signs[:, None, None, :] * radius[None, None, :, None].expand(n_heads, n_levels, n_points, 1)


class MSDeformAttn3D(nn.Module):
    """query (B, Q, E), reference_points (B or 1, Q, 3) in [0,1] (h, w, d), value tokens (B, S, E) over L levels
    -> (B, Q, E). For head m, level l, point p:

        loc = ref + offset_{m,l,p}(query) / (H_l, W_l, D_l),     a = softmax over (l, p) of A_m(query)
        out = W_o concat_m  sum_{l,p} a_{m,l,p} * trilinear(W_v value, level l, loc)

    The value and output projections work at `ratio * E` channels (0.25 in 3DINO: 256 for ViT-L) split into the
    heads. Offsets are in voxels of each level, so "1" is one voxel at 1/4 and at 1/16 alike.

    reference_axis_order=True feeds the reference's convention: reference points and the offset
    normaliser in (w, h, d) order, which its grid_sample call then reads as (d, w, h). Our msda() reads (h, w, d),
    so we hand it the reverse of the reference's vector. Only for comparing with reference checkpoints: it anchors
    query (i, j, k) at (h=k, w=i, d=j) (scaled by the wrong axis lengths on non-cubic grids)."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int = 8, n_points: int = 4, ratio: float = 0.25,
                 backend=None, reference_axis_order: bool = False):
        super().__init__()
        value_dim = int(d_model * ratio)
        if value_dim % n_heads:
            raise ValueError(f"MSDA: value width {value_dim} (= {d_model} * {ratio}) is not divisible by "
                             f"{n_heads} heads")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.head_dim = value_dim // n_heads
        self.backend, self.reference_axis_order = backend, reference_axis_order
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 3)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, value_dim)
        self.output_proj = nn.Linear(value_dim, d_model)
        self.reset_parameters()

    def reset_parameters(self):
        # offsets start at the octant pattern for *every* query (weight 0, Eq. 4 in the bias); attention starts
        # uniform over the L*P points (weight and bias 0); projections Xavier — the reference's init.
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            bias = octant_offsets(self.n_heads, self.n_levels, self.n_points)  # (nH, L, P, 3)
            self.sampling_offsets.bias.copy_(bias.flatten().to(self.sampling_offsets.bias.device))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def offsets(self, query: torch.Tensor) -> torch.Tensor:
        """Sampling offsets in voxels of each level, (B, Q, nH, L, P, 3) in (h, w, d) order."""
        B, Q, _ = query.shape
        off = self.sampling_offsets(query)  # (B, Q, nH*L*P*3), head-major as the bias of octant_offsets
        return off.view(B, Q, self.n_heads, self.n_levels, self.n_points, 3)  # -> (B, Q, nH, L, P, 3)

    def sampling_locations(self, query, reference_points, spatial_shapes) -> torch.Tensor:
        """(B, Q, nH, L, P, 3) in [0, 1], (h, w, d) order — what msda() takes."""
        off = self.offsets(query).float()  # locations in fp32 even under autocast: 1/112 steps need the mantissa
        sizes = spatial_shapes.to(off.dtype)  # (L, 3) = (H_l, W_l, D_l)
        ref = reference_points[:, :, None, None, None, :]  # (B|1, Q, 3) -> (B|1, Q, 1, 1, 1, 3)
        if not self.reference_axis_order:
            return ref + off / sizes[None, None, None, :, None, :]
        whd = [1, 0, 2]  # the reference's (w, h, d) storage order
        loc_ref = ref[..., whd] + off / sizes[:, whd][None, None, None, :, None, :]
        return loc_ref.flip(-1)  # grid_sample reads the reference's vector as (d, w, h); msda() takes (h, w, d)

    def forward(self, query, reference_points, value, spatial_shapes, level_start_index):
        B, Q, _ = query.shape
        S = value.shape[1]
        v = self.value_proj(value).view(B, S, self.n_heads, self.head_dim)  # (B, S, ratio*E) -> (B, S, nH, Dh)
        loc = self.sampling_locations(query, reference_points, spatial_shapes)
        a = self.attention_weights(query).view(B, Q, self.n_heads, -1)  # (B, Q, nH*L*P) -> (B, Q, nH, L*P)
        a = a.softmax(-1).view(B, Q, self.n_heads, self.n_levels, self.n_points)  # softmax over L*P per head
        out = msda(v, spatial_shapes, level_start_index, loc, a, backend=self.backend)  # (B, Q, nH*Dh)
        return self.output_proj(out)


# -----------------------------------------------------------------------------
# adapter parts: Spatial Prior Module, Injector, ConvFFN, Extractor, one interaction


def _conv_norm_relu(cin, cout, stride):
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride, 1, bias=False), norm3d(cout), nn.ReLU(inplace=True))


class SpatialPriorModule(nn.Module):
    """A small CNN on the raw (multi-channel) volume: c1 at 1/2 (stem: one strided and two plain 3^3 convs — no
    max-pool, unlike the 2D adapter's 1/4 stem, because 3DINO needs 1/4, 1/8, 1/16 for the injector: 1/32 does not
    divide 112), then stride-2 convs to 1/4, 1/8, 1/16 at widths w, 2w, 4w, 4w; a 1x1 conv lifts each level to E."""

    def __init__(self, in_chans: int, inplanes: int, embed_dim: int):
        super().__init__()
        w = inplanes
        self.stem = nn.Sequential(_conv_norm_relu(in_chans, w, 2), _conv_norm_relu(w, w, 1), _conv_norm_relu(w, w, 1))
        self.conv2 = _conv_norm_relu(w, 2 * w, 2)
        self.conv3 = _conv_norm_relu(2 * w, 4 * w, 2)
        self.conv4 = _conv_norm_relu(4 * w, 4 * w, 2)
        self.fc1, self.fc2 = nn.Conv3d(w, embed_dim, 1), nn.Conv3d(2 * w, embed_dim, 1)
        self.fc3, self.fc4 = nn.Conv3d(4 * w, embed_dim, 1), nn.Conv3d(4 * w, embed_dim, 1)

    def forward(self, x):
        c1 = self.stem(x)  # (B, w, H/2, W/2, D/2)
        c2 = self.conv2(c1)  # 1/4
        c3 = self.conv3(c2)  # 1/8
        c4 = self.conv4(c3)  # 1/16
        return self.fc1(c1), self.fc2(c2), self.fc3(c3), self.fc4(c4)  # each (B, E, ...)


class Injector(nn.Module):
    """Spatial prior -> ViT: gamma * MSDA(LN(x), values = LN(c)) with queries on the ViT grid and the SPM's three
    token levels as values. Returns the increment (the caller adds it to every channel's tokens). gamma is a
    per-channel scale initialised at 1e-6 (3DINO; 2D ViT-Adapter: 0), so at init the pretrained ViT runs
    essentially undisturbed and the injection grows only as far as the loss asks."""

    def __init__(self, dim, n_levels, num_heads, n_points, deform_ratio, init_values, backend, reference_axis_order):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn3D(dim, n_levels, num_heads, n_points, deform_ratio, backend, reference_axis_order)
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, query, ref, feat, spatial_shapes, level_start_index):
        return self.gamma * self.attn(self.query_norm(query), ref, self.feat_norm(feat), spatial_shapes,
                                      level_start_index)


class ConvFFN(nn.Module):
    """Linear(E -> hidden) -> depth-wise 3^3 conv on each SPM level as a volume -> GELU -> Linear(hidden -> E).
    The token groups are split by the levels' actual shapes (the reference assumes their sizes are 64:8:1, true
    only when all three come from one input size divisible by 16 — the same here, but stated, not assumed)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, 1, 1, groups=hidden)  # one conv shared by the three levels
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, shapes):
        x = self.fc1(x)  # (B, Nc, hidden)
        B, _, Ch = x.shape
        parts = []
        for t, (h, w, d) in zip(x.split([h * w * d for h, w, d in shapes], dim=1), shapes):
            v = t.transpose(1, 2).reshape(B, Ch, h, w, d)  # (B, h*w*d, Ch) -> (B, Ch, h, w, d)
            parts.append(self.dwconv(v).flatten(2).transpose(1, 2))  # -> (B, h*w*d, Ch)
        return self.fc2(self.act(torch.cat(parts, dim=1)))


class Extractor(nn.Module):
    """ViT -> multi-scale tokens: c <- c + MSDA(LN(c), values = LN(x)) with queries on the three SPM grids and the
    ViT grid as the single value level; then c <- c + DropPath(ConvFFN(LN(c))). No gamma (as the reference)."""

    def __init__(self, dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path, backend, reference_axis_order):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim, eps=1e-6)
        self.feat_norm = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSDeformAttn3D(dim, 1, num_heads, n_points, deform_ratio, backend, reference_axis_order)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = ConvFFN(dim, int(dim * cffn_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, query, ref, feat, spatial_shapes, level_start_index, c_shapes):
        query = query + self.attn(self.query_norm(query), ref, self.feat_norm(feat), spatial_shapes, level_start_index)
        return query + self.drop_path(self.ffn(self.ffn_norm(query), c_shapes))


class InteractionBlock(nn.Module):
    """One injector -> (a group of ViT blocks, run by the adapter) -> one extractor (+ extras in the last group).
    The ViT blocks are not owned here: they stay in `vit.blocks`, so the backbone's keys and freezing are
    untouched."""

    def __init__(self, dim, num_heads, n_points, deform_ratio, cffn_ratio, init_values, drop_path, n_extra,
                 backend, reference_axis_order):
        super().__init__()
        self.injector = Injector(dim, 3, num_heads, n_points, deform_ratio, init_values, backend,
                                 reference_axis_order)
        ext = lambda: Extractor(dim, num_heads, n_points, deform_ratio, cffn_ratio, drop_path, backend,  # noqa: E731
                                reference_axis_order)
        self.extractor = ext()
        self.extra_extractors = nn.ModuleList(ext() for _ in range(n_extra))


# -----------------------------------------------------------------------------
# the adapter


def _init_adapter_weights(m):
    """Reference init of the adapter's own layers: Linear trunc-normal 0.02, norms 1/0, convs
    N(0, sqrt(2 / fan_out)) with fan_out = k^3 * out / groups, biases 0. MSDA modules are re-initialised after."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
        fan_out = math.prod(m.kernel_size) * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ViTAdapter(nn.Module):
    """3D ViT-Adapter around a single-channel `model.ViT3D`: (B, C, H, W, D) -> [f1, f2, f3, f4], each (B, E, ...)
    at 1/2, 1/4, 1/8, 1/16 of (H, W, D). H, W, D must be multiples of 16 and of the patch size.

    Interactions run over the backbone's four equal block groups (ViT-L: blocks 0-5, 6-11, 12-17, 18-23); the
    ViT's own blocks, position embedding and CLS token are used as they are (the backbone may be frozen; gradients
    still flow *through* it to earlier injectors). with_cp checkpoints each injector, block group and extractor
    (use_reentrant=False): activations are recomputed in backward — the reference checkpoints only the injector
    and extractor. ViTAdapterUNETR checkpoints its decoder stages under the same flag. At 112^3 with the ViT-L
    frozen, the decoder and the extractors keep most of the saved activations, the frozen blocks ~3% (fp32,
    docs/performance.md "Finetuning memory"): with_cp recomputes them in backward instead."""

    def __init__(self, vit: ViT3D, in_chans: int = 1, conv_inplane: int = 32, n_points: int = 4,
                 deform_num_heads: int = 8, init_values: float = 1e-6, cffn_ratio: float = 0.25,
                 deform_ratio: float = 0.25, n_extra_extractors: int = 2, drop_path_rate: float = 0.2,
                 with_cp: bool = False, msda_backend=None, reference_axis_order: bool = False,
                 mix_single_channel: bool = False):
        super().__init__()
        if vit.in_chans != 1:
            raise ValueError(f"ViTAdapter expects a single-channel ViT (3DINO's); got in_chans={vit.in_chans}. "
                             "Multi-channel data is handled by folding channels into the batch.")
        if vit.depth % 4:
            raise ValueError(f"ViTAdapter splits the ViT into 4 equal block groups; depth {vit.depth} is not "
                             "divisible by 4")
        self.vit, self.in_chans, self.with_cp = vit, in_chans, with_cp
        E, g = vit.embed_dim, vit.depth // 4
        self.interaction_indexes = [(i * g, (i + 1) * g) for i in range(4)]  # [start, end) of each block group
        self.level_embed = nn.Parameter(torch.zeros(3, E))  # one per injector value level (1/4, 1/8, 1/16)
        self.spm = SpatialPriorModule(in_chans, conv_inplane, E)
        self.interactions = nn.ModuleList(
            InteractionBlock(E, deform_num_heads, n_points, deform_ratio, cffn_ratio, init_values, drop_path_rate,
                             n_extra_extractors if i == 3 else 0, msda_backend, reference_axis_order)
            for i in range(4))
        self.up = nn.ConvTranspose3d(E, E, 2, 2)  # c2 (1/4) -> 1/2, added to c1
        self.norms = nn.ModuleList(norm3d(E) for _ in range(4))
        for part in (self.spm, self.interactions, self.up, self.norms):
            part.apply(_init_adapter_weights)
        for m in self.modules():
            if isinstance(m, MSDeformAttn3D):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)
        # created after the init above: the reference leaves its channel-merge convs at PyTorch's default init
        self.channel_mix = nn.ModuleList(ChannelMix(in_chans, E, act=False, mix_single_channel=mix_single_channel)
                                         for _ in range(4))

    # --- geometry ---------------------------------------------------------------

    def _check_input(self, x):
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise ValueError(f"ViTAdapter: expected (B, {self.in_chans}, H, W, D), got {tuple(x.shape)}")
        p = self.vit.patch_size
        if any(s % 16 or s % p for s in x.shape[2:]):
            raise ValueError(f"ViTAdapter: input size {tuple(x.shape[2:])} must be divisible by 16 (the SPM's 1/16 "
                             f"level) and by the patch size {p}; pad or crop it first")

    def deform_inputs(self, size, device=None):
        """Query reference points and value levels of the injector and of the extractor for an input size
        (H, W, D). The injector's queries are the ViT grid (1/p) and its values the SPM levels 1/4, 1/8, 1/16;
        the extractor's queries are those three SPM grids and its value the ViT grid."""
        p = self.vit.patch_size
        grid = tuple(s // p for s in size)
        c_shapes = [tuple(s // f for s in size) for f in (4, 8, 16)]
        inj = (reference_points([grid], device), *level_tensors(c_shapes, device))
        ext = (reference_points(c_shapes, device), *level_tensors([grid], device))
        return grid, c_shapes, inj, ext

    # --- forward ----------------------------------------------------------------

    def _cp(self, fn, *args):
        if self.with_cp and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _run_group(self, x, start, end):
        return self.vit._run_blocks(x, self.vit.blocks[start:end])  # honours vit.grad_checkpointing too

    def forward_interactions(self, x):
        """The SPM + the four interactions. Returns c1 (B, E, H/2, W/2, D/2), c (B, Nc, E) (the three SPM token
        levels after the extractors), the per-group ViT outputs [(B*C, E, h, w, d)] * 4 (channels still folded)
        and the geometry (grid, c_shapes)."""
        self._check_input(x)
        B, C, H, W, D = x.shape
        grid, c_shapes, inj, ext = self.deform_inputs((H, W, D), x.device)

        c1, c2, c3, c4 = self.spm(x)
        c = torch.cat([ci.flatten(2).transpose(1, 2) + self.level_embed[i]  # (B, E, h,w,d) -> (B, h*w*d, E)
                       for i, ci in enumerate((c2, c3, c4))], dim=1)  # (B, Nc, E)

        # ViT path: channels folded into the batch; the backbone's own token preparation, so the position
        # embedding is resized to (H/p, W/p, D/p) by vit.interpolate_pos_encoding — the same "+0.1" trilinear
        # recipe the ViT uses everywhere. (The reference adapter resizes from 7^3 with plain trilinear, size=grid;
        # both give the same numbers at the native grid, they differ slightly at other sizes.)
        t = self.vit.prepare_tokens_with_masks(x.reshape(B * C, 1, H, W, D))  # (B*C, 1 + N, E)
        cls, xt = t[:, :1], t[:, 1:]
        N, E = xt.shape[1:]

        outs = []
        for layer, (start, end) in zip(self.interactions, self.interaction_indexes):
            # injector: query = channel average of the ViT tokens, the increment broadcast to every channel
            x_avg = xt.view(B, C, N, E).mean(1)  # (B*C, N, E) -> (B, N, E)
            inc = self._cp(layer.injector, x_avg, inj[0], c, inj[1], inj[2])  # (B, N, E)
            xt = (xt.view(B, C, N, E) + inc[:, None]).view(B * C, N, E)
            # the ViT's block group, CLS token included
            t = self._cp(self._run_group, torch.cat([cls, xt], dim=1), start, end)  # (B*C, 1 + N, E)
            cls, xt = t[:, :1], t[:, 1:]
            # extractor(s): value = channel average of the ViT tokens
            x_avg = xt.view(B, C, N, E).mean(1)  # (B, N, E)
            for extractor in [layer.extractor, *layer.extra_extractors]:
                c = self._cp(extractor, c, ext[0], x_avg, ext[1], ext[2], c_shapes)
            outs.append(xt.transpose(1, 2).reshape(B * C, E, *grid))  # (B*C, N, E) -> (B*C, E, h, w, d)
        return c1, c, outs, (grid, c_shapes)

    def forward(self, x):
        B = x.shape[0]
        c1, c, outs, (grid, c_shapes) = self.forward_interactions(x)
        E = c.shape[-1]
        c2, c3, c4 = [t.transpose(1, 2).reshape(B, E, *s)  # (B, h*w*d, E) -> (B, E, h, w, d)
                      for t, s in zip(c.split([math.prod(s) for s in c_shapes], dim=1), c_shapes)]
        c1 = self.up(c2) + c1
        feats = []
        for ci, o, mix, norm in zip((c1, c2, c3, c4), outs, self.channel_mix, self.norms):
            o = mix(o)  # (B*C, E, h, w, d) -> (B, E, h, w, d)
            if o.shape[2:] != ci.shape[2:]:
                # the level's actual size, not the reference's fixed x8/x4/x2/x1 (which assume patch 16)
                o = F.interpolate(o, size=ci.shape[2:], mode="trilinear", align_corners=False)
            feats.append(norm(ci + o))
        return feats


# -----------------------------------------------------------------------------
# decoder blocks (UNETR-style, written from the UNETR paper's description: no MONAI)


def _up(cin, cout, factor):
    """x`factor` upsampling as a transposed conv with kernel = stride = factor; factor 1 -> a 1x1 conv."""
    if factor == 1:
        return nn.Conv3d(cin, cout, 1, bias=False)
    return nn.ConvTranspose3d(cin, cout, factor, factor, bias=False)


class ResBlock(nn.Module):
    """conv3 -> IN -> LeakyReLU(0.01) -> conv3 -> IN, + residual (1x1 conv + IN when the width changes),
    -> LeakyReLU. Convs without bias (the norm removes it), InstanceNorm without affine (MONAI's defaults,
    which the reference's UNETR blocks use)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1, self.norm1 = nn.Conv3d(cin, cout, 3, 1, 1, bias=False), nn.InstanceNorm3d(cout)
        self.conv2, self.norm2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False), nn.InstanceNorm3d(cout)
        self.skip = None if cin == cout else nn.Sequential(nn.Conv3d(cin, cout, 1, bias=False), nn.InstanceNorm3d(cout))
        self.act = nn.LeakyReLU(0.01)

    def forward(self, x):
        y = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return self.act(y + (x if self.skip is None else self.skip(x)))


class UpBlock(nn.Module):
    """Decoder stage: upsample (transposed conv) -> concatenate the skip -> ResBlock(2 * out -> out)."""

    def __init__(self, cin: int, cout: int, factor: int = 2):
        super().__init__()
        self.up = _up(cin, cout, factor)
        self.block = ResBlock(2 * cout, cout)

    def forward(self, x, skip):
        return self.block(torch.cat([self.up(x), skip], dim=1))  # (B, 2 out, ...)


class PrUpBlock(nn.Module):
    """UNETR's encoder for ViT tokens: n_up transposed-conv x2 steps from the patch grid, each after the first
    followed by a ResBlock (UNETR's "PrUp": an initial deconv, then num_layer x [deconv + res block]). n_up = 0
    (patch 8 at the 1/8 skip) is a 1x1 projection."""

    def __init__(self, cin: int, cout: int, n_up: int):
        super().__init__()
        layers = [_up(cin, cout, 2 if n_up else 1)]
        for _ in range(n_up - 1):
            layers += [_up(cout, cout, 2), ResBlock(cout, cout)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, x):
        return self.blocks(x)


def layer_indices(depth: int, n: int = 4):
    """n evenly spaced 0-based block indices ending at the last block: depth 24 -> [5, 11, 17, 23] (the
    reference's hard-coded ViT-L choice), depth 12 -> [2, 5, 8, 11]."""
    if depth % n:
        raise ValueError(f"cannot take {n} evenly spaced layers from a depth-{depth} ViT")
    return [depth // n * (i + 1) - 1 for i in range(n)]


def _fold(x):
    B, C = x.shape[:2]
    return x.reshape(B * C, 1, *x.shape[2:])  # (B, C, H, W, D) -> (B*C, 1, H, W, D)


# -----------------------------------------------------------------------------
# segmentation heads


class ViTAdapterUNETR(nn.Module):
    """The paper's segmenter: ViTAdapter pyramid f1..f4 (E channels at 1/2..1/16) + a UNet decoder. Encoders are
    ResBlocks: e0 (C -> F) on the image, e1..e4 (E -> F, 2F, 4F, 8F) on f1..f4; decoders upsample x2 and merge
    the skip: 8F -> 4F (1/8) -> 2F (1/4) -> F (1/2) -> F (1/1), then a 1x1 conv to the classes. F = 32 gives the
    paper's 256/128/64/32."""

    def __init__(self, vit: ViT3D, in_chans: int, num_classes: int, feature_size: int = 32, **adapter_kw):
        super().__init__()
        E, Fs = vit.embed_dim, feature_size
        self.adapter = ViTAdapter(vit, in_chans=in_chans, **adapter_kw)
        self.enc0, self.enc1 = ResBlock(in_chans, Fs), ResBlock(E, Fs)
        self.enc2, self.enc3, self.enc4 = ResBlock(E, 2 * Fs), ResBlock(E, 4 * Fs), ResBlock(E, 8 * Fs)
        self.dec3, self.dec2 = UpBlock(8 * Fs, 4 * Fs), UpBlock(4 * Fs, 2 * Fs)
        self.dec1, self.dec0 = UpBlock(2 * Fs, Fs), UpBlock(Fs, Fs)
        self.out = nn.Conv3d(Fs, num_classes, 1)

    @property
    def vit(self) -> ViT3D:
        return self.adapter.vit  # one module, registered once (under adapter.vit)

    def forward(self, x):
        f1, f2, f3, f4 = self.adapter(x)
        # with_cp: the decoder's stages are recomputed in backward too; at 112^3 their full- and half-resolution
        # activations are the largest share of what a frozen-backbone step keeps (bench.py finetune_memory)
        cp = self.adapter._cp
        y = cp(self.dec3, cp(self.enc4, f4), cp(self.enc3, f3))  # 1/16 -> 1/8, (B, 4F, ...)
        y = cp(self.dec2, y, cp(self.enc2, f2))  # -> 1/4, 2F
        y = cp(self.dec1, y, cp(self.enc1, f1))  # -> 1/2, F
        y = cp(self.dec0, y, cp(self.enc0, x))  # -> 1/1, F
        return self.out(y)  # (B, K, H, W, D)


class UNETR(nn.Module):
    """UNETR (Hatamizadeh et al. 2022) on four intermediate ViT layers — the paper's baseline decoder, tuned end to
    end for the "Random" encoder (freeze `.vit` for a frozen-backbone variant). Layers d/4-1, d/2-1, 3d/4-1, d-1
    (with the final LayerNorm), channel-mixed by Linear + GELU; the shallowest goes up to 1/2, the next to 1/4 and
    1/8, the last is the decoder's bottom.

    Generalised to any power-of-two patch p >= 8 (UNETR assumes 16): the skips stay at 1/8, 1/4, 1/2 (log2(p/s)
    up-steps from the 1/p grid) and the bottom stage upsamples by p/8 (x2 at p = 16 as UNETR, none at p = 8)."""

    def __init__(self, vit: ViT3D, in_chans: int, num_classes: int, feature_size: int = 32,
                 mix_single_channel: bool = False):
        super().__init__()
        p, E, Fs = vit.patch_size, vit.embed_dim, feature_size
        if p < 8 or p & (p - 1):
            raise ValueError(f"UNETR needs a power-of-two patch size >= 8, got {p}")
        if vit.in_chans != 1:
            raise ValueError(f"UNETR expects a single-channel ViT, got in_chans={vit.in_chans}")
        self.vit, self.in_chans = vit, in_chans
        self.layers = layer_indices(vit.depth)
        self.mix = nn.ModuleList(ChannelMix(in_chans, E, act=True, mix_single_channel=mix_single_channel)
                                 for _ in range(4))
        k = int(math.log2(p))
        self.enc1 = ResBlock(in_chans, Fs)  # on the image
        self.enc2 = PrUpBlock(E, 2 * Fs, k - 1)  # 1/p -> 1/2
        self.enc3 = PrUpBlock(E, 4 * Fs, k - 2)  # -> 1/4
        self.enc4 = PrUpBlock(E, 8 * Fs, k - 3)  # -> 1/8
        self.dec5 = UpBlock(E, 8 * Fs, p // 8)  # bottom (1/p) -> 1/8
        self.dec4, self.dec3, self.dec2 = UpBlock(8 * Fs, 4 * Fs), UpBlock(4 * Fs, 2 * Fs), UpBlock(2 * Fs, Fs)
        self.out = nn.Conv3d(Fs, num_classes, 1)

    def forward(self, x):
        feats = self.vit.get_intermediate_layers(_fold(x), n=self.layers, reshape=True, norm=True)  # 4 x (B*C,E,h,w,d)
        f = [mix(t) for mix, t in zip(self.mix, feats)]  # 4 x (B, E, h, w, d)
        y = self.dec5(f[3], self.enc4(f[2]))  # (B, 8F, 1/8)
        y = self.dec4(y, self.enc3(f[1]))  # 1/4
        y = self.dec3(y, self.enc2(f[0]))  # 1/2
        y = self.dec2(y, self.enc1(x))  # 1/1
        return self.out(y)


class LinearHead(nn.Module):
    """The paper's "linear decoder": the last four layers' patch tokens (final LayerNorm), per layer the
    multi-channel projection (1x1, C*E -> E, GELU), concatenated (B, 4E, h, w, d) -> BatchNorm3d -> 1x1 conv to
    the classes -> trilinear upsampling to the input size. BatchNorm as the reference: after training it is a
    fixed affine map, so for C = 1 (no mixing layer, see ChannelMix) the decoder is truly linear in the features."""

    def __init__(self, vit: ViT3D, in_chans: int, num_classes: int, mix_single_channel: bool = False):
        super().__init__()
        if vit.depth < 4:
            raise ValueError(f"LinearHead uses the last 4 blocks; the ViT has only {vit.depth}")
        if vit.in_chans != 1:
            raise ValueError(f"LinearHead expects a single-channel ViT, got in_chans={vit.in_chans}")
        E = vit.embed_dim
        self.vit, self.in_chans = vit, in_chans
        self.layers = list(range(vit.depth - 4, vit.depth))
        self.mix = nn.ModuleList(ChannelMix(in_chans, E, act=True, mix_single_channel=mix_single_channel)
                                 for _ in range(4))
        self.bn = nn.BatchNorm3d(4 * E)
        self.out = nn.Conv3d(4 * E, num_classes, 1)

    def forward(self, x):
        feats = self.vit.get_intermediate_layers(_fold(x), n=self.layers, reshape=True, norm=True)  # 4 x (B*C,E,h,w,d)
        y = torch.cat([mix(t) for mix, t in zip(self.mix, feats)], dim=1)  # (B, 4E, h, w, d)
        y = self.out(self.bn(y))  # (B, K, h, w, d)
        return F.interpolate(y, size=x.shape[2:], mode="trilinear", align_corners=False)  # (B, K, H, W, D)


SEGMENTERS = {"vit_adapter_unetr": ViTAdapterUNETR, "unetr": UNETR, "linear": LinearHead}


def build_segmenter(head: str, vit: ViT3D, in_chans: int, num_classes: int, **kw) -> nn.Module:
    """head in {"vit_adapter_unetr", "unetr", "linear"}; kw go to the head (ViTAdapterUNETR passes the adapter's
    options through, e.g. with_cp=True)."""
    if head not in SEGMENTERS:
        raise ValueError(f"unknown segmentation head {head!r}; choose one of {sorted(SEGMENTERS)}")
    return SEGMENTERS[head](vit, in_chans, num_classes, **kw)


# what finetune_seg.py stores under "segmenter" in best.pt: the segmenter's constructor arguments and the
# preprocessing / inference settings of its run, so that segment.py needs nothing but that file
SEGMENTER_KEYS = ("vit_args", "head", "head_kw", "in_chans", "n_out", "regions", "num_classes", "class_names",
                  "crop_size", "target_spacing", "ct_window", "crop_foreground", "blend", "test_overlap",
                  "sw_batch_size")


def segmenter_from_checkpoint(path_or_dict) -> tuple[nn.Module, dict]:
    """finetune_seg.py's best.pt (path or loaded dict) -> (segmenter in eval mode with its weights, meta).

    meta is best.pt's "segmenter" entry (SEGMENTER_KEYS): ViT3D(**vit_args) and build_segmenter(head, vit,
    in_chans, n_out, **head_kw) rebuild the network without the pretrained checkpoint it started from; the rest
    says how a scan is prepared (data.prepare_case) and windowed (sliding_window_inference). Read with
    weights_only=True. Raises CheckpointError for any other file, and for a best.pt of an older run that lacks
    those entries (it names them)."""
    what = str(path_or_dict) if not isinstance(path_or_dict, dict) else "checkpoint"
    obj = path_or_dict if isinstance(path_or_dict, dict) else load_checkpoint(path_or_dict)
    if "optimizer" in obj and "best_val" in obj:
        raise CheckpointError(f"{what}: finetune_seg.py's resumable ckpt.pt; use best.pt from the same folder")
    if not isinstance(obj.get("model"), dict) or "val_dice" not in obj:
        raise CheckpointError(f"{what}: not a segmentation checkpoint (finetune_seg.py's best.pt; a pretraining "
                              f"checkpoint holds a backbone only); its keys: {sorted(obj)[:8]}")
    meta = obj.get("segmenter") if isinstance(obj.get("segmenter"), dict) else {}
    missing = [k for k in SEGMENTER_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{what}: a best.pt without the settings that rebuild the segmenter (missing "
                              f"{missing}); it comes from an older finetune_seg.py: re-run finetune_seg.py with "
                              "the config stored in it (its \"config\" entry) for a self-contained best.pt")
    net = build_segmenter(meta["head"], ViT3D(**meta["vit_args"]), meta["in_chans"], meta["n_out"],
                          **meta["head_kw"])
    try:
        net.load_state_dict(obj["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what}: the weights do not fit the segmenter its settings describe ({e})") from None
    return net.eval(), meta


# -----------------------------------------------------------------------------
# sliding-window inference over a whole volume (MONAI semantics): finetune_seg.py's validation and test


def importance_map(roi, blend: str = "constant", sigma_scale: float = 0.125, device=None) -> torch.Tensor:
    """Weight w of every voxel of a window, shape roi. "constant": w = 1. "gaussian" (nnU-Net / MONAI):
    w(i) = Π_a exp(−(i_a − c_a)² / 2σ_a²) with c = (roi − 1)/2, σ = sigma_scale·roi, scaled to max 1. Centre
    voxels, which saw the most context, then count more than window borders where the seams are."""
    if blend == "constant":
        return torch.ones(roi, device=device)
    if blend != "gaussian":
        raise ValueError(f"blend must be 'constant' or 'gaussian', got {blend!r}")
    w = torch.ones((), device=device)
    for r in roi:
        i = torch.arange(r, dtype=torch.float32, device=device)
        w = w[..., None] * torch.exp(-((i - (r - 1) / 2) ** 2) / (2 * (sigma_scale * r) ** 2))
    return (w / w.max()).clamp_min(1e-6)  # every voxel keeps a positive weight, so no division by zero


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window origins along one axis: a step of roi·(1 − overlap) voxels (at least 1), the last window moved back
    to end at the border (MONAI's dense_patch_slices). size >= roi."""
    step = max(int(roi * (1 - overlap)), 1)
    n = math.ceil(max(size - roi, 0) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(n)})


@torch.no_grad()
def sliding_window_inference(x, roi, predictor, overlap: float = 0.25, blend: str = "constant",
                             sw_batch_size: int = 1, pad_value: float = 0.0, progress=False) -> torch.Tensor:
    """y = Σ_windows w·predictor(window) / Σ_windows w over a volume batch x (B, C, H, W, D) -> (B, K, H, W, D).

    roi: window size (int for a cube, or 3 ints); overlap in [0, 1): fraction shared by neighbouring windows
    (the paper: 0 for validation, 0.75 for the test pass); blend: "constant" (reference) or "gaussian";
    sw_batch_size windows go through `predictor` at once. An axis shorter than roi is padded at its end with
    pad_value and the padding cropped from the output. The output is accumulated in float32 on x's device.
    For a translation-equivariant predictor the result equals predictor(x) whatever roi/overlap/blend.
    progress: True shows a tqdm bar of the windows (nested under a bar over cases, removed when done); a
    callable is called as progress(windows done, windows in all) after every batch of windows (a 144x160x144
    scan at roi 112 and overlap 0.75 is 27 windows of a ViT-L segmenter: a quarter of an hour on a CPU).
    """
    roi = (roi,) * 3 if isinstance(roi, int) else tuple(int(r) for r in roi)
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    B, size = x.shape[0], x.shape[2:]
    pad = [max(r - s, 0) for r, s in zip(roi, size)]
    if any(pad):
        x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=pad_value)  # F.pad lists the last axis (D) first
    full = x.shape[2:]
    starts = [window_starts(s, r, overlap) for s, r in zip(full, roi)]
    windows = [(h, w, d) for h in starts[0] for w in starts[1] for d in starts[2]]
    weight = importance_map(roi, blend, device=x.device)
    out, norm = None, torch.zeros(full, device=x.device)
    bar = tqdm(total=len(windows), desc="windows", unit="window", leave=False, disable=progress is not True)
    for i in range(0, len(windows), sw_batch_size):
        chunk = windows[i:i + sw_batch_size]
        sl = [(slice(h, h + roi[0]), slice(w, w + roi[1]), slice(d, d + roi[2])) for h, w, d in chunk]
        y = predictor(torch.cat([x[(..., *s)] for s in sl])).float()  # (len(chunk)·B, K, *roi), window-major
        if out is None:
            out = torch.zeros(B, y.shape[1], *full, device=x.device)
        for j, s in enumerate(sl):
            out[(..., *s)] += y[j * B:(j + 1) * B] * weight
            norm[s] += weight
        bar.update(len(chunk))
        if callable(progress):
            progress(i + len(chunk), len(windows))
    bar.close()
    out /= norm
    return out[..., :size[0], :size[1], :size[2]]


# -----------------------------------------------------------------------------
# which head options a head takes: any head runs with a config written for another


def head_options(head: str, head_kwargs: dict) -> tuple[dict, list]:
    """Split a config's head_kwargs into (the options `head` takes, the names of those it does not take but
    another head does). What a head takes is read from its constructor's signature on build_segmenter's
    path: the head class, and for "vit_adapter_unetr" also ViTAdapter, which receives its **adapter_kw.
    The dropped ones belong to another head (configs/seg_hippocampus.py sets the adapter's feature_size; with
    --head=linear it has no meaning), so any head runs with any config; the script prints their names. An option
    that no head takes is a typo and raises ConfigError."""
    if head not in SEGMENTERS:
        raise ConfigError(f"unknown segmentation head {head!r}; choose one of {sorted(SEGMENTERS)}")

    def takes(cls):
        names = {n for n, p in inspect.signature(cls).parameters.items()
                 if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"vit", "in_chans", "num_classes"}
        return names | (takes(ViTAdapter) if cls is ViTAdapterUNETR else set())

    unknown = sorted(set(head_kwargs) - set().union(*(takes(c) for c in SEGMENTERS.values())))
    if unknown:
        raise ConfigError(f"head_kwargs {unknown} are options of no segmentation head ({sorted(SEGMENTERS)})")
    own = takes(SEGMENTERS[head])
    return {k: v for k, v in head_kwargs.items() if k in own}, sorted(set(head_kwargs) - own)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    from model import vit_large

    def count(m, skip=()):
        return sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip))

    with torch.device("meta"):  # shapes only: no memory, no time
        vit = vit_large(img_size=112)
        n_vit = count(vit)
        print(f"vit_large (112^3 grid): {n_vit:,} parameters")
        for C in (1, 4):
            for head in SEGMENTERS:
                for mix1 in (False, True):
                    if C > 1 and mix1:
                        continue
                    seg = build_segmenter(head, vit, C, 14 if C == 1 else 3, mix_single_channel=mix1)
                    n = count(seg)
                    tag = "  (reference: mixing layer kept at C=1)" if mix1 else ""
                    print(f"{head:<18} C={C}: {n:>13,} total, {n - n_vit:>12,} trainable with the ViT frozen{tag}")
