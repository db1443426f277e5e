"""Episode sampling: seeded by (seed, index), class-consistent labels, clear errors."""
import numpy as np
import pytest
import torch

from pymeta.data import ImageClasses
from pymeta.data.episodes import EpisodeSampler, episode_loader, fixed_episodes


def toy_store(num_classes=12, per_class=(7, 9, 11), size=6):
    counts = torch.tensor([per_class[c % len(per_class)] for c in range(num_classes)])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    # Every image is unique and says which class it is: pixel [0, 0] = class, [0, 1] = index.
    images = torch.zeros(int(counts.sum()), 1, size, size, dtype=torch.uint8)
    for c in range(num_classes):
        images[offsets[c]:offsets[c + 1], 0, 0, 0] = c
        images[offsets[c]:offsets[c + 1], 0, 0, 1] = torch.arange(int(counts[c]))
    return ImageClasses(images, offsets, [f"class{c}" for c in range(num_classes)], {})


def decode(x):
    """(class, index within class) of each image of a float episode tensor."""
    px = (x[..., 0, 0, :2] * 255).round().long()
    return px[..., 0], px[..., 1]


@pytest.mark.parametrize("tasks,ways,shots,queries", [(1, 5, 1, 3), (4, 3, 2, 5), (2, 12, 1, 0)])
def test_labels_match_classes_and_images_are_distinct(tasks, ways, shots, queries):
    store = toy_store()
    sampler = EpisodeSampler(store, ways, shots, queries, tasks=tasks, seed=3)
    for i in range(5):
        ep = sampler[i]
        assert ep.support_x.shape == (tasks, ways * shots, 1, 6, 6)
        assert ep.query_x.shape == (tasks, ways * queries, 1, 6, 6)
        for x, y in ((ep.support_x, ep.support_y), (ep.query_x, ep.query_y)):
            cls, _ = decode(x)
            # label y of task t is store class ep.classes[t, y], for every image
            assert torch.equal(cls, torch.gather(ep.classes, 1, y))
        both = torch.cat([torch.stack(decode(ep.support_x), -1),
                          torch.stack(decode(ep.query_x), -1)], 1)
        for t in range(tasks):
            assert len({tuple(p) for p in both[t].tolist()}) == ways * (shots + queries)
            assert len(set(ep.classes[t].tolist())) == ways


def test_same_index_same_episode_in_any_order_and_workers():
    store = toy_store()
    sampler = EpisodeSampler(store, 5, 2, 3, tasks=2, seed=11)
    forward = [sampler[i] for i in range(8)]
    backward = [sampler[i] for i in reversed(range(8))][::-1]
    workers = list(episode_loader(sampler, 0, 8, num_workers=2))
    for a, b, c in zip(forward, backward, workers):
        for f in ("support_x", "support_y", "query_x", "query_y", "classes"):
            assert torch.equal(getattr(a, f), getattr(b, f))
            assert torch.equal(getattr(a, f), getattr(c, f))
    assert not torch.equal(forward[0].classes, forward[1].classes)
    other_seed = EpisodeSampler(store, 5, 2, 3, tasks=2, seed=12)[0]
    assert not torch.equal(other_seed.support_x, forward[0].support_x)


def test_labels_are_assigned_at_random_and_classes_cover_the_store():
    sampler = EpisodeSampler(toy_store(), 3, 1, 1, tasks=1, seed=0)
    firsts = torch.stack([sampler[i].classes[0] for i in range(300)])
    assert len(set(firsts[:, 0].tolist())) == 12     # label 0 lands on every class
    counts = torch.bincount(firsts.flatten(), minlength=12).double()
    assert counts.min() > 0.5 * counts.mean()          # no class starved


def test_every_image_of_a_class_is_drawn():
    store = toy_store(num_classes=3, per_class=(9,))
    sampler = EpisodeSampler(store, 3, 1, 1, seed=0)
    seen = {(c, i) for n in range(200) for c, i in zip(*(t.flatten().tolist() for t in
                                                           decode(sampler[n].support_x)))}
    assert seen == {(c, i) for c in range(3) for i in range(9)}


def test_fixed_episodes_are_identical_across_constructions():
    store = toy_store()
    a, b = fixed_episodes(store, 5, 1, 4, n=20), fixed_episodes(store, 5, 1, 4, n=20)
    assert len(a) == 20
    assert all(torch.equal(a[i].query_x, b[i].query_x) for i in range(20))
    with pytest.raises(IndexError, match="out of range"):
        a[20]


def test_clear_errors():
    store = toy_store()
    with pytest.raises(ValueError, match="13-way episodes need at least 13 classes"):
        EpisodeSampler(store, 13, 1, 1)
    with pytest.raises(ValueError, match="need 8 images per class, but class 'class0' has 7"):
        EpisodeSampler(store, 5, 3, 5)
    for bad in (dict(ways=0), dict(shots=0), dict(queries=-1), dict(tasks=0), dict(ways=2.0),
                dict(seed=-1), dict(seed=1.5), dict(ways=True), dict(length=-1),
                dict(dtype=torch.int64), dict(augment="no")):  # refused at construction
        kw = dict(ways=2, shots=1, queries=1, tasks=1) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            EpisodeSampler(store, **kw)
    assert EpisodeSampler(store, np.int64(2), 1, 1)[0].ways == 2
    with pytest.raises(ValueError, match="episode index must be an int >= 0, got 1.5"):
        EpisodeSampler(store, 2, 1, 1)[1.5]


def test_store_helpers():
    store = toy_store()
    sub = store.subset([5, 2])
    assert sub.names == ["class5", "class2"]
    assert torch.equal(sub.images[: int(sub.counts[0])], store.images[store.offsets[5]:store.offsets[6]])
    rest, held = store.split(0.25, seed=1)
    assert sorted(rest.names + held.names) == sorted(store.names) and held.num_classes == 3
    rot = store.with_rotations()
    assert rot.num_classes == 48 and rot.names[12] == "class0/rot90"
    assert torch.equal(rot.images[rot.offsets[12]], torch.rot90(store.images[0], 1, (1, 2)))
    a, b = store.split_examples(0.5, seed=0)
    assert torch.equal(a.counts + b.counts, store.counts)
    rows_a = {tuple(p) for p in torch.stack(decode(store.to_float(a.images)), -1).tolist()}
    rows_b = {tuple(p) for p in torch.stack(decode(store.to_float(b.images)), -1).tolist()}
    assert not rows_a & rows_b
    with pytest.raises(ValueError, match="uint8"):
        ImageClasses(torch.zeros(2, 1, 3, 3), torch.tensor([0, 2]), ["a"])
    with pytest.raises(ValueError, match="offsets"):
        ImageClasses(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.tensor([0, 3]), ["a"])


def test_store_refuses_a_class_twice():
    """A class present twice would be sampled under two labels of one task."""
    store = toy_store(num_classes=3)
    with pytest.raises(ValueError, match="'class1' appears more than once"):
        store.subset([1, 1])
    with pytest.raises(TypeError, match="class indices, got a torch.bool tensor"):
        store.subset(torch.tensor([True, False, True]))
    with pytest.raises(TypeError, match="class indices"):
        store.subset(np.array([True, False, True]))
    for angles, message in [((0, 90), "gives the class itself"), ((90, 450), "differ modulo 360"),
                            ((45,), "multiples of 90")]:
        with pytest.raises(ValueError, match=message):
            store.with_rotations(angles)
    assert store.with_rotations((90.0,)).num_classes == 6   # a float angle is an angle
    with pytest.raises(ValueError, match=r"already hold rotated copies \[90\]; call "
                                         "with_rotations once"):  # split() would lose track
        store.with_rotations((90,)).with_rotations((180,))
    empty = store.subset([])  # [] is a float tensor to torch
    assert empty.num_classes == 0 and len(empty) == 0
    for classes, fraction in ((1, 0.5), (3, 0.9)):  # nothing left for the rest
        with pytest.raises(ValueError, match=f"cannot hold out {fraction} of {classes} class"):
            toy_store(num_classes=classes).split(fraction)


def test_splits_keep_rotated_copies_of_a_class_together():
    store = toy_store().with_rotations()
    rest, held = store.split(0.25, seed=1)
    base = lambda names: {n.split("/rot")[0] for n in names}  # noqa: E731
    assert not base(rest.names) & base(held.names) and held.num_classes == 12
    assert base(rest.names) | base(held.names) == set(toy_store().names)
    a, b = store.split_examples(0.5, seed=0)
    # each rotated copy holds out the drawings its class holds out (pixel [0, 1] = index,
    # moved by the rotation but the same set of indices)
    for c in range(1, 4):
        assert torch.equal(b.images[b.offsets[c * 12]:b.offsets[c * 12 + 1]],
                           torch.rot90(b.images[b.offsets[0]:b.offsets[1]], c, (2, 3)))
    _, plain_held = toy_store().split(0.25, seed=1)  # unrotated: the same draw as ever
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    assert plain_held.names == [f"class{c}" for c in sorted(perm[:3].tolist())]


def test_augmentation_is_seeded_and_only_warps():
    store = toy_store()
    plain = EpisodeSampler(store, 5, 2, 3, seed=4)
    aug = EpisodeSampler(store, 5, 2, 3, seed=4, augment=True)
    a, b, p = aug[2], aug[2], plain[2]
    assert torch.equal(a.support_x, b.support_x)          # same episode, same warp
    assert torch.equal(a.classes, p.classes) and torch.equal(a.query_y, p.query_y)
    assert not torch.equal(a.support_x, p.support_x)
    assert not torch.equal(aug[3].support_x, a.support_x)
    finite = EpisodeSampler(store, 5, 2, 3, seed=4, augment=True, length=10)
    assert torch.equal(finite[2].support_x, a.support_x)   # (seed, index) alone decide it


def test_random_affine_identity_and_shift():
    from pymeta.data.episodes import random_affine
    x = torch.zeros(2, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    same = random_affine(x, torch.Generator().manual_seed(0), degrees=0, scale=(1, 1), shift=0)
    assert torch.allclose(same, x, atol=1e-6)
    warped = random_affine(x, torch.Generator().manual_seed(0))
    assert warped.shape == x.shape and warped.min() >= 0 and warped.max() <= 1 + 1e-6
    assert warped[:, :, 0, :].abs().max() < 1e-6     # empty border stays empty
    assert abs(float(warped.sum() / x.sum()) - 1) < 0.35   # ink is moved, not invented


@pytest.mark.parametrize("augment", [False, True])
def test_a_share_assembles_exactly_its_tasks_of_the_meta_batch(augment):
    sampler = EpisodeSampler(toy_store(), 3, 2, 2, tasks=5, seed=6, augment=augment)
    for start, stop in [(0, 2), (2, 5), (4, 5), (0, 5)]:
        part = sampler.share(start, stop)
        assert part.tasks == 5 and len(part) == len(sampler)
        for i in (0, 7):
            whole, mine = sampler[i].task_range(start, stop), part[i]
            assert mine.tasks == stop - start
            for name in ("support_x", "support_y", "query_x", "query_y", "classes"):
                assert torch.equal(getattr(mine, name), getattr(whole, name)), name
    assert sampler[1].tasks == 5  # the sampler itself is unchanged
    for bad in [(0, 0), (3, 2), (-1, 2), (0, 6), (0.0, 2)]:
        with pytest.raises(ValueError, match=r"share: need 0 <= start < stop <= 5"):
            sampler.share(*bad)
