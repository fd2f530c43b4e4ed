"""Pre-extracted visual features keyed by image id (HDF5 or npz).

Supported files:

* HDF5 (``.h5``, ``.hdf5``), either one dataset ``[n_visual, feat_dim]`` per image id at the
  root ("flat" layout), or the VL-T5 layout: one group per image id holding
  ``features [n_visual, feat_dim]`` and optionally ``boxes [n_visual, 4]``;
* npz (``.npz``): one array ``[n_visual, feat_dim]`` per image id (the array name).

Image ids are strings (``Example.image_id``); an int is accepted and converted with ``str``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

from workbench.utils import atomic_path

SUPPORTED_EXTENSIONS = (".h5", ".hdf5", ".npz")
_README = "data/README.md, section 'Feature stores'"


def _kind_of(path: Path) -> str:
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise ValueError(
            f"unsupported feature file {path}: extension {ext!r}; supported extensions are "
            f"{', '.join(SUPPORTED_EXTENSIONS)}"
        )
    return "npz" if ext == ".npz" else "h5"


def _to_key(image_id) -> str:
    if isinstance(image_id, str):
        return image_id
    if isinstance(image_id, (int, np.integer)) and not isinstance(image_id, bool):
        return str(image_id)
    raise TypeError(f"image id must be a str (or int), got {type(image_id).__name__}: {image_id!r}")


class FeatureStore:
    """Read-only access to the visual features of a set of images.

    Args:
        path: an ``.h5`` / ``.hdf5`` or ``.npz`` file (layouts in the module docstring).
        feat_dim: the feature dimension expected; every array read is checked against it.
            None accepts any dimension (``feat_dim`` is then inferred from the file).

    Raises:
        FileNotFoundError: the file does not exist (the message points to ``data/features/``).
        ValueError: unsupported extension (the message lists the supported ones), or a file
            that cannot be read as HDF5 / npz.

    Example:
        >>> store = FeatureStore("data/features/coco_val2014.h5", feat_dim=2048)
        >>> feats, mask = store.get_batch(["391895", "522418"])
    """

    def __init__(self, path, feat_dim: int | None = None):
        self.path = Path(path)
        self._kind = _kind_of(self.path)
        if feat_dim is not None and (not isinstance(feat_dim, int) or feat_dim < 1):
            raise ValueError(f"feat_dim must be a positive int or None, got {feat_dim!r}")
        self._expected_dim = feat_dim
        if not self.path.is_file():
            raise FileNotFoundError(
                f"feature store not found: {self.path}. Put the feature file (HDF5 or npz, "
                f"keyed by image id) in data/features/; see {_README}. Nothing is downloaded."
            )
        self._handle = None
        self._shapes: dict[str, tuple[int, ...]] | None = None
        try:
            handle = self._file()
            self._keys = list(handle.keys()) if self._kind == "h5" else list(handle.files)
        except (OSError, zipfile.BadZipFile, ValueError) as e:
            raise ValueError(
                f"cannot read {self.path} as {self._kind} feature store: {e}"
            ) from None
        self._key_set = set(self._keys)
        self.layout = self._detect_layout()

    # ---------------------------------------------------------------------------- file access

    def _file(self):
        """The open h5py.File or NpzFile (opened lazily, e.g. after unpickling)."""
        if self._handle is None:
            if self._kind == "h5":
                import h5py

                self._handle = h5py.File(self.path, "r")
            else:
                self._handle = np.load(self.path, allow_pickle=False)
        return self._handle

    def _detect_layout(self) -> str:
        if self._kind == "npz":
            return "npz"
        if not self._keys:
            return "flat"
        import h5py

        first = self._file()[self._keys[0]]
        return "vlt5" if isinstance(first, h5py.Group) else "flat"

    def _features_node(self, key: str):
        """The h5 dataset or npz entry holding the features of ``key`` (not yet read)."""
        if self._kind == "npz":
            return None
        import h5py

        node = self._file()[key]
        if isinstance(node, h5py.Group):
            if "features" not in node:
                raise ValueError(
                    f"image {key!r} in {self.path} is an HDF5 group without a 'features' "
                    "dataset (VL-T5 layout: {image_id}/features, {image_id}/boxes)"
                )
            return node["features"]
        return node

    def _raw(self, key: str) -> np.ndarray:
        if self._kind == "npz":
            return self._file()[key]
        return self._features_node(key)[()]

    def close(self) -> None:
        """Close the underlying file (it is reopened on the next access)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handle"] = None  # open files do not pickle; reopened lazily
        return state

    # ---------------------------------------------------------------------------- validation

    def _missing(self, key: str) -> KeyError:
        return KeyError(
            f"image id {key!r} not in feature store {self.path} ({len(self._keys)} images; "
            f"e.g. {self._keys[:3]})"
        )

    def _check(self, key: str, arr) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.ndim != 2:
            raise ValueError(
                f"features of image {key!r} in {self.path} have shape {arr.shape}; "
                "expected [n_visual, feat_dim]"
            )
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"features of image {key!r} in {self.path} have non-numeric dtype {arr.dtype}"
            )
        if self._expected_dim is not None and arr.shape[1] != self._expected_dim:
            raise ValueError(
                f"features of image {key!r} in {self.path} have feat_dim {arr.shape[1]}, "
                f"expected {self._expected_dim}"
            )
        arr = arr.astype(np.float32, copy=False)
        finite = np.isfinite(arr)
        if not finite.all():
            raise ValueError(
                f"features of image {key!r} in {self.path} contain NaN or inf "
                f"({int((~finite).sum())} values)"
            )
        return arr

    def _shape_table(self) -> dict[str, tuple[int, ...]]:
        """Shapes of all feature arrays, read from metadata / npy headers (not the data)."""
        if self._shapes is None:
            shapes = {}
            if self._kind == "h5":
                for key in self._keys:
                    shapes[key] = tuple(self._features_node(key).shape)
            else:
                with zipfile.ZipFile(self.path) as zf:
                    names = set(zf.namelist())
                    for key in self._keys:
                        with zf.open(key + ".npy" if key + ".npy" in names else key) as fh:
                            version = np.lib.format.read_magic(fh)
                            if version == (1, 0):
                                shape = np.lib.format.read_array_header_1_0(fh)[0]
                            elif version == (2, 0):
                                shape = np.lib.format.read_array_header_2_0(fh)[0]
                            else:
                                shape = self._raw(key).shape
                        shapes[key] = tuple(shape)
            for key, shape in shapes.items():
                if len(shape) != 2:
                    raise ValueError(
                        f"features of image {key!r} in {self.path} have shape {shape}; "
                        "expected [n_visual, feat_dim]"
                    )
            self._shapes = shapes
        return self._shapes

    # ---------------------------------------------------------------------------- public API

    def __getitem__(self, image_id) -> np.ndarray:
        """The features of one image, ``float32 [n_visual, feat_dim]``.

        Raises:
            KeyError: the image id is not in the store (the message names it and the store).
            ValueError: wrong shape or dimension, non-numeric, NaN or inf (names the image).
        """
        key = _to_key(image_id)
        if key not in self._key_set:
            raise self._missing(key)
        return self._check(key, self._raw(key))

    def __contains__(self, image_id) -> bool:
        try:
            return _to_key(image_id) in self._key_set
        except TypeError:
            return False

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def keys(self) -> list[str]:
        """All image ids, in file order (HDF5 lists them sorted by name)."""
        return list(self._keys)

    def missing(self, image_ids: Iterable) -> list[str]:
        """The image ids (as store keys) that the store lacks, in the order given, without duplicates.

        Only the key list is consulted (no feature is read), so checking a whole split is cheap.
        """
        out, seen = [], set()
        for image_id in image_ids:
            key = _to_key(image_id)
            if key not in self._key_set and key not in seen:
                seen.add(key)
                out.append(key)
        return out

    def shape(self, image_id) -> tuple[int, ...]:
        """The shape of one image's feature array, ``(n_visual, feat_dim)``, read from metadata only.

        Raises:
            KeyError: the image id is not in the store.
        """
        key = _to_key(image_id)
        if key not in self._key_set:
            raise self._missing(key)
        if self._shapes is not None:
            return self._shapes[key]
        if self._kind == "h5":
            return tuple(self._features_node(key).shape)
        return tuple(self._raw(key).shape)

    @property
    def feat_dim(self) -> int | None:
        """The feature dimension: the ``feat_dim`` given, else the one shared by all images.

        None for an empty store. Raises ValueError (naming an image) if images disagree.
        """
        if self._expected_dim is not None:
            return self._expected_dim
        shapes = self._shape_table()
        if not shapes:
            return None
        first_key = self._keys[0]
        dim = shapes[first_key][1]
        for key, shape in shapes.items():
            if shape[1] != dim:
                raise ValueError(
                    f"feature store {self.path} mixes dimensions: image {key!r} has feat_dim "
                    f"{shape[1]}, image {first_key!r} has {dim}"
                )
        return dim

    @property
    def n_visual(self) -> int | None:
        """The number of visual tokens per image if all images share it, else None."""
        counts = {shape[0] for shape in self._shape_table().values()}
        return counts.pop() if len(counts) == 1 else None

    def get_batch(self, image_ids: Iterable) -> tuple[np.ndarray, np.ndarray]:
        """Stack the features of several images, padding to the longest.

        Args:
            image_ids: the image ids of the batch (at least one).

        Returns:
            ``(feats, mask)``: ``feats`` float32 ``[b, max_n, feat_dim]`` zero-padded, ``mask``
            bool ``[b, max_n]``, True on real visual tokens.

        Raises:
            KeyError / ValueError: as ``store[image_id]``; ValueError for an empty batch or
            images of different dimensions.
        """
        image_ids = [_to_key(i) for i in image_ids]
        if not image_ids:
            raise ValueError("get_batch needs at least one image id")
        arrays = [self[key] for key in image_ids]
        dim = arrays[0].shape[1]
        for key, arr in zip(image_ids, arrays):
            if arr.shape[1] != dim:
                raise ValueError(
                    f"features of image {key!r} in {self.path} have feat_dim {arr.shape[1]}, "
                    f"but image {image_ids[0]!r} of the same batch has {dim}"
                )
        max_n = max(arr.shape[0] for arr in arrays)
        feats = np.zeros((len(arrays), max_n, dim), dtype=np.float32)
        mask = np.zeros((len(arrays), max_n), dtype=bool)
        for row, arr in enumerate(arrays):
            feats[row, : arr.shape[0]] = arr
            mask[row, : arr.shape[0]] = True
        return feats, mask

    def boxes(self, image_id) -> np.ndarray:
        """The region boxes of one image, float32 ``[n_visual, 4]`` (VL-T5 HDF5 layout only).

        Raises:
            KeyError: unknown image id.
            ValueError: the store has no boxes for this image (flat HDF5 or npz store, or a
                group without ``boxes``).
        """
        key = _to_key(image_id)
        if key not in self._key_set:
            raise self._missing(key)
        node = self._file()[key] if self._kind == "h5" else None
        import h5py

        if not isinstance(node, h5py.Group) or "boxes" not in node:
            raise ValueError(
                f"feature store {self.path} has no boxes for image {key!r}: only the VL-T5 "
                "HDF5 layout ({image_id}/features, {image_id}/boxes) stores boxes"
            )
        return np.asarray(node["boxes"][()], dtype=np.float32)

    def validate(self) -> None:
        """Read every image once and raise on the first bad one (shape, dimension, NaN/inf)."""
        for key in self._keys:
            self[key]
        self.feat_dim  # noqa: B018 - raises if dimensions are mixed

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, layout={self.layout!r}, images={len(self)})"

    # ---------------------------------------------------------------------------- writing

    @staticmethod
    def write(
        path,
        mapping: Mapping,
        boxes: Mapping | None = None,
        layout: str | None = None,
        compress: bool = False,
    ) -> Path:
        """Write features to an ``.npz`` or HDF5 file, atomically.

        The file is written beside ``path`` under a temporary name and renamed onto ``path``
        only when complete, so a crash never leaves a partial store.

        Args:
            path: the target file; its extension picks the format.
            mapping: ``{image_id: array [n_visual, feat_dim]}`` (all with the same feat_dim).
            boxes: optional ``{image_id: array [n_visual, 4]}``; HDF5 only (VL-T5 layout).
            layout: HDF5 only: ``"flat"`` (one dataset per image) or ``"vlt5"``
                (``{image_id}/features`` and ``{image_id}/boxes``). Default: ``"vlt5"`` when
                ``boxes`` is given, else ``"flat"``.
            compress: deflate-compress the arrays (npz: ZIP_DEFLATED; HDF5: gzip).

        Returns:
            The path written.

        Raises:
            ValueError: unsupported extension, empty mapping, an image id containing ``/``, an
                array that is not 2-D, of another feat_dim than the others, non-finite (the
                message names the image), boxes with npz or the flat layout.
        """
        path = Path(path)
        kind = _kind_of(path)
        if not isinstance(mapping, Mapping) or not mapping:
            raise ValueError("FeatureStore.write needs a non-empty mapping {image_id: array}")
        if layout is None:
            layout = "vlt5" if boxes is not None else "flat"
        if layout not in ("flat", "vlt5"):
            raise ValueError(f"layout must be 'flat' or 'vlt5', got {layout!r}")
        if boxes is not None and (kind == "npz" or layout == "flat"):
            raise ValueError("boxes can only be written to an HDF5 file with layout='vlt5'")

        arrays: dict[str, np.ndarray] = {}
        dim = None
        for image_id, arr in mapping.items():
            key = _to_key(image_id)
            if "/" in key or not key:
                raise ValueError(f"image id {key!r} cannot be a store key (empty or has '/')")
            arr = np.asarray(arr)
            if arr.ndim != 2:
                raise ValueError(
                    f"features of image {key!r} have shape {arr.shape}; "
                    "expected [n_visual, feat_dim]"
                )
            arr = arr.astype(np.float32, copy=False)
            if not np.isfinite(arr).all():
                raise ValueError(f"features of image {key!r} contain NaN or inf")
            if dim is None:
                dim = arr.shape[1]
            elif arr.shape[1] != dim:
                raise ValueError(
                    f"features of image {key!r} have feat_dim {arr.shape[1]}, the others {dim}"
                )
            arrays[key] = arr
        box_arrays = {}
        if boxes is not None:
            for image_id, b in boxes.items():
                key = _to_key(image_id)
                if key not in arrays:
                    raise ValueError(f"boxes given for image {key!r} which has no features")
                b = np.asarray(b, dtype=np.float32)
                if b.ndim != 2 or b.shape[1] != 4 or b.shape[0] != arrays[key].shape[0]:
                    raise ValueError(
                        f"boxes of image {key!r} have shape {b.shape}; expected "
                        f"[{arrays[key].shape[0]}, 4]"
                    )
                box_arrays[key] = b

        with atomic_path(path) as tmp:
            if kind == "npz":
                mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
                with zipfile.ZipFile(tmp, "w", compression=mode, allowZip64=True) as zf:
                    for key, arr in arrays.items():
                        with zf.open(key + ".npy", "w", force_zip64=True) as fh:
                            np.lib.format.write_array(fh, arr, allow_pickle=False)
            else:
                import h5py

                opts = {"compression": "gzip"} if compress else {}
                with h5py.File(tmp, "w") as f:
                    for key, arr in arrays.items():
                        if layout == "flat":
                            f.create_dataset(key, data=arr, **opts)
                        else:
                            group = f.create_group(key)
                            group.create_dataset("features", data=arr, **opts)
                            if key in box_arrays:
                                group.create_dataset("boxes", data=box_arrays[key], **opts)
        return path
