"""phantoms.py: the seeded synthetic volumes (deterministic, structured, fast)."""
import time

import pytest
import torch

import data
import phantoms


@pytest.fixture
def one_thread():
    """Run like a DataLoader worker (1 torch thread): tiny ops gain nothing from threads, and on a busy machine
    the spinning thread pool makes them 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_synthetic_volumes_deterministic_and_structured(one_thread):
    sv = phantoms.SyntheticVolumes(n=12, shape=(48, 48, 40), seed=3, with_labels=True)
    a, b = sv[5], phantoms.SyntheticVolumes(n=12, shape=(48, 48, 40), seed=3, with_labels=True)[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(sv[6]["image"], a["image"])
    assert not torch.equal(phantoms.SyntheticVolumes(12, (48, 48, 40), seed=4)[5]["image"], a["image"])
    cls, phases = [], []
    for i in range(len(sv)):
        it = sv[i]
        x, lab = it["image"], it["label"]
        assert x.shape == (1, 48, 48, 40) and x.dtype == torch.float32 and lab.dtype == torch.int64
        assert x.min() == -1 and x.max() == 1 and int(lab.max()) < sv.num_classes
        assert (x[0][lab > 0] > -1).all()  # organs are never air
        mean = {c: x[0][lab == c].mean().item() for c in (1, 2, 3) if (lab == c).any()}
        liver_level, kidney_level = list(sv.PHASE_LEVELS.values())[it["phase"]]
        if abs(liver_level - kidney_level) > 0.2:  # the contrast phase decides which organ is brighter
            assert (mean[1] > mean[2]) == (liver_level > kidney_level), (i, it["phase"], mean)
        if 3 in mean:
            assert mean[3] < mean[1]  # lesions are darker than the liver they sit in
        assert ((lab == 3).any().item()) == bool(it["label_cls"])  # the classification label is the lesion
        cls.append(it["label_cls"])
        phases.append(it["phase"])
    assert 0 < sum(cls) < len(cls)
    assert len(set(phases)) >= 3  # volumes differ in phase: intensity alone does not name the organ
    assert data.foreground_box(sv[0]["image"].numpy()) != (slice(0, 48), slice(0, 48), slice(0, 40))  # air border
    with pytest.raises(IndexError):
        sv[12]


def test_synthetic_volume_speed(one_thread):
    sv = phantoms.SyntheticVolumes(n=8, shape=(64, 64, 64))
    sv[0]
    times = []
    for i in range(1, 6):
        t0 = time.process_time()  # CPU time of this process: robust to other jobs sharing the machine
        sv[i]
        times.append(time.process_time() - t0)
    assert sorted(times)[2] < 0.15  # ~15 ms of CPU; generous for slow CI machines
