"""Tensor bundle reader and writer: the Python side of tests/reference/bundle.h (the format is documented there).

A bundle is an ordered mapping name -> numpy array of dtype float32, int32 or float64. Needs only numpy, so any
Python with numpy can read and write what Loom's C++ tests exchange with the PyTorch reference.

    write(path, {"w": np.ones((2, 3), np.float32), "loss": np.array([1.5])})
    tensors = read(path)   # dict, in file order
"""

import struct

import numpy as np

MAGIC = b"LOOMBNDL"
VERSION = 1
# dtype code in the file <-> little-endian numpy dtype.
_CODE_TO_DTYPE = {0: np.dtype("<f4"), 1: np.dtype("<i4"), 2: np.dtype("<f8")}
_DTYPE_TO_CODE = {np.dtype(np.float32): 0, np.dtype(np.int32): 1, np.dtype(np.float64): 2}


class BundleError(ValueError):
    """A file that is not a valid bundle, or a tensor that cannot be stored in one."""


def write(path, tensors):
    """Writes tensors (a mapping or an iterable of (name, array) pairs) to path, in the given order.

    Arrays must be float32, int32 or float64 (convert first: the format has no other types, and silently
    narrowing an int64 or a float64 would hide mistakes)."""
    items = list(tensors.items()) if hasattr(tensors, "items") else list(tensors)
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise BundleError(f"bundle {path}: duplicate tensor names")
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<II", VERSION, len(items)))
        for name, array in items:
            array = np.asarray(array)
            code = _DTYPE_TO_CODE.get(array.dtype.newbyteorder("="))
            if code is None:
                raise BundleError(f"bundle {path}: tensor '{name}' has dtype {array.dtype}; "
                                  "expected float32, int32 or float64")
            encoded = name.encode("utf-8")
            f.write(struct.pack("<I", len(encoded)))
            f.write(encoded)
            f.write(struct.pack("<II", code, array.ndim))
            f.write(struct.pack(f"<{array.ndim}q", *array.shape))
            f.write(np.ascontiguousarray(array, dtype=_CODE_TO_DTYPE[code]).tobytes())


def read(path):
    """Returns the bundle at path as a dict name -> numpy array, in file order. Raises BundleError when the
    file is truncated or malformed."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(n, what):
        nonlocal pos
        if n > len(data) - pos:
            raise BundleError(f"bundle {path} is truncated: reading {what} needs {n} bytes at offset {pos}, "
                              f"only {len(data) - pos} left")
        chunk = data[pos:pos + n]
        pos += n
        return chunk

    if take(8, "the magic") != MAGIC:
        raise BundleError(f"{path} is not a tensor bundle (magic is not {MAGIC!r})")
    version, count = struct.unpack("<II", take(8, "the header"))
    if version != VERSION:
        raise BundleError(f"bundle {path} has version {version}, expected {VERSION}")
    tensors = {}
    for _ in range(count):
        (name_len,) = struct.unpack("<I", take(4, "a name length"))
        name = take(name_len, "a tensor name").decode("utf-8")
        code, ndim = struct.unpack("<II", take(8, "a dtype and rank"))
        if code not in _CODE_TO_DTYPE:
            raise BundleError(f"bundle {path}: tensor '{name}' has dtype code {code}, expected 0, 1 or 2")
        shape = struct.unpack(f"<{ndim}q", take(8 * ndim, "the dimensions"))
        if any(d < 0 for d in shape):
            raise BundleError(f"bundle {path}: tensor '{name}' has a negative dimension in {shape}")
        dtype = _CODE_TO_DTYPE[code]
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        raw = take(numel * dtype.itemsize, f"the data of '{name}'")
        if name in tensors:
            raise BundleError(f"bundle {path} holds '{name}' twice")
        tensors[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if pos != len(data):
        raise BundleError(f"bundle {path} has {len(data) - pos} unexpected bytes after its {count} tensors")
    return tensors
