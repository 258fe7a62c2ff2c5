#!/usr/bin/env python3
"""Writes tests/data/torch/expanded.pth: a NestedUNet-named state dict whose tensors are
`expand`ed views (stride 0) of one 4-byte storage, as `torch.save(t.expand(...))` writes them.
The pickle declares 6.8 GiB of tensors over a 1 KB file; tests/validation.rs checks that import
refuses it before reading. Needs no torch: the pickle names torch's rebuild function and
storage class through stand-in modules, which is all `torch.load` (and burn's reader) look at.

    python3 scripts/bad_pth.py tests/data/torch/expanded.pth
"""
import collections
import io
import pickle
import sys
import types
import zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")
sys.modules["torch"], sys.modules["torch._utils"] = torch, utils


class FloatStorage:
    pass


FloatStorage.__module__ = "torch"
torch.FloatStorage = FloatStorage


def _rebuild_tensor_v2(*args):
    pass


_rebuild_tensor_v2.__module__ = "torch._utils"
utils._rebuild_tensor_v2 = _rebuild_tensor_v2


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class Expanded:
    """A tensor of `size` over element 0 of `storage`: every stride 0."""

    def __init__(self, storage, size):
        self.storage, self.size = storage, size

    def __reduce__(self):
        stride = tuple(0 for _ in self.size)
        return (_rebuild_tensor_v2, (self.storage, 0, self.size, stride, False, collections.OrderedDict()))


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


def main(out):
    one = Storage("0", 1)
    # Width 8192 over one input channel: the second conv declares 2.25 GiB, conv1_0's first
    # 4.5 GiB (each under the reader's own 10 GiB per-tensor ceiling), 6.8 GiB in all.
    w = 1 << 13
    state = collections.OrderedDict(
        [
            ("conv0_0.conv1.weight", Expanded(one, (w, 1, 3, 3))),
            ("conv0_0.conv2.weight", Expanded(one, (w, w, 3, 3))),
            ("conv1_0.conv1.weight", Expanded(one, (2 * w, w, 3, 3))),
            ("final.weight", Expanded(one, (1, w, 1, 1))),
        ]
    )
    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(state)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("expanded/data.pkl", buf.getvalue())
        z.writestr("expanded/byteorder", "little")
        z.writestr("expanded/data/0", b"\x00\x00\x80\x3f")
        z.writestr("expanded/version", "3\n")


if __name__ == "__main__":
    main(sys.argv[1])
