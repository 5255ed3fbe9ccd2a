import torch

from imgcls.data import Batches


def _batches(n: int = 10, batch_size: int = 4, **kw) -> Batches:  # type: ignore[no-untyped-def]
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 3).clone()
    images[:, :, :, 0] = 0  # the left column is black: a flip moves it right
    return Batches(images, torch.arange(n), batch_size, mean=(0.0,), std=(1 / 255,), **kw)


def test_training_batches_shuffle_by_seed_and_drop_the_last_partial_one() -> None:
    train = _batches(train=True, seed=1)
    assert len(train) == 2
    first = [y.tolist() for _, y in train]
    assert all(len(b) == 4 for b in first)
    second = [y.tolist() for _, y in train]
    assert first != second  # reshuffled each epoch
    assert first == [y.tolist() for _, y in _batches(train=True, seed=1)]  # same seed, same order


def test_evaluation_batches_cover_every_image_in_order() -> None:
    val = _batches(train=False)
    assert [y.tolist() for _, y in val] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    x, y = next(iter(val))
    assert torch.allclose(x[:, 0, 0, 1], y.float())  # normalized: (v/255 - 0) / (1/255) = v


def test_horizontal_flip_mirrors_training_images_only() -> None:
    flipped = next(iter(_batches(train=True, hflip=1.0)))[0]
    assert (flipped[..., -1] == 0).all() and (flipped[..., 0] != 0).any()
    kept = next(iter(_batches(train=True, hflip=0.0)))[0]
    assert (kept[..., 0] == 0).all()
    assert (next(iter(_batches(train=False, hflip=1.0)))[0][..., 0] == 0).all()
