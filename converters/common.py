"""Shared PyTorch <-> cgjax weight-conversion engine (one rule table, both directions).

Reading: :func:`read_tensors` gives a lazy ``name -> LazyTensor`` mapping over a
``.safetensors`` file, a checkpoint directory (single or sharded safetensors, open_clip hub
files, ``pytorch_model.bin``), a ``.pt``/``.bin`` state dict, a dict of tensors or a live
``torch.nn.Module``. Nothing is read until ``LazyTensor.load()``; bf16 is returned as float32.

Rules: a table of :class:`Rule` ``(torch_pattern, nnx_template, transform)``.

* ``torch_pattern`` is a regex made of literal text (``.`` or ``\\.``) and ``(\\d+)`` groups,
  e.g. ``r"visual\\.transformer\\.resblocks\\.(\\d+)\\.attn\\.in_proj_weight"``. It is matched in
  full against torch keys; for export the groups are substituted back.
* ``nnx_template`` is a dotted NNX state path with an optional numpy-style index of ints,
  ``{i}`` placeholders (the i-th regex group, as int) and ``:``. ``"blocks.attn.qkv.kernel[{0}]"``
  puts the tensor at index ``layer`` of the leading (stacked, ``nnx.vmap``'d) ``layers`` axis;
  ``"blocks.attn.qkv.kernel[{0},:,1]"`` fills the ``k`` slot of a fused ``[L, D, 3, H, hd]``
  kernel. Placeholders may also appear in the path (``"layers.{0}.w"``). A tuple of templates
  takes a :class:`Split` transform (one fused torch tensor -> several NNX params); ``None``
  ignores the torch key.
* ``transform`` maps the torch tensor to the NNX sub-array (``to_nnx``) and back
  (``to_torch``): :data:`IDENTITY`, :class:`Linear` (``[out, in]`` -> ``[in..., out...]``,
  reshaping into heads), :class:`Reshape` (flat -> any shape, e.g. bias into heads),
  :class:`Conv2d` (OIHW -> HWIO), :class:`Transpose`, :class:`Split`.

:func:`load_state` fills an abstract NNX state (``nnx.eval_shape``), placing each parameter
straight into its sharding; :func:`export_state` is the inverse; :func:`save_safetensors`
writes single or sharded files atomically.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import struct
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from flax import nnx

from cgjax import persistence, quantize, sharding as shd

# --------------------------------------------------------------------------------------
# Reading tensors lazily
# --------------------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _to_numpy(t) -> np.ndarray:
    """torch tensor / numpy array -> numpy; bf16 (and other non-numpy floats) -> float32."""
    if isinstance(t, np.ndarray):
        if t.dtype.kind == "V" or str(t.dtype) in ("bfloat16",) or t.dtype.name.startswith("float8"):
            return t.astype(np.float32)
        return t
    import torch  # optional [torch] extra

    t = t.detach()
    if t.dtype in (torch.bfloat16,) or "float8" in str(t.dtype):
        t = t.float()
    return t.cpu().numpy()


class LazyTensor:
    """A tensor not read yet: ``shape``, ``dtype`` (a string such as ``"F32"``/``"BF16"``) and
    ``load() -> np.ndarray`` (bf16 comes back as float32)."""

    def __init__(self, name: str, shape: Sequence[int], dtype: str, loader: Callable[[], np.ndarray], origin: str):
        self.name, self.shape, self.dtype, self._loader, self.origin = name, tuple(int(s) for s in shape), dtype, loader, origin

    def load(self) -> np.ndarray:
        arr = self._loader()
        if tuple(arr.shape) != self.shape:
            raise ValueError(f"{self.origin}: tensor {self.name!r} has shape {arr.shape}, header says {self.shape}")
        return arr

    __call__ = load

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={self.shape}, dtype={self.dtype}, from={self.origin})"


class TensorStore(Mapping):
    """Lazy read-only mapping ``name -> LazyTensor``."""

    def __init__(self, entries: dict[str, LazyTensor], origin: str):
        self._entries, self.origin = entries, origin

    def __getitem__(self, name: str) -> LazyTensor:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.origin}: no tensor named {name!r}") from None

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self, name: str) -> np.ndarray:
        return self[name].load()

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Read everything (small checkpoints / tests)."""
        return {k: v.load() for k, v in self._entries.items()}


def _safetensors_entries(path: str) -> dict[str, LazyTensor]:
    """Entries of one ``.safetensors`` file, read tensor by tensor."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
    base = 8 + n
    entries = {}
    handle: dict[str, Any] = {}

    def opened():
        if "f" not in handle:
            handle["f"] = safe_open(path, framework="np")
        return handle["f"]

    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dt in _ST_DTYPES:
            loader = (lambda name=name: np.asarray(opened().get_tensor(name)))
        elif dt == "BF16":
            def loader(shape=shape, start=start, end=end):
                mm = np.memmap(path, dtype=np.uint8, mode="r", offset=base + start, shape=(end - start,))
                return np.asarray(mm).view(ml_dtypes.bfloat16).reshape(shape).astype(np.float32)
        else:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dt}")
        entries[name] = LazyTensor(name, shape, dt, loader, path)
    return entries


_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32"}


def _torch_entries(sd: Mapping[str, Any], origin: str) -> dict[str, LazyTensor]:
    entries = {}
    for name, t in sd.items():
        if not hasattr(t, "shape"):
            continue  # e.g. an int (``num_batches_tracked`` stored as python int) or metadata
        dt = str(getattr(t, "dtype", "")).replace("torch.", "")
        dt = _DTYPE_CODES.get(dt, dt)
        entries[name] = LazyTensor(name, tuple(t.shape), dt, (lambda t=t: _to_numpy(t)), origin)
    return entries


def _unwrap_state_dict(sd: Any, origin: str) -> Mapping[str, Any]:
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{origin}: expected a state dict (mapping of tensors), got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


_DIR_CANDIDATES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "open_clip_model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
)


def read_tensors(src: Any) -> TensorStore:
    """Lazy ``name -> LazyTensor`` mapping over a checkpoint.

    ``src``: a ``.safetensors`` file; a ``*.safetensors.index.json`` / ``*.bin.index.json``;
    a directory holding one of ``model.safetensors(.index.json)``, ``open_clip_model.safetensors``,
    ``pytorch_model.bin(.index.json)``, ``open_clip_pytorch_model.bin``; a ``.pt``/``.bin``/``.pth``
    state dict (``torch.load(weights_only=True, mmap=True)``; a ``{"state_dict": ...}`` wrapper
    and a ``module.`` prefix are removed); a dict of torch tensors / numpy arrays; a
    ``torch.nn.Module`` (its ``state_dict()``); or a ``TensorStore`` (returned as is)."""
    if isinstance(src, TensorStore):
        return src
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if os.path.isdir(path):
            for cand in _DIR_CANDIDATES:
                if os.path.exists(os.path.join(path, cand)):
                    return read_tensors(os.path.join(path, cand))
            raise FileNotFoundError(f"{path}: no checkpoint found (looked for {', '.join(_DIR_CANDIDATES)})")
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {path!r} does not exist")
        if path.endswith(".index.json"):
            with open(path) as f:
                index = json.load(f)
            if "weight_map" not in index:
                raise ValueError(f"{path}: sharded index has no 'weight_map'")
            folder = os.path.dirname(path)
            entries: dict[str, LazyTensor] = {}
            shards: dict[str, dict[str, LazyTensor]] = {}
            for name, fname in index["weight_map"].items():
                if fname not in shards:
                    fpath = os.path.join(folder, fname)
                    if not os.path.exists(fpath):
                        raise FileNotFoundError(f"{path}: shard {fname!r} (holding {name!r}) is missing")
                    shards[fname] = dict(read_tensors(fpath)._entries)
                if name not in shards[fname]:
                    raise KeyError(f"{path}: {name!r} is mapped to {fname!r}, which does not contain it")
                entries[name] = shards[fname][name]
            return TensorStore(entries, path)
        if path.endswith(".safetensors"):
            return TensorStore(_safetensors_entries(path), path)
        import torch  # optional [torch] extra

        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zipfile checkpoint -> no mmap
            sd = torch.load(path, map_location="cpu", weights_only=True)
        return TensorStore(_torch_entries(_unwrap_state_dict(sd, path), path), path)
    if hasattr(src, "state_dict") and callable(src.state_dict):
        return TensorStore(_torch_entries(src.state_dict(), type(src).__name__), type(src).__name__)
    if isinstance(src, Mapping):
        return TensorStore(_torch_entries(_unwrap_state_dict(src, "<dict>"), "<dict>"), "<dict>")
    raise TypeError(f"cannot read tensors from {type(src).__name__}")


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------


class Transform:
    """torch tensor <-> NNX sub-array. ``nnx_shape`` is the shape of the target sub-array."""

    def to_nnx(self, x: np.ndarray, nnx_shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError

    def to_torch(self, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def torch_shape(self, nnx_shape: tuple[int, ...]) -> tuple[int, ...]:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Identity(Transform):
    def to_nnx(self, x, nnx_shape):
        return x

    def to_torch(self, y):
        return y

    def torch_shape(self, nnx_shape):
        return tuple(nnx_shape)


IDENTITY = Identity()


@dataclasses.dataclass(frozen=True)
class Reshape(Transform):
    """torch ``[prod(shape)]`` <-> NNX ``shape`` (e.g. a bias ``[H*hd]`` <-> ``[H, hd]``);
    with ``keep=k`` the first k axes are kept: torch ``[A, B*C]`` <-> NNX ``[A, B, C]``."""

    keep: int = 0

    def to_nnx(self, x, nnx_shape):
        return x.reshape(nnx_shape)

    def to_torch(self, y):
        return y.reshape(y.shape[: self.keep] + (-1,))

    def torch_shape(self, nnx_shape):
        return tuple(nnx_shape[: self.keep]) + (math.prod(nnx_shape[self.keep:]),)


@dataclasses.dataclass(frozen=True)
class Linear(Transform):
    """torch ``nn.Linear`` weight ``[out, in]`` <-> NNX kernel ``[*in_dims, *out_dims]``, the
    first ``in_axes`` NNX axes being the input (e.g. q kernel ``[D, H, hd]``: ``in_axes=1``;
    out-proj kernel ``[H, hd, D]``: ``in_axes=2``)."""

    in_axes: int = 1

    def to_nnx(self, x, nnx_shape):
        return x.T.reshape(nnx_shape)

    def to_torch(self, y):
        return y.reshape(math.prod(y.shape[: self.in_axes]), -1).T

    def torch_shape(self, nnx_shape):
        return (math.prod(nnx_shape[self.in_axes:]), math.prod(nnx_shape[: self.in_axes]))


@dataclasses.dataclass(frozen=True)
class Transpose(Transform):
    """``to_nnx = x.transpose(perm)``."""

    perm: tuple[int, ...]

    def to_nnx(self, x, nnx_shape):
        return x.transpose(self.perm)

    def to_torch(self, y):
        return y.transpose(np.argsort(self.perm))

    def torch_shape(self, nnx_shape):
        inv = np.argsort(self.perm)
        return tuple(int(nnx_shape[i]) for i in inv)


def Conv2d() -> Transpose:  # noqa: N802 (reads like a transform class)
    """torch conv weight OIHW <-> NNX HWIO."""
    return Transpose((2, 3, 1, 0))


@dataclasses.dataclass(frozen=True)
class Split(Transform):
    """One fused torch tensor <-> ``n`` NNX arrays, split along torch ``axis`` and each mapped
    by ``inner`` (e.g. open_clip ``in_proj_weight [3D, D]`` -> q, k, v kernels:
    ``Split(3, 0, Linear(1))``). Used with a tuple of ``n`` NNX templates."""

    n: int
    axis: int = 0
    inner: Transform = IDENTITY

    def to_nnx(self, x, nnx_shapes):
        parts = np.split(x, self.n, axis=self.axis)
        return tuple(self.inner.to_nnx(p, s) for p, s in zip(parts, nnx_shapes))

    def to_torch(self, ys):
        return np.concatenate([self.inner.to_torch(y) for y in ys], axis=self.axis)

    def torch_shape(self, nnx_shapes):
        shapes = [self.inner.torch_shape(s) for s in nnx_shapes]
        out = list(shapes[0])
        out[self.axis] = sum(s[self.axis] for s in shapes)
        return tuple(out)


# --------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------

_GROUP = r"(\d+)"
_META = set("*+?[]{}()|^$")


def _check_pattern(pattern: str) -> int:
    """Validate a torch pattern (literal text + ``(\\d+)`` groups); return the group count."""
    rest = pattern.replace(_GROUP, "").replace("\\.", "").replace("\\_", "")
    bad = sorted(set(rest) & _META)
    if bad:
        raise ValueError(f"torch pattern {pattern!r}: only literal text and (\\d+) groups are supported (found {bad})")
    return pattern.count(_GROUP)


def _torch_name(pattern: str, groups: Sequence[int]) -> str:
    parts = pattern.split(_GROUP)
    out = parts[0]
    for g, p in zip(groups, parts[1:]):
        out += str(g) + p
    return re.sub(r"\\(.)", r"\1", out)


@dataclasses.dataclass(frozen=True)
class _Template:
    """Parsed NNX template: path parts (str or group number) and index items (int, group
    number as ``("g", i)``, or ``None`` for ``:``)."""

    text: str
    path: tuple[Any, ...]
    index: tuple[Any, ...]

    @staticmethod
    def parse(text: str) -> "_Template":
        m = re.fullmatch(r"([^\[\]]+)(?:\[([^\]]*)\])?", text.strip())
        if not m:
            raise ValueError(f"bad NNX template {text!r}")
        path = []
        for part in m.group(1).split("."):
            g = re.fullmatch(r"\{(\d+)\}", part)
            path.append(("g", int(g.group(1))) if g else part)
        index = []
        if m.group(2) is not None:
            for item in m.group(2).split(","):
                item = item.strip()
                g = re.fullmatch(r"\{(\d+)\}", item)
                if g:
                    index.append(("g", int(g.group(1))))
                elif item == ":":
                    index.append(None)
                elif re.fullmatch(r"-?\d+", item):
                    index.append(int(item))
                else:
                    raise ValueError(f"NNX template {text!r}: index item {item!r} is not an int, {{i}} or ':'")
        return _Template(text, tuple(path), tuple(index))

    def path_str(self, groups: Sequence[int]) -> str:
        return ".".join(str(groups[p[1]]) if isinstance(p, tuple) else p for p in self.path)

    def path_regex(self) -> re.Pattern:
        return re.compile(r"\.".join(r"(\d+)" if isinstance(p, tuple) else re.escape(p) for p in self.path))

    def path_groups(self) -> list[int]:
        return [p[1] for p in self.path if isinstance(p, tuple)]

    def resolve_index(self, groups: Sequence[int]) -> tuple[Any, ...]:
        """Index as a tuple of ints / ``slice(None)``."""
        return tuple(slice(None) if i is None else groups[i[1]] if isinstance(i, tuple) else i for i in self.index)


@dataclasses.dataclass(frozen=True)
class Rule:
    """``torch`` regex (literal text + ``(\\d+)`` groups), ``nnx`` template(s) (``None``:
    ignore the torch key), ``transform`` (default identity)."""

    torch: str
    nnx: str | tuple[str, ...] | None
    transform: Transform = IDENTITY

    def __post_init__(self):
        n = _check_pattern(self.torch)
        object.__setattr__(self, "_regex", re.compile(self.torch))
        object.__setattr__(self, "_ngroups", n)
        templates = () if self.nnx is None else (self.nnx,) if isinstance(self.nnx, str) else tuple(self.nnx)
        parsed = tuple(_Template.parse(t) for t in templates)
        for t in parsed:
            used = [p[1] for p in t.path + t.index if isinstance(p, tuple)]
            if any(u >= n for u in used):
                raise ValueError(f"rule {self.torch!r} -> {t.text!r}: placeholder beyond the {n} regex group(s)")
        if len(parsed) > 1 and not isinstance(self.transform, Split):
            raise ValueError(f"rule {self.torch!r}: several NNX templates need a Split transform")
        if isinstance(self.transform, Split) and len(parsed) != self.transform.n:
            raise ValueError(f"rule {self.torch!r}: Split({self.transform.n}) needs {self.transform.n} NNX templates")
        object.__setattr__(self, "_templates", parsed)

    def match(self, key: str) -> tuple[int, ...] | None:
        m = self._regex.fullmatch(key)
        return None if m is None else tuple(int(g) for g in m.groups())

    def torch_key(self, groups: Sequence[int]) -> str:
        return _torch_name(self.torch, groups)


def as_rules(rules: Iterable[Rule | tuple]) -> list[Rule]:
    """Accept ``Rule`` objects or plain ``(torch, nnx[, transform])`` tuples."""
    return [r if isinstance(r, Rule) else Rule(*r) for r in rules]


def prefixed(rules: Iterable[Rule | tuple], torch_prefix: str = "", nnx_prefix: str = "") -> list[Rule]:
    """The same rules with a literal prefix on the torch keys and/or NNX paths."""
    tp = re.escape(torch_prefix)
    out = []
    for r in as_rules(rules):
        nnx_t = r.nnx
        if nnx_prefix and nnx_t is not None:
            nnx_t = tuple(nnx_prefix + t for t in ((nnx_t,) if isinstance(nnx_t, str) else nnx_t))
            nnx_t = nnx_t[0] if isinstance(r.nnx, str) else nnx_t
        out.append(Rule(tp + r.torch, nnx_t, r.transform))
    return out


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _sub_shape(shape: tuple[int, ...], index: tuple[Any, ...], what: str) -> tuple[int, ...]:
    if len(index) > len(shape):
        raise ValueError(f"{what}: index {index} has more items than the parameter's rank {len(shape)}")
    out = []
    for i, s in enumerate(shape):
        item = index[i] if i < len(index) else slice(None)
        if isinstance(item, int):
            if not -s <= item < s:
                raise ValueError(f"{what}: index {item} is out of range for axis {i} of size {s} (shape {shape})")
        else:
            out.append(s)
    return tuple(out)


@dataclasses.dataclass
class _Piece:
    key: str  # torch key
    slot: int  # which output of the transform
    index: tuple[Any, ...]  # normalised: one item per param axis (int or slice(None))


def _plan(flat: dict[str, Any], tensors: Mapping[str, LazyTensor], rules: list[Rule]):
    """Map every torch key to its NNX targets, checking names and shapes (no data read)."""
    pieces: dict[str, list[_Piece]] = {p: [] for p in flat}
    jobs: dict[str, tuple[Rule, tuple[int, ...], list[tuple[str, tuple]]]] = {}
    unexpected = []
    for key in tensors:
        for rule in rules:
            groups = rule.match(key)
            if groups is not None:
                break
        else:
            unexpected.append(key)
            continue
        if not rule._templates:
            continue  # ignored
        targets, shapes = [], []
        for slot, t in enumerate(rule._templates):
            path = t.path_str(groups)
            if path not in flat:
                raise KeyError(f"torch key {key!r} maps (rule {rule.torch!r}) to NNX path {path!r}, which the model does not have")
            shape = tuple(np.shape(flat[path].get_value()))
            idx = t.resolve_index(groups)
            sub = _sub_shape(shape, idx, f"torch key {key!r} -> {path}")
            idx = tuple(i % shape[a] if isinstance(i, int) else i for a, i in enumerate(idx))
            idx = idx + (slice(None),) * (len(shape) - len(idx))
            targets.append((path, idx))
            shapes.append(sub)
        want = rule.transform.torch_shape(tuple(shapes) if len(shapes) > 1 else shapes[0])
        have = tensors[key].shape
        if tuple(have) != tuple(want):
            dest = ", ".join(f"{p}{_fmt_index(i)} (shape {tuple(s)})" for (p, i), s in zip(targets, shapes))
            raise ValueError(f"torch key {key!r} has shape {tuple(have)}, but {dest} needs torch shape {tuple(want)}")
        for slot, (path, idx) in enumerate(targets):
            pieces[path].append(_Piece(key, slot, idx))
        jobs[key] = (rule, groups, targets)
    if unexpected:
        raise KeyError(f"unexpected torch key(s) with no conversion rule: {', '.join(repr(k) for k in unexpected[:10])}"
                       + (f" (+{len(unexpected) - 10} more)" if len(unexpected) > 10 else ""))
    return pieces, jobs


def _fmt_index(index: tuple) -> str:
    if all(not isinstance(i, int) for i in index):
        return ""
    return "[" + ",".join(str(i) if isinstance(i, int) else ":" for i in index) + "]"


def _cell(index: tuple) -> tuple:
    return tuple(i if isinstance(i, int) else None for i in index)


def _missing_keys(path: str, shape: tuple[int, ...], got: list[_Piece], rules: list[Rule]) -> list[str]:
    """Torch keys that would fill the uncovered parts of NNX param ``path``."""
    have = {_cell(p.index) for p in got}
    missing = []
    for rule in rules:
        for t in rule._templates:
            m = t.path_regex().fullmatch(path)
            if not m:
                continue
            groups_from_path = dict(zip(t.path_groups(), (int(g) for g in m.groups())))
            idx_groups = [(a, i[1]) for a, i in enumerate(t.index) if isinstance(i, tuple)]
            ranges = [range(shape[a]) for a, _ in idx_groups]
            for combo in (np.ndindex(*[len(r) for r in ranges]) if ranges else [()]):
                groups = [0] * rule._ngroups
                for g, v in groups_from_path.items():
                    groups[g] = v
                for (a, g), v in zip(idx_groups, combo):
                    groups[g] = v
                idx = t.resolve_index(groups)
                idx = tuple(i % shape[a] if isinstance(i, int) else i for a, i in enumerate(idx))
                idx = idx + (slice(None),) * (len(shape) - len(idx))
                if _cell(idx) not in have:
                    missing.append(rule.torch_key(groups))
    return missing


def _check_coverage(flat, pieces, rules):
    problems = []
    for path, var in flat.items():
        if not isinstance(var, nnx.Param):
            continue
        got = pieces[path]
        shape = tuple(np.shape(var.get_value()))
        if not got:
            missing = _missing_keys(path, shape, got, rules)
            problems.append(f"{path}{list(shape)} <- missing torch key(s) {missing[:6]}" if missing
                            else f"{path}{list(shape)}: no rule produces it")
            continue
        axes = sorted({a for p in got for a, i in enumerate(p.index) if isinstance(i, int)})
        seen: dict[tuple, str] = {}
        for p in got:
            if any(not isinstance(p.index[a], int) for a in axes) or any(isinstance(i, int) for a, i in enumerate(p.index) if a not in axes):
                problems.append(f"{path}: inconsistent indexing by the rules for {p.key!r}")
                break
            cell = tuple(p.index[a] for a in axes)
            if cell in seen:
                problems.append(f"{path}: torch keys {seen[cell]!r} and {p.key!r} both write index {cell}")
            seen[cell] = p.key
        total = math.prod(shape[a] for a in axes)
        if len(seen) < total:
            missing = _missing_keys(path, shape, got, rules)
            problems.append(f"{path}{list(shape)} <- missing torch key(s) {missing[:6]}"
                            + (f" (+{len(missing) - 6} more)" if len(missing) > 6 else ""))
    if problems:
        raise KeyError("checkpoint does not fill the model:\n  " + "\n  ".join(problems))


class _Converted:
    """Per-parameter cache of converted torch tensors (each read once, on first need)."""

    def __init__(self, tensors, jobs):
        self.tensors, self.jobs, self.cache = tensors, jobs, {}

    def get(self, key: str, slot: int, flat) -> np.ndarray:
        if key not in self.cache:
            rule, _, targets = self.jobs[key]
            shapes = [_sub_shape(tuple(np.shape(flat[p].get_value())), i, key) for p, i in targets]
            x = self.tensors[key].load()
            out = rule.transform.to_nnx(x, tuple(shapes) if len(shapes) > 1 else shapes[0])
            self.cache[key] = out if isinstance(out, tuple) else (out,)
        return self.cache[key][slot]

    def drop(self, keys: Iterable[str]) -> None:
        for k in keys:
            self.cache.pop(k, None)


def _assemble(piece_list: list[_Piece], conv: _Converted, flat, path, shape, dtype, request: tuple) -> np.ndarray:
    """The part ``request`` (a tuple of slices, global coordinates) of NNX param ``path``."""
    req = [request[a] if a < len(request) else slice(None) for a in range(len(shape))]
    req = [slice(*r.indices(shape[a])[:2]) for a, r in enumerate(req)]
    out = np.empty(tuple(r.stop - r.start for r in req), dtype)
    for p in piece_list:
        if any(isinstance(i, int) and not req[a].start <= i < req[a].stop for a, i in enumerate(p.index)):
            continue
        dst = tuple(i - req[a].start if isinstance(i, int) else slice(None) for a, i in enumerate(p.index))
        src = tuple(req[a] for a, i in enumerate(p.index) if not isinstance(i, int))
        out[dst] = conv.get(p.key, p.slot, flat)[src]
    return out


def load_state(
    abstract_model_or_state: nnx.Module | nnx.State,
    tensors: Any,
    rules: Iterable[Rule | tuple],
    dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules_table: Sequence[tuple[str, Any]] | None = None,
    *,
    ignore: Sequence[str] = (),
):
    """Fill an abstract NNX state with converted torch tensors.

    ``tensors``: anything :func:`read_tensors` accepts. ``dtype``: parameter dtype (default:
    the abstract parameter's). With ``mesh``, every parameter is created directly in its
    sharding (``cgjax.sharding.state_shardings`` with ``rules_table``, default
    ``sharding.DEFAULT_RULES``) by ``jax.make_array_from_callback``; each device's slice is
    assembled from only the torch tensors it overlaps, and a parameter's tensors are freed
    once it is placed. ``ignore``: regexes of torch keys to skip. Names and shapes are all
    checked before any data is read: errors name the missing / unexpected / mis-shaped torch
    key. Returns the filled ``nnx.State``, or the module (updated in place) if given one."""
    rules = as_rules(rules)
    tensors = read_tensors(tensors)
    if ignore:
        pats = [re.compile(p) for p in ignore]
        tensors = TensorStore({k: v for k, v in tensors._entries.items() if not any(p.fullmatch(k) for p in pats)}, tensors.origin)
    is_module = isinstance(abstract_model_or_state, nnx.Module)
    state = nnx.state(abstract_model_or_state) if is_module else abstract_model_or_state
    flat_all = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
    # a quantized weight (cgjax.quantize): ``kernel`` (int) is filled from the torch tensor through a
    # float32 copy, quantized in its sharding; its ``kernel_scale`` comes with it and has no rule
    scales = {p[: -len(quantize.SCALE_SUFFIX)]: p for p in flat_all
              if p.endswith(quantize.SCALE_SUFFIX) and p[: -len(quantize.SCALE_SUFFIX)] in flat_all}
    flat = {p: v for p, v in flat_all.items() if p not in scales.values()}
    pieces, jobs = _plan(flat, tensors, rules)
    _check_coverage(flat, pieces, rules)
    if mesh is not None:
        shardings = shd.state_shardings(state, mesh, rules_table or shd.DEFAULT_RULES)
        sh_flat = {_path_str(p): v.get_value() for p, v in nnx.to_flat_state(shardings)}
    conv = _Converted(tensors, jobs)
    refs: dict[str, int] = {}
    for plist in pieces.values():
        for key in {p.key for p in plist}:
            refs[key] = refs.get(key, 0) + 1
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    quantized: dict[str, jax.Array] = {}
    new_flat = []
    for path_t, var in nnx.to_flat_state(state):
        path = _path_str(path_t)
        if path in scales.values():
            continue  # placed with its kernel below
        plist = pieces[path]
        if not plist:  # untargeted non-Param variable: keep as is
            new_flat.append((path_t, var))
            continue
        value = var.get_value()
        shape = tuple(np.shape(value))
        q_scale = scales.get(path)
        dt = np.dtype(np.float32 if q_scale else dtype if dtype is not None else value.dtype)
        sharding = sh_flat[path] if mesh is not None else one_device
        arr = jax.make_array_from_callback(
            shape, sharding, lambda req, plist=plist, path=path, shape=shape, dt=dt: _assemble(plist, conv, flat, path, shape, dt, req)
        )
        if q_scale:
            svar = flat_all[q_scale]
            s_sharding = sh_flat[q_scale] if mesh is not None else one_device
            fn = jax.jit(functools.partial(quantize.quantize_array, sshape=tuple(np.shape(svar.get_value())),
                                           qtype=value.dtype), out_shardings=(sharding, s_sharding))
            arr, quantized[q_scale] = fn(arr)
        for key in {p.key for p in plist}:  # free a torch tensor once all its targets are placed
            refs[key] -= 1
            if refs[key] == 0:
                conv.drop([key])
        new_flat.append((path_t, var.replace(arr)))
    for path_t, var in nnx.to_flat_state(state):
        if _path_str(path_t) in quantized:
            new_flat.append((path_t, var.replace(quantized[_path_str(path_t)])))
    new_state = nnx.from_flat_state(new_flat)
    if is_module:
        nnx.update(abstract_model_or_state, new_state)
        return abstract_model_or_state
    return new_state


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------


def export_state(state: nnx.Module | nnx.State, rules: Iterable[Rule | tuple]) -> dict[str, np.ndarray]:
    """The inverse of :func:`load_state`: ``{torch_key: np.ndarray}`` (parameter dtype;
    bf16 parameters come out as ``ml_dtypes.bfloat16``). Every Param must be covered by a rule."""
    rules = as_rules(rules)
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    flat = {_path_str(p): v for p, v in nnx.to_flat_state(state)}
    quantized = sorted(p for p in flat if p.endswith(quantize.SCALE_SUFFIX))
    if quantized:
        raise ValueError(f"the model holds quantized weights ({quantized[0]}, ...): a quantized base is not exported "
                         "back to PyTorch (it would not be the original); export from the unquantized checkpoint")
    host: dict[str, np.ndarray] = {}

    def value(path):
        if path not in host:
            host[path] = np.asarray(jax.device_get(flat[path].get_value()))
        return host[path]

    out: dict[str, np.ndarray] = {}
    covered: set[str] = set()
    for rule in rules:
        if not rule._templates:
            continue
        first = rule._templates[0]
        rx = first.path_regex()
        for path in flat:
            m = rx.fullmatch(path)
            if not m:
                continue
            shape = tuple(np.shape(flat[path].get_value()))
            groups0 = [None] * rule._ngroups
            for g, v in zip(first.path_groups(), (int(x) for x in m.groups())):
                groups0[g] = v
            idx_groups = [(a, i[1]) for a, i in enumerate(first.index) if isinstance(i, tuple)]
            for combo in (np.ndindex(*[shape[a] for a, _ in idx_groups]) if idx_groups else [()]):
                groups = list(groups0)
                for (a, g), v in zip(idx_groups, combo):
                    groups[g] = v
                if any(g is None for g in groups):
                    raise ValueError(f"rule {rule.torch!r}: group not determined by the first NNX template {first.text!r}")
                parts = []
                for t in rule._templates:
                    p = t.path_str(groups)
                    if p not in flat:
                        raise KeyError(f"rule {rule.torch!r}: NNX path {p!r} not in the state")
                    parts.append(value(p)[t.resolve_index(groups)])
                    covered.add(p)
                key = rule.torch_key(groups)
                if key in out:
                    raise ValueError(f"two rules export torch key {key!r}")
                arr = rule.transform.to_torch(tuple(parts) if len(parts) > 1 else parts[0])
                out[key] = _contiguous(np.asarray(arr))
    left = [p for p, v in flat.items() if isinstance(v, nnx.Param) and p not in covered]
    if left:
        raise KeyError(f"no export rule for NNX parameter(s) {left}")
    return out


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _np_for_safetensors(x) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        if hasattr(x, "detach"):
            import torch  # optional [torch] extra

            t = x.detach().cpu()
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return _contiguous(t.numpy())
        x = np.asarray(jax.device_get(x))
    return _contiguous(x)


def _contiguous(x: np.ndarray) -> np.ndarray:
    return x if x.flags.c_contiguous else x.copy(order="C")  # (np.ascontiguousarray makes 0-d 1-d)


def _write_safetensors_file(tensors: Mapping[str, np.ndarray], path: str, metadata: dict | None) -> None:
    """One safetensors file (numpy writer; bf16 via ml_dtypes handled natively)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    names = sorted(tensors)
    code = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    for name in names:
        a = tensors[name]
        if a.dtype.name == "bfloat16":
            dt = "BF16"
        elif a.dtype in code:
            dt = code[a.dtype]
        else:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": dt, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(_contiguous(tensors[name]).reshape(-1).view(np.uint8).data)


def save_safetensors(tensors: Mapping[str, Any], path_or_dir: str, max_shard_bytes: int | None = None,
                     metadata: dict | None = None) -> list[str]:
    """Write ``tensors`` (numpy / jax / torch arrays) atomically; returns the files written.

    ``path_or_dir`` ending in ``.safetensors``: one file (``max_shard_bytes`` not allowed).
    Otherwise a directory: ``model.safetensors``, or, when the total exceeds
    ``max_shard_bytes``, ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``
    (HF layout). Everything is written to a temporary location first and renamed into place.
    """
    arrays = {k: _np_for_safetensors(v) for k, v in tensors.items()}
    metadata = {"format": "pt", **(metadata or {})}
    path_or_dir = os.fspath(path_or_dir)
    if path_or_dir.endswith(".safetensors"):
        if max_shard_bytes is not None:
            raise ValueError("max_shard_bytes needs a directory, not a .safetensors file path")
        persistence.write_file(path_or_dir, lambda tmp: _write_safetensors_file(arrays, tmp, metadata))
        return [path_or_dir]
    # directory
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    total = sum(a.nbytes for a in arrays.values())
    for name in sorted(arrays):
        a = arrays[name]
        if max_shard_bytes is not None and shards[-1] and size + a.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = a
        size += a.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    files = [(os.path.join(path_or_dir, name), lambda tmp, shard=shard: _write_safetensors_file(shard, tmp, metadata))
             for name, shard in zip(names, shards)]
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in sorted(s)}}

        def write_index(tmp: str) -> None:
            with open(tmp, "w") as f:
                json.dump(index, f, indent=2)

        files.append((os.path.join(path_or_dir, "model.safetensors.index.json"), write_index))
    # every file is written before any is put in place, the index last (it is last in ``files``)
    persistence.write_files(files)
    # remove a stale layout of the other kind so read_tensors() cannot pick the old one
    stale = ["model.safetensors"] if len(shards) > 1 else ["model.safetensors.index.json"]
    for name in stale:
        p = os.path.join(path_or_dir, name)
        if os.path.exists(p):
            os.remove(p)
    return [path for path, _ in files]
