"""
model.py — the 3D Vision Transformer of 3DINO, its DINO/iBOT projection heads, and checkpoint loading.

A plain pre-norm ViT (Dosovitskiy et al.) whose patches are 3D cubes, with the DINOv2 details 3DINO keeps:
a CLS token, a learnable mask token (iBOT), LayerScale, stochastic depth, LayerNorm eps 1e-6, exact GELU, and a
position embedding learned for one cubic grid and re-interpolated trilinearly for any other input size.
The semantics follow the reference implementation closely enough that its
teacher checkpoints load (see `load_pretrained`) and reproduce its outputs (tests/test_model.py, golden files).

Tensor legend (used in every shape comment of this repo):
    B  batch            C  input channels (1: 3DINO's ViT is single-channel; multi-channel data is handled by
                                           folding channels into the batch, see adapter.py)
    H, W, D  spatial axes of a volume `(B, C, H, W, D)`: the array axes of the NIfTI file after reorientation,
             H and W in-plane, D the through-plane (slice) axis.
    h, w, d  the patch grid (H/p, W/p, D/p);  N = h*w*d patch tokens, flattened in C order over (h, w, d)
    E  embedding width (`embed_dim`; called D in the paper — E here to keep D for depth-of-volume)
    nh heads, hd = E/nh head width, K prototypes of a projection head

    python model.py        # self-check: parameter counts and a CPU forward pass of every constructor
"""
import math
import os
import re
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# building blocks


class DropPath(nn.Module):
    """Stochastic depth (per sample): zero a residual branch for a random subset of samples and rescale the rest
    by 1/(1-p), so the expectation is unchanged. The reference uses DINOv2's "subset" variant for p > 0.1
    (compute the branch only on the kept samples); that is an efficiency trick with the same expectation."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class LayerScale(nn.Module):
    """Per-channel learnable scale on a residual branch (CaiT), init 1e-5 so each block starts near identity."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, f"embed_dim {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _qkv(self, x):
        B, T, E = x.shape
        # channel `which*E + head*hd + c` of the 3E outputs is q/k/v (which = 0/1/2) of that head (reference layout)
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, E // self.num_heads)  # (B, T, 3E) -> (B, T, 3, nh, hd)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, T, hd)

    def forward(self, x):
        B, T, E = x.shape
        q, k, v = self._qkv(x)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(hd)) v, fused where available
        return self.proj(x.transpose(1, 2).reshape(B, T, E))  # (B, nh, T, hd) -> (B, T, E), heads concatenated

    def attention_probs(self, x):
        """The explicit softmax attention matrix (B, nh, T, T) — for visualisation only."""
        q, k, v = self._qkv(x)
        scale = q.shape[-1] ** -0.5
        return ((q * scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()  # exact (erf) GELU, as the reference
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x = x + LS1(Attn(LN1(x))); x = x + LS2(MLP(LN2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_bias=True, ffn_bias=True,
                 drop_path=0.0, layerscale_init=1e-5):
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))
        return x


# -----------------------------------------------------------------------------
# position-embedding interpolation


def _interp_matrix(n_out: int, n_in: int, scale: float) -> torch.Tensor:
    """The (n_out, n_in) matrix of 1-D linear interpolation that `F.interpolate(..., scale_factor=scale,
    mode="trilinear", align_corners=False)` applies along one axis *on CPU*: output index j reads source
    coordinate src = max(0, (j + 0.5) / scale - 0.5), split between floor(src) and min(floor(src) + 1, n_in - 1).
    Where n_out == n_in the CPU kernel copies (ignores `scale`), the CUDA kernel does not; we reproduce the CPU
    behaviour on every device, so a model gives the same numbers on CPU and GPU."""
    if n_out == n_in:
        return torch.eye(n_in, dtype=torch.float64)
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) / scale - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple) -> torch.Tensor:
    """Resize a (1, 1 + g^3, E) position embedding (CLS row first, cubic grid g) to the patch grid `grid`
    = (h, w, d) with the reference's recipe: trilinear with scale factor s_k = (n_k + 0.1) / g per axis (the +0.1
    avoids floor errors in the output size), align_corners=False, no antialias, computed in fp32; CLS row kept.
    Used at run time for inputs of another size and at load time to move a checkpoint to another crop size."""
    n0 = pos_embed.shape[1] - 1
    g = round(n0 ** (1 / 3))
    if g ** 3 != n0:
        raise ValueError(f"position embedding has {n0} patch rows, which is not a cube number")
    if tuple(grid) == (g, g, g):
        return pos_embed
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    E = pos_embed.shape[-1]
    cube = patch_pos.float().reshape(g, g, g, E)  # (1, g^3, E) -> (g, g, g, E), C order over (h, w, d)
    mats = [_interp_matrix(n, g, (n + 0.1) / n0 ** (1 / 3)).to(pos_embed.device, torch.float32) for n in grid]
    # separable trilinear: out[a,b,c] = sum_{i,j,k} Mh[a,i] Mw[b,j] Md[c,k] cube[i,j,k]
    out = torch.einsum("ai,bj,ck,ijke->abce", *mats, cube)
    out = out.reshape(1, -1, E).to(pos_embed.dtype)  # (h, w, d, E) -> (1, N, E)
    return torch.cat([cls_pos, out], dim=1)


# -----------------------------------------------------------------------------
# the 3D ViT


class PatchEmbed3D(nn.Module):
    """Non-overlapping p^3 patches -> E channels. The weights are those of `Conv3d(C, E, p, stride=p)` (so the
    reference's keys load), but we compute it as an unfold + one matmul: identical maths, usually faster."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        B, C, H, W, D = x.shape
        p = self.patch_size
        h, w, d = H // p, W // p, D // p
        x = x.reshape(B, C, h, p, w, p, d, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, h * w * d, C * p ** 3)  # -> (B, N, C p^3), C order (h,w,d)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (E, C, p, p, p) -> (E, C p^3)
        return F.linear(x, weight, self.proj.bias)  # (B, N, E)


class ViT3D(nn.Module):
    def __init__(self, img_size=96, patch_size=16, in_chans=1, embed_dim=1024, depth=24, num_heads=16,
                 mlp_ratio=4.0, qkv_bias=True, proj_bias=True, ffn_bias=True, drop_path_rate=0.0,
                 layerscale_init=1e-5, grad_checkpointing=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        # remembered so a checkpoint can rebuild the same model (see vit_from_checkpoint)
        self.args = dict(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                         proj_bias=proj_bias, ffn_bias=ffn_bias, layerscale_init=layerscale_init)
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, embed_dim
        self.depth, self.num_heads = depth, num_heads
        self.grad_checkpointing = grad_checkpointing
        g = img_size // patch_size  # the native (pretraining) grid: 6^3 at 96^3, 7^3 at 112^3
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + g ** 3, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # replaces masked patches (iBOT)
        # drop_path_uniform=true in the reference: the same rate in every block
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_bias, ffn_bias, drop_path_rate, layerscale_init)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self._init_weights()

    def _init_weights(self):
        # the reference's init: timm-style trunc-normal(0.02) on Linear layers, pos 0.02, cls N(0, 1e-6), mask token 0;
        # the patch-embedding Conv3d keeps PyTorch's default init.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # --- tokens ---------------------------------------------------------------

    def _check_input(self, x):
        if x.ndim != 5:
            raise ValueError(f"expected a volume batch (B, C, H, W, D), got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channel(s), got {x.shape[1]} (shape {tuple(x.shape)});"
                             " multi-channel data goes through the single-channel ViT with channels folded into the"
                             " batch (adapter.py)")
        bad = [s for s in x.shape[2:] if s % self.patch_size]
        if bad:
            raise ValueError(f"input spatial size {tuple(x.shape[2:])} is not a multiple of the patch size "
                             f"{self.patch_size}; pad or crop it first")

    def interpolate_pos_encoding(self, grid):
        """Position embedding (1, 1 + N, E) for a patch grid (h, w, d), re-interpolated if it is not native."""
        return resize_pos_embed(self.pos_embed, grid)

    def prepare_tokens_with_masks(self, x, masks=None):
        self._check_input(x)
        grid = tuple(s // self.patch_size for s in x.shape[2:])
        x = self.patch_embed(x)  # (B, N, E)
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks of shape {tuple(masks.shape)} do not match the {tuple(x.shape[:2])} tokens")
            # replaced *before* the position embedding: masked tokens still know where they are
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, E)
        return x + self.interpolate_pos_encoding(grid).to(x.dtype)

    def _run_blocks(self, x, blocks=None):
        for blk in (self.blocks if blocks is None else blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    # --- features --------------------------------------------------------------

    def forward_features(self, x, masks=None):
        """x (B, C, H, W, D) -> dict of x_norm_clstoken (B, E), x_norm_patchtokens (B, N, E), x_prenorm
        (B, 1 + N, E) and the masks that were applied."""
        x = self._run_blocks(self.prepare_tokens_with_masks(x, masks))
        x_norm = self.norm(x)
        return {"x_norm_clstoken": x_norm[:, 0], "x_norm_patchtokens": x_norm[:, 1:], "x_prenorm": x,
                "masks": masks}

    def forward_features_list(self, xs, masks_list):
        """The multi-crop path: a list of crop batches of different sizes (e.g. the 2B global and the 8B local
        crops) through the same blocks. The reference concatenates them into one sequence with a block-diagonal
        attention mask (no cross-crop attention); running each group on its own is the same computation."""
        return [self.forward_features(x, m) for x, m in zip(xs, masks_list)]

    def forward(self, x):
        return self.head(self.forward_features(x)["x_norm_clstoken"])

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
        """Outputs of the last `n` blocks (int) or of the listed 0-based block indices (list), each through the
        final LayerNorm when `norm`. Returns a tuple of patch tokens (B, N, E) — or (B, E, h, w, d) with
        `reshape` — or of (patch tokens, CLS (B, E)) pairs with `return_class_token`. No masks."""
        take = list(range(self.depth - n, self.depth)) if isinstance(n, int) else list(n)
        if any(not 0 <= i < self.depth for i in take):
            raise ValueError(f"block indices {take} out of range for a depth-{self.depth} ViT")
        grid = tuple(s // self.patch_size for s in x.shape[2:])
        x = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, blk in enumerate(self.blocks[: max(take) + 1]):
            x = self._run_blocks(x, [blk])
            if i in take:
                outputs.append(x)
        outputs = [outputs[sorted(take).index(i)] for i in take]  # in the order asked for
        if norm:
            outputs = [self.norm(o) for o in outputs]
        cls = [o[:, 0] for o in outputs]
        patches = [o[:, 1:] for o in outputs]
        if reshape:
            B, E = x.shape[0], self.embed_dim
            patches = [p.reshape(B, *grid, E).permute(0, 4, 1, 2, 3).contiguous() for p in patches]  # -> (B,E,h,w,d)
        return tuple(zip(patches, cls)) if return_class_token else tuple(patches)

    @torch.no_grad()
    def get_last_self_attention(self, x):
        """Softmax attention (B, nh, 1 + N, 1 + N) of the *final* block (token 0 is CLS). The paper's Fig. 1c
        shows the CLS row of it; the reference's tool actually returns an earlier block."""
        x = self.prepare_tokens_with_masks(x)
        x = self._run_blocks(x, self.blocks[:-1])
        last = self.blocks[-1]
        return last.attn.attention_probs(last.norm1(x))

    def flops(self, n_tokens: int) -> int:
        """Matmul FLOPs of one forward pass over an n_tokens sequence (2 per multiply-add): per token and block
        qkv 6E², proj 2E², MLP 4·E·hidden, attention 4·T·E (scores and weighted sum); the patch embedding and
        norms are left out (nanoGPT's count)."""
        E, T = self.embed_dim, n_tokens
        hidden = self.blocks[0].mlp.fc1.out_features
        return self.depth * T * (8 * E * E + 4 * E * hidden + 4 * T * E)


# dense bf16 tensor-core peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name()
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def estimate_mfu(flops_per_sample: float, samples_per_s: float, device) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the GPU's peak (PEAK_FLOPS); None where the peak is unknown
    (CPU, other GPUs). samples_per_s is per device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    return samples_per_s * flops_per_sample / peak if peak else None


def vit_tiny(**kw):
    return ViT3D(embed_dim=192, depth=12, num_heads=3, **kw)


def vit_small(**kw):
    return ViT3D(embed_dim=384, depth=12, num_heads=6, **kw)


def vit_base(**kw):
    return ViT3D(embed_dim=768, depth=12, num_heads=12, **kw)


def vit_large(**kw):
    return ViT3D(embed_dim=1024, depth=24, num_heads=16, **kw)


def vit_giant(**kw):
    return ViT3D(embed_dim=1536, depth=40, num_heads=24, **kw)


ARCHS = {"vit_tiny": vit_tiny, "vit_small": vit_small, "vit_base": vit_base, "vit_large": vit_large,
         "vit_giant": vit_giant}

# -----------------------------------------------------------------------------
# DINO / iBOT projection head


class WeightNormLinear(nn.Module):
    """Linear layer without bias whose weight is W = g * v / ||v|| (norm per output row), parametrised by
    `weight_g` (out, 1) and `weight_v` (out, in) — the names the reference's `nn.utils.weight_norm` stores."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))  # nn.Linear's default init (the reference's weight_v init)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))  # g = 1 at init, trainable (reference)

    @property
    def weight(self):
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x):
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck, GELU between) -> L2 normalise -> weight-normed linear to K
    prototypes. The same class serves as DINO head (on CLS) and iBOT head (on patch tokens)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers = []
        for i in range(nlayers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)  # keys mlp.0, mlp.2, mlp.4 as the reference (GELUs have no params)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def flops(self) -> int:
        """Matmul FLOPs of one token's forward pass through the head (MLP and the K-way last layer)."""
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        return 2 * (sum(m.weight.numel() for m in linears) + self.last_layer.weight_v.numel())

    def forward(self, x):
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


# -----------------------------------------------------------------------------
# checkpoints: ours, teacher exports, and the reference 3DINO format


class CheckpointError(ValueError):
    """A file that is not a usable checkpoint; the message starts with its path."""

    input_error = True  # scripts print the message without a traceback (configurator)


def load_checkpoint(path) -> dict:
    """torch.load(path, weights_only=True) with errors that say what is wrong: a missing file, or a file that is
    not a checkpoint (torch's own advice there, "re-run with weights_only=False", would unpickle untrusted code)."""
    if not os.path.isfile(str(path)):
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message would advise weights_only=False: never for a file we cannot trust
        raise CheckpointError(f"{path}: not a checkpoint (torch.load with weights_only=True cannot read it: "
                              f"{type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(obj).__name__}, expected a dict of tensors)")
    return obj


def split_checkpoint(obj) -> dict:
    """Bring any supported checkpoint to {"backbone": sd, "dino_head": sd, "ibot_head": sd} with our key names.

    Accepted: the reference 3DINO teacher checkpoint {"teacher": {"backbone.…", "dino_head.…", "ibot_head.…"}}
    (chunked block keys `blocks.{c}.{i}.…`; the authors' released 3DINO-ViT file), our full training checkpoint
    {"teacher": …, "student": …, …} (the teacher is used), our teacher export {"teacher": …, "model_args": …},
    {"model": sd}, {"state_dict": sd}, or a bare backbone state dict, each with or without the `backbone.` prefix
    (without it, keys that are not `dino_head.…` / `ibot_head.…` are the backbone's). Prefixes `module.` (DDP) and
    `_orig_mod.` (torch.compile) are stripped; chunked block keys are flattened (`blocks.1.6.attn…` ->
    `blocks.6.attn…`); `last_layer.parametrizations.weight.original0/1` (new weight_norm API) become
    `weight_g/weight_v`. Keys that fit nowhere are kept under "unexpected"."""
    sd = obj
    for key in ("teacher", "model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError("not a state dict: expected tensors (or a dict with 'teacher' / 'model' holding them)")
    parts = {"backbone": {}, "dino_head": {}, "ibot_head": {}, "unexpected": {}}
    has_prefix = any(re.sub(r"^(module\.|_orig_mod\.)+", "", k).startswith("backbone.") for k in sd)
    for k, v in sd.items():
        k = re.sub(r"^(module\.|_orig_mod\.)+", "", k)
        k = k.replace("parametrizations.weight.original0", "weight_g")
        k = k.replace("parametrizations.weight.original1", "weight_v")
        part, _, rest = k.partition(".")
        if not has_prefix and part not in ("dino_head", "ibot_head"):
            part, rest = "backbone", k
        if part not in ("backbone", "dino_head", "ibot_head"):
            parts["unexpected"][k] = v
            continue
        if part == "backbone":
            rest = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", rest)  # chunked -> flat block index
        parts[part][rest] = v
    return parts


def _load_strict(module: nn.Module, sd: dict, what: str):
    missing = sorted(set(module.state_dict()) - set(sd))
    unexpected = sorted(set(sd) - set(module.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"{what}: checkpoint does not fit the model — missing keys {missing[:10]}"
                         f"{' …' if len(missing) > 10 else ''}; unexpected keys {unexpected[:10]}"
                         f"{' …' if len(unexpected) > 10 else ''}")
    own = module.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
             if v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{what}: shape mismatch for " + "; ".join(wrong[:10]))
    module.load_state_dict(sd, strict=True)


def load_pretrained(model: ViT3D, path_or_state_dict, dino_head: nn.Module = None, ibot_head: nn.Module = None,
                    name: str = None):
    """Load a checkpoint (see `split_checkpoint` for the formats) into `model`, strictly: every backbone key must
    match (missing / unexpected keys are reported by name). The position embedding is resized to the model's grid
    when the checkpoint was trained at another crop size (same recipe as the reference's high-res stage).
    Head weights are loaded into `dino_head` / `ibot_head` when given, otherwise ignored (as the reference's
    evaluation tools do). Files are read with weights_only=True: no pickled code runs. Errors are CheckpointErrors
    that start with `name` (default: the path) and name the keys: a backbone is never left partly random."""
    what = name or (str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "state dict")
    obj = path_or_state_dict
    if not isinstance(obj, dict):
        obj = load_checkpoint(obj)
    try:
        parts = split_checkpoint(obj)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None
    if parts["unexpected"]:
        raise CheckpointError(f"{what}: unexpected keys {sorted(parts['unexpected'])[:10]}")
    sd = dict(parts["backbone"])
    if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
        g = round((model.pos_embed.shape[1] - 1) ** (1 / 3))
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"].float(), (g, g, g))
    _load_strict(model, sd, f"{what} (backbone)")
    for head, name in ((dino_head, "dino_head"), (ibot_head, "ibot_head")):
        if head is not None:
            if not parts[name]:
                raise CheckpointError(f"{what}: no {name} weights in this checkpoint")
            _load_strict(head, parts[name], f"{what} ({name})")
    return model


def vit_from_checkpoint(path_or_state_dict, **overrides) -> ViT3D:
    """Build the ViT a checkpoint was trained with and load it. Our exports store the constructor arguments
    (`model_args`); for a reference checkpoint they are inferred from the tensor shapes (heads of width 64, as
    every 3DINO/DINOv2 ViT)."""
    obj = path_or_state_dict
    what = str(obj) if not isinstance(obj, dict) else "checkpoint"
    if not isinstance(obj, dict):
        obj = load_checkpoint(obj)
    args = dict(obj.get("model_args", {})) if isinstance(obj, dict) else {}
    if not args:
        try:
            sd = split_checkpoint(obj)["backbone"]
        except CheckpointError as e:
            raise CheckpointError(f"{what}: {e}") from None
        if not {"patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"} <= set(sd):
            shown = ", ".join(sorted(sd)[:4])
            raise CheckpointError(f"{what}: no ViT backbone in it (keys like {shown}, ...). A backbone comes from "
                                  "pretrain.py's teacher_backbone.pt / ckpt.pt or a 3DINO teacher checkpoint; a "
                                  "segmentation best.pt holds a whole segmenter")
        E, C, p = sd["patch_embed.proj.weight"].shape[:3]
        g = round((sd["pos_embed"].shape[1] - 1) ** (1 / 3))
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
        args = dict(img_size=g * p, patch_size=p, in_chans=C, embed_dim=E, depth=depth, num_heads=E // 64,
                    mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / E)
    args.update(overrides)
    return load_pretrained(ViT3D(**args), obj, name=what)


def random_init_like(ckpt, seed: int) -> ViT3D:
    """A freshly initialised ViT3D of the architecture `ckpt` (path or loaded dict) was trained with: the "random
    init" baseline that differs from the pretrained model in the weights only. Built as pretrain.py builds its
    student backbone (the same class and init right after torch.manual_seed(seed)), so with the pretraining's seed
    it is that run's step-0 backbone. layerscale_init comes from the export's model_args, for older exports from
    the pretraining config stored with it, else 3DINO's 1e-5 (the trained gammas no longer show it). The caller's
    global RNG is left as it was."""
    obj = ckpt if isinstance(ckpt, dict) else load_checkpoint(ckpt)
    args = dict(vit_from_checkpoint(obj).args)
    cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    if "layerscale_init" not in (obj.get("model_args") or {}):
        args["layerscale_init"] = cfg.get("layerscale_init", 1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViT3D(**args)


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import time

    torch.manual_seed(0)
    print(f"{'arch':<10} {'params (96^3 grid)':>20} {'params (112^3 grid)':>20} {'fwd 1x96^3 CPU':>16}")
    for name, fn in ARCHS.items():
        m96, m112 = fn(img_size=96), fn(img_size=112)
        n96 = sum(p.numel() for p in m96.parameters())
        n112 = sum(p.numel() for p in m112.parameters())
        t = "skipped"
        if name != "vit_giant":  # giant's forward takes a while on a laptop CPU
            m96.eval()
            with torch.no_grad():
                t0 = time.perf_counter()
                out = m96(torch.randn(1, 1, 96, 96, 96))
                t = f"{(time.perf_counter() - t0) * 1e3:.0f} ms {tuple(out.shape)}"
        print(f"{name:<10} {n96:>20,} {n112:>20,} {t:>16}")
        del m96, m112
    head = DINOHead(1024)
    print(f"DINOHead(1024 -> 65536): {sum(p.numel() for p in head.parameters()):,} params")
