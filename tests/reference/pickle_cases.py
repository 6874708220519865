"""torch.save files for the C++ unpickler's tests (tests/tensor_io_test.cc), written by PyTorch.

usage: pickle_cases.py OUT_DIR

Writes good files (every dtype, views that share a storage, non-contiguous strides, offsets,
0-d and empty tensors, nn.Parameter, a module's state_dict with its _metadata, protocol 4) with
their expected contents in OUT_DIR/expected.json (each tensor's dtype, shape and values in
float64, as PyTorch reads them back), and bad files whose refusal the test checks by name.
"""
import collections
import io
import json
import os
import pickle
import sys
import zipfile

import torch

out = sys.argv[1]
os.makedirs(out, exist_ok=True)
torch.manual_seed(0)
expected = {}


def save(name, obj, **kwargs):
    path = os.path.join(out, name)
    torch.save(obj, path, **kwargs)
    return path


def record(name, path):
    # What PyTorch itself reads back is the expected value: dtype, shape, values.
    loaded = torch.load(path)
    expected[name] = {
        key: {
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
            "values": t.detach().to(torch.complex128).view(torch.float64).flatten().tolist()
            if t.is_complex() else t.detach().to(torch.float64).flatten().tolist(),
        }
        for key, t in loaded.items()
    }


base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
tensors = {
    "float": torch.randn(3, 5),
    "double": torch.randn(4, dtype=torch.float64),
    "half": torch.randn(2, 3).half(),
    "bfloat16": torch.randn(5).bfloat16(),
    "int64": torch.tensor([-(2**40), -1, 0, 7, 2**62]),
    "int32": torch.tensor([-5, 2**31 - 1], dtype=torch.int32),
    "int16": torch.tensor([-300, 300], dtype=torch.int16),
    "int8": torch.tensor([-128, 127], dtype=torch.int8),
    "uint8": torch.tensor([0, 200, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "complex64": torch.tensor([1 + 2j, -3.5j], dtype=torch.complex64),
    "scalar": torch.tensor(3.25),
    "empty": torch.zeros(0, 3),
    # Views of one storage: pickled once, with offsets and strides.
    "view_whole": base,
    "view_transposed": base.t(),
    "view_columns": base[:, 2:5],
    "view_strided": base[1::2, ::3],
    "view_row": base[3],
    "view_expand": torch.ones(1, 3).expand(4, 3),
}
record("dtypes_and_views.pt", save("dtypes_and_views.pt", tensors))
record("protocol4.pt", save("protocol4.pt", {"a": base, "b": base[2]}, pickle_protocol=4))
record("parameter.pt", save("parameter.pt", {"weight": torch.nn.Parameter(torch.randn(2, 2))}))
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 3))
record("state_dict.pt", save("state_dict.pt", model.state_dict()))

# Refused, each for a reason the test names.
save("legacy.pt", {"a": base}, _use_new_zipfile_serialization=False)
save("nested.pt", {"model": {"w": base}})
save("list.pt", [base])
save("not_tensor.pt", {"step": 3})
save("int_key.pt", {3: base})
with open(os.path.join(out, "truncated.pt"), "wb") as f:
    f.write(open(os.path.join(out, "dtypes_and_views.pt"), "rb").read()[:700])


def rewrite(source, target, change):
    """Copies the zip source to target, change(name, bytes) giving each member's new bytes
    (None drops it), plus any extra members change.extra holds."""
    with zipfile.ZipFile(os.path.join(out, source)) as zin, \
            zipfile.ZipFile(os.path.join(out, target), "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
        for name, data in getattr(change, "extra", {}).items():
            zout.writestr(name, data)


save("small.pt", {"a": torch.arange(12, dtype=torch.float32)})
prefix = "small/"
rewrite("small.pt", "short_record.pt",
        lambda name, data: data[:8] if name == prefix + "data/0" else data)
rewrite("small.pt", "missing_record.pt",
        lambda name, data: None if name == prefix + "data/0" else data)


def big_endian(name, data):
    return data


big_endian.extra = {prefix + "byteorder": b"big"}
rewrite("small.pt", "big_endian.pt", big_endian)
rewrite("small.pt", "bad_pickle.pt",  # without its final STOP
        lambda name, data: data[:-1] if name == prefix + "data.pkl" else data)


class Persisting(pickle.Pickler):
    """torch.save's pickler in miniature: storages become persistent ids."""

    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return ("storage", obj.type, obj.key, "cpu", obj.numel)
        return None


class StorageRef:
    def __init__(self, type_, key, numel):
        self.type, self.key, self.numel = type_, key, numel


class HandTensor:
    """A tensor record with any size and stride, as torch.save would write it."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class Evil:
    """The classic malicious pickle: loading it runs a shell command in Python."""

    def __reduce__(self):
        return (os.system, ("touch " + os.path.join(out, "evil_ran"),))


def hand_zip(name, obj, records):
    buffer = io.BytesIO()
    Persisting(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(os.path.join(out, name), "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        for key, data in records.items():
            z.writestr("archive/data/" + key, data)
        z.writestr("archive/version", b"3\n")


four_floats = torch.arange(4, dtype=torch.float32).numpy().tobytes()
storage = StorageRef(torch.FloatStorage, "0", 4)
hand_zip("hand_good.pt", {"x": HandTensor(storage, 1, (3,), (1,))}, {"0": four_floats})
hand_zip("view_past_end.pt", {"x": HandTensor(storage, 1, (2, 2), (2, 1))}, {"0": four_floats})
hand_zip("offset_past_end.pt", {"x": HandTensor(storage, 9, (0,), (1,))}, {"0": four_floats})
hand_zip("bad_bool.pt", {"x": HandTensor(StorageRef(torch.BoolStorage, "0", 2), 0, (2,), (1,))},
         {"0": b"\x01\x02"})
hand_zip("evil.pt", {"x": Evil()}, {})
expected["hand_good.pt"] = {"x": {"dtype": "float32", "shape": [3], "values": [1.0, 2.0, 3.0]}}

with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(expected, f)
