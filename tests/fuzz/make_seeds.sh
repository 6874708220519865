#!/usr/bin/env bash
# Writes the seed corpus of every fuzz target into tests/fuzz/corpus/<target>/ (committed; run
# again after a format changes). Inputs that once crashed a target (regression-*) stay. Needs
# protoc and Debian's /usr/bin/python3 (with PIL, numpy and torch).
set -euo pipefail
cd "$(dirname "$0")"
src=../..
out=corpus
mkdir -p "$out"/{fuzz_config,fuzz_fence,fuzz_cifar,fuzz_image,fuzz_coordinator,fuzz_checkpoint,fuzz_pickle,fuzz_npz}

# Configs: the shipped ones and the tests'.
for f in "$src"/configs/*.yaml "$src"/tests/tiny.yaml; do cp "$f" "$out/fuzz_config/$(basename "$f")"; done
printf 'train: {steps: 10, on_divergence: rollback, rollback_lr_scale: 0.5, spike_factor: 3}\n' \
  > "$out/fuzz_config/divergence.yaml"

# Fences.
printf 'ddpm-train attempt fence 1\nattempt 1 began 0\nattempt 2 began 400\nattempt 3\n' > "$out/fuzz_fence/three"
printf 'ddpm-train attempt fence 1\n' > "$out/fuzz_fence/empty_list"

# CIFAR-10: two records as test_batch.bin (first byte even), and as a .tar.gz (odd).
/usr/bin/python3 - "$out/fuzz_cifar" <<'PY'
import io, os, sys, tarfile
out = sys.argv[1]
records = bytes([3]) + bytes(range(256)) * 12 + bytes([7]) + bytes(3072)
open(os.path.join(out, "bin"), "wb").write(b"\x00" + records)
buffer = io.BytesIO()
with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    info = tarfile.TarInfo("cifar-10-batches-bin/test_batch.bin")
    info.size = len(records)
    tar.addfile(info, io.BytesIO(records))
open(os.path.join(out, "targz"), "wb").write(b"\x01" + buffer.getvalue())
PY

# Images: a PNG (first byte 0: .png, RGB), a grey PNG (2), a JPEG (1).
/usr/bin/python3 - "$out/fuzz_image" <<'PY'
import io, os, sys
from PIL import Image
out = sys.argv[1]
def save(name, prefix, image, fmt):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    open(os.path.join(out, name), "wb").write(bytes([prefix]) + buffer.getvalue())
rgb = Image.new("RGB", (20, 12))
rgb.putdata([(x * 12 % 256, y * 20 % 256, 128) for y in range(12) for x in range(20)])
save("rgb_png", 0, rgb, "PNG")
save("grey_png", 2, rgb.convert("L"), "PNG")
save("rgb_jpg", 1, rgb, "JPEG")
PY

# Coordinator requests: the RPC's number, then the message in protobuf's wire format.
encode() {  # NAME NUMBER MESSAGE TEXT
  { printf "\\x$(printf '%02x' "$2")"; printf '%s' "$4" |
    protoc -I "$src/proto" --encode="ddpm.v1.$3" ddpm/v1/control.proto ddpm/v1/worker_gateway.proto; } \
    > "$out/fuzz_coordinator/$1"
}
encode start 0 StartRunRequest 'name: "b" config_yaml: "train: {steps: 5, batch_size: 4}" priority: 2'
encode register 1 RegisterRequest 'group_id: "h" world_size: 1 devices: "cpu"'
encode heartbeat 2 HeartbeatRequest 'group_id: "g" rank: 0 run_id: "r-1" attempt: 1 train_metrics { step: 5 loss: 0.5 rollbacks: 1 }'
encode checkpoint 3 ReportCheckpointRequest 'group_id: "g" run_id: "r-1" attempt: 1 checkpoint { step: 10 path: "/x" }'
encode eval 4 ReportEvalRequest 'group_id: "g" run_id: "r-1" attempt: 1 eval { step: 10 fid: 3.2 }'
encode end 5 ReportRunEndRequest 'group_id: "g" run_id: "r-1" attempt: 1 outcome: COMPLETED step: 100'
encode leave 6 LeaveRequest 'group_id: "g" reason: "bye"'
encode stop 7 StopRunRequest 'run: "r-1" immediate: true'
# A checkpoint of a world of one (the fuzz target's layout: two bytes of manifest length, the
# manifest, the shard), with a float tensor, an int64 counter and a rank's own tensor. xxHash64
# in plain Python, checked against the reference's test vectors.
/usr/bin/python3 - "$out/fuzz_checkpoint" <<'PY'
import json, os, struct, sys
M = 2**64 - 1
P1, P2, P3, P4, P5 = (11400714785074694791, 14029467366897019727, 1609587929392839161,
                      9650029242287828579, 2870177450012600261)
def rotl(x, r): return ((x << r) | (x >> (64 - r))) & M
def rnd(acc, lane): return (rotl((acc + lane * P2) & M, 31) * P1) & M
def merge(acc, v): return (((acc ^ rnd(0, v)) * P1) + P4) & M
def xxh64(data, seed=0):
    n, p = len(data), 0
    u64 = lambda i: struct.unpack_from("<Q", data, i)[0]
    if n >= 32:
        v = [(seed + P1 + P2) & M, (seed + P2) & M, seed, (seed - P1) & M]
        while p + 32 <= n:
            v = [rnd(v[i], u64(p + 8 * i)) for i in range(4)]
            p += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & M
        for x in v: h = merge(h, x)
    else:
        h = (seed + P5) & M
    h = (h + n) & M
    while p + 8 <= n:
        h = (rotl(h ^ rnd(0, u64(p)), 27) * P1 + P4) & M
        p += 8
    if p + 4 <= n:
        h = (rotl(h ^ (struct.unpack_from("<I", data, p)[0] * P1 & M), 23) * P2 + P3) & M
        p += 4
    while p < n:
        h = (rotl(h ^ (data[p] * P5 & M), 11) * P1) & M
        p += 1
    h ^= h >> 33; h = (h * P2) & M; h ^= h >> 29; h = (h * P3) & M; h ^= h >> 32
    return h
assert xxh64(b"") == 0xEF46DB3751D8E999 and xxh64(b"a") == 0xD24EC4F1A98C6E5B
assert xxh64(bytes(range(100))) == xxh64(bytes(range(100)))  # (sanity of the long path)
weights = struct.pack("<6f", *[0.5 * i for i in range(6)])  # "a": float32 [2, 3]
step = struct.pack("<q", 7)                                  # "step": int64 []
body = weights + bytes(64 - len(weights)) + step             # tensors start at multiples of 64
header = b"DDPMSHRD" + struct.pack("<IIII", 2, 0, 1, 0) + struct.pack("<Q", 1)
own = struct.pack("<4B", 1, 2, 3, 4)                         # rank 0's "rng/default": uint8 [4]
own_offset = len(header) + len(body)
shard = header + body + own
manifest = {"format": "ddpm-train sharded checkpoint", "version": 2, "step": 1, "world_size": 1,
            "attempt": 1, "config_hash": "0000000000000000", "data_cursor": {},
            "shards": [{"file": "shard-00000-of-00001", "rank": 0, "bytes": len(shard),
                        "xxh64": "%016x" % xxh64(shard)}],
            "tensors": [{"name": "a", "dtype": "float32", "shape": [2, 3],
                         "pieces": [{"shard": 0, "offset": 32, "begin": 0, "bytes": 24}]},
                        {"name": "step", "dtype": "int64", "shape": [],
                         "pieces": [{"shard": 0, "offset": 32 + 64, "begin": 0, "bytes": 8}]}],
            "ranks": [{"rank": 0, "tensors": [{"name": "rng/default", "dtype": "uint8",
                                               "shape": [4], "offset": own_offset, "bytes": 4}]}]}
text = json.dumps(manifest, indent=1).encode()
open(os.path.join(sys.argv[1], "checkpoint"), "wb").write(struct.pack("<H", len(text)) + text + shard)
PY

# torch.save files as Python writes them (zip; the legacy format, which is refused), and the
# data.pkl alone of several (views, a state_dict with its _metadata, protocol 4, a Parameter,
# LibTorch's type tag), which the target runs without the zip around it.
/usr/bin/python3 - "$out/fuzz_pickle" <<'PY'
import io, os, sys, zipfile, torch
out = sys.argv[1]
def saved(obj, **kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer, **kwargs)
    return buffer.getvalue()
def data_pkl(obj, **kwargs):
    with zipfile.ZipFile(io.BytesIO(saved(obj, **kwargs))) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
tensors = {"a": torch.arange(6.0).reshape(2, 3), "step": torch.tensor(7)}
open(os.path.join(out, "zip"), "wb").write(saved(tensors))
open(os.path.join(out, "legacy"), "wb").write(saved(tensors, _use_new_zipfile_serialization=False))
base = torch.arange(12.0).reshape(3, 4)
views = {"base": base, "t": base.t(), "cols": base[:, 1:3], "row": base[2], "half": base.half(),
         "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 2)}
model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
pickles = {"views.pkl": data_pkl(views),
           "state_dict.pkl": data_pkl(model.state_dict()),
           "protocol4.pkl": data_pkl(views, pickle_protocol=4),
           "parameter.pkl": data_pkl({"w": torch.nn.Parameter(base)})}
# LibTorch's writer wraps the dict in restore_type_tag(dict, 'Dict[str, Tensor]').
body = pickles["views.pkl"][2:-1]
tag = "Dict[str, Tensor]".encode()
pickles["libtorch.pkl"] = (b"\x80\x02ctorch.jit._pickle\nrestore_type_tag\n" + body +
                           b"X" + len(tag).to_bytes(4, "little") + tag + b"\x86R.")
for name, data in pickles.items():
    open(os.path.join(out, name), "wb").write(data)
PY

# FID statistics as numpy writes them, stored and deflated.
/usr/bin/python3 - "$out/fuzz_npz" <<'PY'
import os, sys, numpy
mu, sigma = numpy.arange(4.0), numpy.eye(4) * 2
numpy.savez(os.path.join(sys.argv[1], "stored.npz"), mu=mu, sigma=sigma)
numpy.savez_compressed(os.path.join(sys.argv[1], "deflated.npz"), mu=mu.astype(numpy.float32),
                       sigma=numpy.asfortranarray(sigma))
PY
ls "$out"/* | wc -l
