"""
phantoms.py — seeded synthetic "abdomen" volumes: the default dataset for demos and tests (no files needed).

    python pretrain.py configs/pretrain_demo.py        # pretrains on SyntheticVolumes (data_path = "")
    python finetune_seg.py configs/seg_synthetic.py    # segments their organs (with_labels=True)

Every volume is a pure function of (seed, i) and comes out normalised like a prepared volume (percentile scaling
to [-1, 1], air exactly -1), so it goes wherever a cached or loaded volume goes.
"""
import torch
import torch.nn.functional as F

from data import normalize_percentile, seeded_generator


class SyntheticVolumes(torch.utils.data.Dataset):
    """Procedural 3D "abdomen" phantoms, a pure function of (seed, i), already normalised like prepared data.

    Each volume: background −1 outside a body ellipsoid; body tissue with smooth texture; then
      class 1 "liver"   one large rotated ellipsoid, smooth low-frequency texture;
      class 2 "kidneys" two smaller elongated ellipsoids mirrored across the W axis, grainy texture;
      class 3 "lesion"  (in half of the volumes) 1–3 small spheres inside the liver, darker than it.
    Random positions, sizes, rotations and per-organ intensities; a smooth multiplicative bias field and
    Gaussian noise inside the body; a random global contrast (gamma). Then percentile scaling to [−1, 1] (as
    `prepare` does), so the air is exactly −1 and `crop_foreground` finds the body.
    Each volume has a latent contrast phase (as a CT series does: native, arterial, portal venous, delayed), drawn
    from its own generator, that sets the organs' brightness relative to the body (PHASE_LEVELS): which organ is
    brightest differs between phases, so intensity alone does not tell the classes apart, and volumes differ in a
    property that every crop and augmented view of one volume shares (the signal a DINO teacher can pick up).
    A second latent, the body tissue's texture (TEXTURES: smooth to blotchy), is visible in every crop, local ones
    too. Without them (every phantom "portal", smooth) views of one phantom were no closer than views of
    different phantoms, and every recipe tried stayed at the uniform fixed point (experiments/README.md).
    item: {"image": (1, H, W, D) float32 tensor, "label": (H, W, D) int64 tensor (if with_labels; 0 = air or
    body tissue; later organs overwrite earlier ones), "label_cls": int, "phase" and "texture": ints (indices
    into PHASE_LEVELS, TEXTURES), "spacing": (3,) float64 tensor of ones}.
    label_cls = 1 if the volume has lesions, else 0: a synthetic classification task (linear probe) whose answer
    is a small structure, not the global intensity. ~10–20 ms for 64³ on one core (organs are drawn in their
    bounding boxes only).
    """

    num_classes = 4  # background/body, liver, kidneys, lesion
    class_names = ("background", "liver", "kidneys", "lesion")
    # contrast phase -> (liver, kidneys) mean level; body tissue ~0.3, lesions 0.2-0.4 x the liver's level
    PHASE_LEVELS = {"native": (0.45, 0.38), "arterial": (0.5, 1.0), "portal": (0.92, 0.55), "delayed": (0.15, 0.7)}
    # body-tissue texture -> (amplitude, coarse grid) of an extra smooth-noise field: from smooth to blotchy
    TEXTURES = ((0.0, 4), (0.1, 5), (0.1, 10), (0.1, 16))

    def __init__(self, n: int = 64, shape=(64, 64, 64), seed: int = 0, with_labels: bool = False):
        self.n, self.shape, self.seed, self.with_labels = int(n), tuple(int(s) for s in shape), int(seed), with_labels
        self._axes = [torch.linspace(-1, 1, s) for s in self.shape]  # voxel centres in [−1, 1] per axis

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _smooth_noise(g, coarse: int, size) -> torch.Tensor:
        """Zero-mean, roughly unit smooth field: coarse³ Gaussian noise upsampled trilinearly to `size`."""
        z = torch.randn(1, 1, coarse, coarse, coarse, generator=g)
        return F.interpolate(z, size=tuple(size), mode="trilinear", align_corners=False)[0, 0]

    def _ellipsoid(self, g, center, radii, rotate: bool = True, sharpness: float = 6.0):
        """Soft indicator of an ellipsoid inside its bounding box -> (box slices, (h, w, d) tensor in [0, 1]).

        soft = clamp(½ + sharpness · (1 − Σ_k (p_k / r_k)²), 0, 1), p = R (x − c), R a random rotation (QR of a
        Gaussian): a linear ramp a few voxels wide (partial volume) that is exactly 0 outside, so air stays air.
        """
        center, radii = torch.as_tensor(center, dtype=torch.float32), torch.as_tensor(radii, dtype=torch.float32)
        reach = float(radii.max()) * 1.25  # covers the rotated ellipsoid and its soft edge
        box, d = [], []
        for ax, c in zip(self._axes, center.tolist()):
            idx = torch.nonzero((ax - c).abs() <= reach).flatten()
            if idx.numel() == 0:
                return None, None
            box.append(slice(int(idx[0]), int(idx[-1]) + 1))
            d.append(ax[box[-1]] - c)
        dx, dy, dz = d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]
        rot = torch.linalg.qr(torch.randn(3, 3, generator=g))[0] if rotate else torch.eye(3)
        dist = sum(((rot[k, 0] * dx + rot[k, 1] * dy + rot[k, 2] * dz) / radii[k]) ** 2 for k in range(3))
        return tuple(box), (0.5 + sharpness * (1 - dist)).clamp(0, 1)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = seeded_generator(self.seed, 0x5EED, i)

        def u(a, b, k=1):  # uniform draws from this volume's generator
            return a + (b - a) * torch.rand(k, generator=g)

        g_latent = seeded_generator(self.seed, 0xFA5E, i)  # the latent draws have their own stream
        phase = int(torch.randint(len(self.PHASE_LEVELS), (1,), generator=g_latent))
        texture = int(torch.randint(len(self.TEXTURES), (1,), generator=g_latent))
        liver_level, kidney_level = list(self.PHASE_LEVELS.values())[phase]
        img = torch.zeros(self.shape)
        label = torch.zeros(self.shape, dtype=torch.int64)
        body_box, body = self._ellipsoid(g, u(-0.05, 0.05, 3), u(0.75, 0.95, 3), rotate=False)
        amp, coarse = self.TEXTURES[texture]
        tissue = 0.3 + 0.05 * self._smooth_noise(g, 4, body.shape)
        if amp:
            tissue = tissue + amp * self._smooth_noise(g_latent, coarse, body.shape)
        img[body_box] = body * tissue.clamp_min(0.05)

        def paint(cls, center, radii, level, texture, rotate=True):
            """Blend one organ into img (partial volume at the soft edge) and claim its voxels in label."""
            box, soft = self._ellipsoid(g, center, radii, rotate)
            if box is None:
                return
            soft = soft * (img[box] > 0)  # organs live inside the body
            amp, coarse = texture  # coarse 0: per-voxel (grainy) noise
            tex = self._smooth_noise(g, coarse, soft.shape) if coarse else torch.randn(soft.shape, generator=g)
            img[box] = img[box] * (1 - soft) + soft * (level + amp * tex).clamp_min(0.02)
            label[box][soft > 0.5] = cls

        c_liver, r_liver = u(-0.2, 0.2, 3), u(0.35, 0.5, 3)
        liver = liver_level + u(-0.075, 0.075)
        paint(1, c_liver, r_liver, liver, (0.05, 6))  # liver: smooth
        c_kid = u(-0.35, 0.35, 3)
        c_kid[1] = u(0.4, 0.55).item()
        r_kid = torch.cat([u(0.12, 0.18), u(0.16, 0.25), u(0.12, 0.18)])
        level = kidney_level + u(-0.05, 0.05)
        for side in (1.0, -1.0):  # kidneys: a mirrored pair along W, grainy (per-voxel noise)
            paint(2, c_kid * torch.tensor([1.0, side, 1.0]), r_kid, level, (0.12, 0))
        label_cls = int(torch.rand(1, generator=g) < 0.5)
        if label_cls:  # lesions: 1-3 dark spheres inside the liver
            level = 2 * liver * u(0.1, 0.2)
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                paint(3, c_liver + u(-0.5, 0.5, 3) * r_liver, [u(0.06, 0.11).item()] * 3, level, (0.03, 4), False)

        # acquisition: bias field, noise (inside the body: the air stays at the minimum), contrast
        inside = img > 0
        img = img * torch.exp(0.15 * self._smooth_noise(g, 3, self.shape))
        img = img + inside * u(0.005, 0.03) * torch.randn(self.shape, generator=g)
        img = torch.where(inside, img.clamp_min(0.01), 0) ** u(0.7, 1.4)  # tissue stays above air; random gamma
        out = {"image": torch.from_numpy(normalize_percentile(img.numpy()))[None], "label_cls": label_cls,
               "phase": phase, "texture": texture, "spacing": torch.ones(3, dtype=torch.float64)}
        if self.with_labels:
            out["label"] = label
        return out
