import torch

from imgcls.data import Batches
from imgcls.data.augment import Augment


def _batches(n: int = 10, batch_size: int = 4, **kw) -> Batches:  # type: ignore[no-untyped-def]
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 3).clone()
    images[:, :, :, 0] = 0  # the left column is black: a flip moves it right
    return Batches(images, torch.arange(n), batch_size, mean=(0.0,), std=(1 / 255,), **kw)


def _epochs(batches: Batches, count: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch for _ in range(count) for batch in batches]


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


def test_training_batches_are_augmented_before_normalization() -> None:
    x, y = next(iter(_batches(train=True, augment=Augment(hflip=1.0))))
    assert (x[..., -1] == 0).all() and (x[..., 0] != 0).any()  # the black column moved right
    assert torch.allclose(x[:, 0, 0, 0], y.float())  # then normalized: (v/255) / (1/255) = v


def test_evaluation_batches_are_never_augmented() -> None:
    augment = Augment(hflip=1.0, vflip=1.0, brightness=0.5)
    plain = _epochs(_batches(train=False))
    augmented = _epochs(_batches(train=False, augment=augment))
    assert all(torch.equal(a, b) and torch.equal(c, d)
               for (a, c), (b, d) in zip(plain, augmented, strict=True))


def test_augmentation_switched_off_gives_bit_identical_epochs() -> None:
    plain = _epochs(_batches(train=True, seed=2))
    off = _epochs(_batches(train=True, seed=2, augment=Augment()))
    assert all(torch.equal(a, b) and torch.equal(c, d)
               for (a, c), (b, d) in zip(plain, off, strict=True))


def test_a_seed_fixes_the_order_and_the_augmentation_of_every_epoch() -> None:
    augment = Augment(hflip=0.5, brightness=0.5)
    first = _epochs(_batches(train=True, seed=3, augment=augment))
    again = _epochs(_batches(train=True, seed=3, augment=augment))
    other = _epochs(_batches(train=True, seed=4, augment=augment))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for (a, _), (b, _) in zip(first, other, strict=True))
    assert first[0][0].dtype == torch.float32 and first[0][0].shape == (4, 1, 2, 3)
