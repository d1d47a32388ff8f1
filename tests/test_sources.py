"""Data sources as streams of checked batches: what each source yields, and bad data."""

from __future__ import annotations

import numpy as np
import pytest

from gradkit import DataShapeError, InvalidArgumentError
from gradkit._sources import BatchStream

RNG = np.random.default_rng(2)
X = RNG.normal(size=(11, 3)).astype("float32")
Y = RNG.normal(size=(11, 2)).astype("float32")
SW = RNG.uniform(size=11).astype("float32")


def _model(keras):
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def _stream(keras, flavour, data, batch_size=None):
    return BatchStream(_model(keras), data, batch_size, flavour, "float32")


def _collect(stream):
    """Indices and the concatenated NumPy x, y, sample_weight of a stream."""
    indices, parts = [], ([], [], [])
    for index, batch in stream:
        indices.append(index)
        for part, value in zip(parts, (batch.x, batch.y, batch.sample_weight)):
            if value is not None:
                part.append(np.asarray(value))
    return indices, [np.concatenate(p) if p else None for p in parts]


@pytest.mark.parametrize("batch_size, sizes", [(4, [4, 4, 3]), (1, [1] * 11), (None, [11])])
def test_arrays_are_cut_into_batches_in_order(keras, flavour, batch_size, sizes):
    stream = _stream(keras, flavour, (X, Y, SW), batch_size)
    assert stream.total == len(sizes)
    assert [b.size for _, b in _stream(keras, flavour, (X, Y, SW), batch_size)] == sizes
    indices, (x, y, sw) = _collect(stream)
    assert indices == list(range(len(sizes)))
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(y, Y)
    np.testing.assert_array_equal(sw, SW)


def test_float64_arrays_become_floatx_and_x_alone_has_no_y(keras, flavour):
    stream = _stream(keras, flavour, X.astype("float64"), 5)
    batches = [b for _, b in stream]
    assert [b.size for b in batches] == [5, 5, 1]
    assert all(b.x.dtype == np.float32 and b.y is None for b in batches)


def test_generator_and_list_batches_are_unpacked_like_keras(keras, flavour):
    generator = ((X[i:i + 4], Y[i:i + 4]) for i in range(0, 11, 4))
    stream = _stream(keras, flavour, generator)
    assert stream.total is None
    indices, (x, y, sw) = _collect(stream)
    assert indices == [0, 1, 2] and sw is None
    np.testing.assert_array_equal(x, X)
    batches = [[X[:6], Y[:6], SW[:6]], [X[6:], Y[6:], SW[6:]], (X[:0], Y[:0])]
    stream = _stream(keras, flavour, batches)
    assert stream.total == 3
    indices, (x, y, sw) = _collect(stream)
    assert indices == [0, 1]  # the empty batch is passed over
    np.testing.assert_array_equal(sw, SW)


def test_pydataset_is_read_by_index(keras, flavour):
    base = keras.utils.Sequence if flavour == "tf_keras" else keras.utils.PyDataset

    class Data(base):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            if not 0 <= i < 3:
                raise AssertionError(f"read past the end: {i}")
            return X[4 * i:4 * i + 4], Y[4 * i:4 * i + 4]

    stream = _stream(keras, flavour, Data())
    assert stream.total == 3
    indices, (x, y, _) = _collect(stream)
    np.testing.assert_array_equal(y, Y)


def test_tf_dataset_batches_and_tensor_types(keras, flavour):
    tf = pytest.importorskip("tensorflow")
    dataset = tf.data.Dataset.from_tensor_slices((X, Y, SW)).batch(4)
    stream = _stream(keras, flavour, dataset)
    assert stream.total == 3
    _, first = stream.first
    native = flavour in ("tensorflow", "tf_keras")
    assert isinstance(first.x, np.ndarray) != native  # TF tensors pass through only on TF
    _, (x, y, sw) = _collect(stream)
    np.testing.assert_array_equal(x, X)
    with pytest.raises(InvalidArgumentError, match="infinite"):
        _stream(keras, flavour, dataset.repeat())


def test_torch_dataloader(keras, flavour):
    torch = pytest.importorskip("torch")
    if flavour != "torch":
        pytest.skip("a torch DataLoader is for the torch flavour")
    data = torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y))
    stream = _stream(keras, flavour, torch.utils.data.DataLoader(data, batch_size=4))
    assert stream.total == 3
    assert isinstance(stream.first[1].x, torch.Tensor)
    _, (x, y, _) = _collect(stream)
    np.testing.assert_array_equal(y, Y)


def test_torch_tensors_become_numpy_on_other_flavours(keras, flavour):
    torch = pytest.importorskip("torch")
    if flavour == "torch":
        pytest.skip("native on torch")
    stream = _stream(keras, flavour, [(torch.from_numpy(X), torch.from_numpy(Y))])
    assert isinstance(stream.first[1].x, np.ndarray)


def test_bad_first_batch_fails_before_the_rest_is_read(keras, flavour):
    pulled = []

    def generator():
        for i in range(3):
            pulled.append(i)
            yield np.ones((4, 5), "float32"), Y[:4]

    with pytest.raises(DataShapeError, match=r"Batch 0 .*\(4, 5\).*Received: x_shape"):
        _stream(keras, flavour, generator())
    assert pulled == [0]


def test_bad_later_batch_names_its_index(keras, flavour):
    batches = [(X[:4], Y[:4]), (X[4:8], Y[4:7]), (X[8:], Y[8:])]
    with pytest.raises(DataShapeError, match="Batch 1 of the data"):
        list(_stream(keras, flavour, batches))
    with pytest.raises(DataShapeError, match="Batch 1 of the data has no y"):
        list(_stream(keras, flavour, [(X[:4], Y[:4]), X[4:]]))


@pytest.mark.parametrize("data, match", [
    (iter([]), "yielded no examples"),
    (42, "data must be"),
    ([(X, Y, SW, SW)], "tuple of 4 items"),
])
def test_unusable_data_raises(keras, flavour, data, match):
    with pytest.raises(InvalidArgumentError, match=match):
        _stream(keras, flavour, data)


def test_batch_size_checks(keras, flavour):
    with pytest.raises(InvalidArgumentError, match="applies only to a tuple of arrays"):
        _stream(keras, flavour, [(X, Y)], batch_size=4)
    for bad in (0, 2.5, True):
        with pytest.raises(InvalidArgumentError, match="positive int"):
            _stream(keras, flavour, (X, Y), batch_size=bad)
    with pytest.raises(DataShapeError, match="share one batch size"):
        _stream(keras, flavour, (X, Y[:5]), batch_size=4)
