"""iterate_batches reproducibility / resume, num_batches, and random_crop_flip against a
hand-written per-image reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from msam.data import ArrayDataset, iterate_batches, num_batches, random_crop_flip


def _images(n=23, c=3, h=8, w=6, seed=0) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randn(n, c, h, w, generator=g), torch.arange(n) % 4)


def _reference_crop_flip(x, generator, pad, flip):
    """Per-image loop: pad with zeros, slice the window, then torch.flip the width axis.

    Draws random numbers in the documented order: all vertical offsets, all horizontal
    offsets, then all flip bits.
    """
    n, _, h, w = x.shape
    top = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    mirror = torch.randint(0, 2, (n,), generator=generator) if flip else torch.zeros(n)
    out = []
    for i in range(n):
        padded = F.pad(x[i], (pad, pad, pad, pad), mode="constant", value=0.0)
        crop = padded[:, int(top[i]):int(top[i]) + h, int(left[i]):int(left[i]) + w]
        if mirror[i]:
            crop = torch.flip(crop, dims=[2])
        out.append(crop)
    return torch.stack(out)


@pytest.mark.parametrize("pad, flip", [(4, True), (4, False), (0, True), (2, True), (1, False)])
def test_random_crop_flip_matches_loop(pad, flip):
    x = _images(n=17, h=9, w=7).x
    got = random_crop_flip(x, torch.Generator().manual_seed(3), pad=pad, flip=flip)
    want = _reference_crop_flip(x, torch.Generator().manual_seed(3), pad, flip)
    assert got.shape == x.shape
    assert torch.equal(got, want)


def test_random_crop_flip_properties():
    image = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) + 1
    x = image.repeat(400, 1, 1, 1)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    # Shifted crops bring in zero padding; centred crops are the image or its mirror
    # (each has probability 1/50, so both occur among 400 draws).
    assert (out == 0).any()
    assert any(torch.equal(o, image[0].flip(-1)) for o in out)
    assert any(torch.equal(o, image[0]) for o in out)
    # Every output is a (possibly mirrored) window of the zero-padded image.
    padded = F.pad(image[0], (2, 2, 2, 2))
    windows = [padded[:, i:i + 4, j:j + 4] for i in range(5) for j in range(5)]
    windows += [w.flip(-1) for w in windows]
    assert all(any(torch.equal(o, w) for w in windows) for o in out[:50])
    x = image
    # pad=0, flip=False is the identity.
    assert torch.equal(random_crop_flip(x, torch.Generator(), pad=0, flip=False), x)
    with pytest.raises(ValueError, match="pad"):
        random_crop_flip(x, torch.Generator(), pad=-1)
    with pytest.raises(ValueError, match="4-D"):
        random_crop_flip(x[0], torch.Generator())


def test_num_batches():
    ds = _images(n=23)
    assert num_batches(ds, 5) == 5 and num_batches(ds, 5, drop_last=True) == 4
    assert num_batches(ds, 23) == 1 and num_batches(ds, 100, drop_last=True) == 0
    assert num_batches(10, 3) == 4
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(ds, 0)


@pytest.mark.parametrize("drop_last", [False, True])
def test_shuffled_epoch_is_permutation_and_deterministic(drop_last):
    ds = _images(n=23)
    run = list(iterate_batches(ds, 5, shuffle=True, seed=1, epoch=0, drop_last=drop_last))
    again = list(iterate_batches(ds, 5, shuffle=True, seed=1, epoch=0, drop_last=drop_last))
    assert len(run) == num_batches(ds, 5, drop_last)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(run, again))
    xs = torch.cat([b[0] for b in run])
    # Each yielded example is a row of the dataset with its own label, no repeats.
    rows = [int((ds.x == r).flatten(1).all(1).nonzero()) for r in xs]
    assert len(set(rows)) == len(rows) == (20 if drop_last else 23)
    assert torch.equal(torch.cat([b[1] for b in run]), ds.y[rows])
    assert rows != sorted(rows)


def test_epochs_and_seeds_change_order_unshuffled_is_sequential():
    ds = _images(n=40)

    def ys(**kw):
        return torch.cat([y for _, y in iterate_batches(ds, 8, **kw)])

    x_e0 = torch.cat([x for x, _ in iterate_batches(ds, 8, shuffle=True, seed=0, epoch=0)])
    x_e1 = torch.cat([x for x, _ in iterate_batches(ds, 8, shuffle=True, seed=0, epoch=1)])
    x_s1 = torch.cat([x for x, _ in iterate_batches(ds, 8, shuffle=True, seed=1, epoch=0)])
    assert not torch.equal(x_e0, x_e1) and not torch.equal(x_e0, x_s1)
    seq = list(iterate_batches(ds, 8, shuffle=False, seed=0, epoch=3))
    assert torch.equal(torch.cat([x for x, _ in seq]), ds.x)
    assert torch.equal(ys(shuffle=False, seed=5, epoch=0), ds.y)


@pytest.mark.parametrize("augment", [False, True])
def test_start_batch_resume_reproduces_batches(augment):
    ds = _images(n=37)
    full = list(iterate_batches(ds, 6, shuffle=True, seed=4, epoch=2, augment=augment))
    for start in (0, 1, 3, len(full)):
        resumed = list(iterate_batches(ds, 6, shuffle=True, seed=4, epoch=2, augment=augment,
                                       start_batch=start))
        assert len(resumed) == len(full) - start
        for (xa, ya), (xb, yb) in zip(full[start:], resumed):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augment_changes_pixels_not_labels_and_is_seeded():
    ds = _images(n=16, h=8, w=8)
    plain = list(iterate_batches(ds, 4, shuffle=True, seed=0, epoch=0))
    aug = list(iterate_batches(ds, 4, shuffle=True, seed=0, epoch=0, augment=True))
    aug2 = list(iterate_batches(ds, 4, shuffle=True, seed=0, epoch=0, augment=True))
    assert all(torch.equal(p[1], a[1]) for p, a in zip(plain, aug))
    assert not all(torch.equal(p[0], a[0]) for p, a in zip(plain, aug))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(aug, aug2))


def test_text_batches():
    ds = ArrayDataset([f"review {i}" for i in range(11)], torch.arange(11) % 2)
    batches = list(iterate_batches(ds, 4, shuffle=True, seed=9, epoch=0))
    assert [len(b[0]) for b in batches] == [4, 4, 3]
    texts = [t for b in batches for t in b[0]]
    assert sorted(texts) == sorted(ds.x)
    for xb, yb in batches:
        assert all(int(t.split()[1]) % 2 == int(y) for t, y in zip(xb, yb))
    resumed = list(iterate_batches(ds, 4, shuffle=True, seed=9, epoch=0, start_batch=2))
    assert resumed[0][0] == batches[2][0]
    with pytest.raises(ValueError, match="augment"):
        next(iterate_batches(ds, 4, shuffle=True, seed=0, epoch=0, augment=True))


def test_iterate_batches_argument_errors():
    ds = _images(n=10)
    with pytest.raises(ValueError, match="start_batch"):
        next(iterate_batches(ds, 5, shuffle=False, seed=0, epoch=0, start_batch=3))
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(ds, 0, shuffle=False, seed=0, epoch=0))
