"""gradkit.save / gradkit.load: exact round trips, atomic writes, no pickle, clear errors."""

from __future__ import annotations

import os
import pickle
import zipfile

import numpy as np
import pytest

import gradkit as gk

GRADS = {
    "outer/encoder/dense/kernel": np.arange(6, dtype="float32").reshape(2, 3),
    "outer/encoder/dense/bias": np.array([1.5, -2.0], "float64"),
    "head/kernel#1": np.array([[np.float16(0.1)]], "float16"),
    "file": np.zeros((0, 4), "float32"),  # a key np.savez would take for its own argument
    "allow_pickle": np.array(3, "int64"),  # likewise, and a 0-d array
    "ünïcode kéy": np.array([True, False]),
}


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert b[key].dtype == a[key].dtype, key
        assert b[key].shape == a[key].shape, key
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def test_round_trip_keys_order_dtypes(tmp_path):
    written = gk.save(tmp_path / "g.npz", GRADS)
    assert written == tmp_path / "g.npz"
    _same(GRADS, gk.load(written))


def test_suffix_is_added(tmp_path):
    written = gk.save(tmp_path / "grads", GRADS)
    assert written.name == "grads.npz" and written.is_file()
    _same(GRADS, gk.load(written))
    # another suffix is refused, never written as g.txt.npz
    with pytest.raises(gk.InvalidArgumentError, match=r"Name the file 'g.npz'.*Received: path="):
        gk.save(tmp_path / "g.txt", GRADS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grads.npz"]


def test_files_are_plain_npz(tmp_path):
    written = gk.save(tmp_path / "g.npz", GRADS)
    with np.load(written, allow_pickle=False) as data:
        assert data.files == list(GRADS)


def test_round_trip_of_real_gradients(tmp_path, keras):
    inputs = keras.Input((3,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(inputs))
    model.compile(loss="mse")
    grads = gk.gradients(model, np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
    _same(grads, gk.load(gk.save(tmp_path / "real.npz", grads)))


def test_none_entry_is_refused(tmp_path):
    with pytest.raises(gk.InvalidArgumentError, match=r"'b/kernel' is None.*Received: key="):
        gk.save(tmp_path / "g.npz", {"a/kernel": np.ones(2), "b/kernel": None})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [[np.ones(2)], {1: np.ones(2)}, {"a": np.array([object()])}])
def test_not_a_gradient_dict_is_refused(tmp_path, bad):
    with pytest.raises(gk.InvalidArgumentError, match=r"Received: "):
        gk.save(tmp_path / "g.npz", bad)


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = gk.save(tmp_path / "g.npz", {"old": np.ones(3)})
    before = target.read_bytes()
    calls = []
    original = np.lib.format.write_array

    def failing_write(member, array, allow_pickle=False):
        calls.append(array)
        if len(calls) == 2:  # fail half-way through the archive
            raise OSError(28, "No space left on device")
        original(member, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(np.lib.format, "write_array", failing_write)
    with pytest.raises(gk.GradkitFileError, match=r"No space left.*Received: path="):
        gk.save(target, GRADS)
    assert len(calls) == 2
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(os.listdir(tmp_path)) == ["g.npz"]  # no temporary file left behind


def test_interrupted_write_cleans_up(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np.lib.format, "write_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gk.save(tmp_path / "g.npz", GRADS)
    assert not list(tmp_path.iterdir())


def test_missing_folder_and_folder_as_path(tmp_path):
    with pytest.raises(gk.GradkitFileError, match=r"does not exist.*Received: path="):
        gk.save(tmp_path / "nowhere" / "g.npz", GRADS)
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(gk.GradkitFileError, match=r"is a folder.*Received: path="):
        gk.save(tmp_path / "dir.npz", GRADS)
    (tmp_path / "out").mkdir()  # a folder as the path: refused, not written as out.npz
    with pytest.raises(gk.GradkitFileError, match=r"is a folder.*out/gradients.npz"):
        gk.save(tmp_path / "out", GRADS)
    assert sorted(os.listdir(tmp_path)) == ["dir.npz", "out"]


def test_missing_file(tmp_path):
    with pytest.raises(gk.GradkitFileError, match=r"No gradient file.*Received: path=") as info:
        gk.load(tmp_path / "absent.npz")
    assert isinstance(info.value, OSError)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04broken"])
def test_corrupt_file(tmp_path, content):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(gk.GradkitFileError, match=r"not a readable \.npz.*Received: path="):
        gk.load(path)


def test_truncated_file(tmp_path):
    path = gk.save(tmp_path / "g.npz", GRADS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(gk.GradkitFileError, match=r"Received: path="):
        gk.load(path)


def test_damaged_member_is_detected(tmp_path):
    path = gk.save(tmp_path / "g.npz", {"a": np.arange(100, dtype="float32")})
    data = bytearray(path.read_bytes())
    data[200] ^= 0xFF  # inside the array's bytes: the zip CRC no longer matches
    path.write_bytes(bytes(data))
    with pytest.raises(gk.GradkitFileError, match=r"Received: path="):
        gk.load(path)


def test_plain_npy_file_is_refused(tmp_path):
    path = tmp_path / "single.npz"
    with open(path, "wb") as handle:
        np.save(handle, np.ones(3))
    with pytest.raises(gk.GradkitFileError, match=r"not a readable \.npz"):
        gk.load(path)


class _Boom:
    def __reduce__(self):  # would run on unpickling
        return (os.system, ("echo should-never-run",))


def test_pickle_is_never_loaded(tmp_path, monkeypatch):
    npz = tmp_path / "objects.npz"
    np.savez(npz, a=np.array([_Boom()], dtype=object))
    raw = tmp_path / "raw.npz"
    raw.write_bytes(pickle.dumps({"a": _Boom()}))
    ran = []
    monkeypatch.setattr(os, "system", lambda *a: ran.append(a))
    with pytest.raises(gk.GradkitFileError, match=r"pickled objects, which gradkit never"):
        gk.load(npz)
    with pytest.raises(gk.GradkitFileError):
        gk.load(raw)
    assert ran == []
    with zipfile.ZipFile(gk.save(tmp_path / "ok.npz", GRADS)) as archive:
        assert all(name.endswith(".npy") for name in archive.namelist())
