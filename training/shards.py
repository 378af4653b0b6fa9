"""Sharded, atomic, resumable per-image storage for the offline EZSD stages (proposals, targets).

A store is a folder::

    manifest.json                 what the folder holds (stage, config, CLIP, vocabulary, source,
                                  shard size, the ordered image ids) and, once complete, its cost
    shard-00000.safetensors       the records of images [0, shard_size) of the manifest's order
    shard-00001.safetensors       ... of images [shard_size, 2 * shard_size), and so on

Each shard holds, for every one of its images, tensors under keys ``"{image_id}/{name}"`` (for
example ``"17/boxes"``), and in its safetensors metadata the format, its image ids, the sha256 of
its tensor data and the per-shard cost counters (seconds, CLIP crops, ...).

Guarantees:

* **Atomic**: a shard is written to ``shard-k.safetensors.tmp-<host>-<pid>`` in the same folder and renamed
  with ``os.replace``, so a killed run never leaves a truncated ``shard-k.safetensors``.
* **Resumable**: a run skips every shard that exists and verifies (header parses, image ids
  match, data digest matches); a missing, truncated or corrupt shard is recomputed.
* **Guarded**: opening a folder whose manifest differs from the requested one (other config,
  CLIP weights, vocabulary, source json or image list) raises ``ValueError`` unless
  ``overwrite=True``, which deletes the old shards first.
* **Distributed**: shard k belongs to rank ``k % world_size`` (ranks from
  ``detectron2.utils.comm``), so processes started by :func:`launch_stage` (or by ``torchrun``)
  split the work with no communication. Every rank verifies an existing manifest itself; a
  missing one is written by the first rank to need it (all ranks build the same one). The only
  barrier is after an ``overwrite`` wipe; the cost of a complete folder is recorded by whichever
  rank finds every shard present when it ends (no rank waits for the others).
* **Independent jobs** (``part=(index, count)``, the CLI's ``--shard-index/--num-shards``): job
  ``index`` of ``count`` owns the shards with ``k % count == index`` and needs no process group
  at all (a SLURM job array, separate machines sharing a folder); whichever job finds every
  shard present when it ends records the cost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from detectron2.utils import comm
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

SHARDS_FORMAT = "ovd-shards/1"
MANIFEST_FILE = "manifest.json"
#: Manifest keys ignored when an existing manifest is compared with the requested one: "cost"
#: describes a finished run, "info" where the inputs were found (paths may move).
INFORMATIONAL_KEYS = ("cost", "info")

Record = dict[str, torch.Tensor]
#: `progress(desc, total, initial) -> update(n, postfix)`, as in ovd.training.clip_pretrain.
ProgressFactory = Callable[[str, int, int], Callable[[int, dict], None]]


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def sha256_json(obj) -> str:
    """sha256 of the canonical JSON text of obj (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _canonical(obj):
    # Round-trip through JSON so tuples == lists and int keys == str keys when comparing.
    return json.loads(json.dumps(obj))


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over keys, dtypes, shapes and raw bytes of a dict of CPU tensors, in key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _diff(old: dict, new: dict) -> list[str]:
    """Human-readable top-level (and one level down) differences between two manifests."""
    out = []
    for key in sorted(set(old) | set(new)):
        if key in INFORMATIONAL_KEYS or old.get(key) == new.get(key):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            out.append(f"{key}: " + ", ".join(f"{k}={a.get(k)!r} -> {b.get(k)!r}" for k in sub[:6]))
        elif isinstance(a, list) and isinstance(b, list) and (len(a) > 8 or len(b) > 8):
            out.append(f"{key}: {len(a)} entries -> {len(b)} entries (contents differ)")
        else:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


class ShardStore:
    """The writing side of a shard folder (one per process).

    Args:
        folder: the store folder (created).
        stage: stage name recorded in the manifest ("proposals", "targets").
        identity: everything the contents depend on besides the image list, e.g.
            ``{"config": ..., "clip": {"name", "sha256"}, "vocabulary": [...], "source": {...}}``.
        image_ids: the images, in storage order; shard k holds
            ``image_ids[k * shard_size:(k + 1) * shard_size]``.
        shard_size: images per shard (>= 1).
        overwrite: replace a folder whose manifest differs instead of raising.

    Raises:
        ValueError: the folder holds a different manifest and not ``overwrite``, or bad
            arguments.
    """

    def __init__(self, folder: str | Path, *, stage: str, identity: dict,
                 image_ids: Sequence[int], shard_size: int, overwrite: bool = False,
                 part: tuple[int, int] | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        ids = [int(i) for i in image_ids]
        if len(set(ids)) != len(ids):
            raise ValueError("image_ids contains duplicates")
        self.folder = Path(folder)
        self.image_ids = ids
        self.shard_size = int(shard_size)
        self.num_shards = (len(ids) + self.shard_size - 1) // self.shard_size
        self.independent = part is not None
        if part is not None:
            index, count = (int(v) for v in part)
            if not 0 <= index < count:
                raise ValueError(f"shard index {index} is not in [0, {count})")
            if overwrite and count > 1:
                raise ValueError("overwrite with independent jobs would let one job wipe another's "
                                 "shards: run one job with --overwrite first, or delete the folder")
            if comm.get_world_size() > 1:
                raise ValueError("--shard-index/--num-shards is for independent jobs; do not combine it "
                                 "with a launched process group (--num-gpus, torchrun)")
            self.rank, self.world_size = index, count
        else:
            self.rank, self.world_size = comm.get_rank(), comm.get_world_size()
        self.manifest = _canonical({
            "format": SHARDS_FORMAT, "stage": stage, **identity,
            "shard_size": self.shard_size, "num_images": len(ids), "num_shards": self.num_shards,
            "image_ids": ids,
        })
        self.folder.mkdir(parents=True, exist_ok=True)
        self._open(overwrite)

    # ------------------------------------------------------------------ manifest

    @property
    def manifest_path(self) -> Path:
        return self.folder / MANIFEST_FILE

    def _read_manifest(self) -> dict | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.manifest_path} is not valid JSON ({e}); remove the folder "
                             "or pass overwrite") from e

    def _matches(self, old: dict) -> bool:
        strip = lambda m: {k: v for k, v in m.items() if k not in INFORMATIONAL_KEYS}  # noqa: E731
        return strip(old) == strip(self.manifest)

    def _open(self, overwrite: bool) -> None:
        if overwrite:
            # A wipe must finish before any rank looks at the folder: the one barrier we use.
            if self.rank == 0:
                old = self._read_manifest_or_none()
                if old is None or not self._matches(old):
                    if old is not None:
                        logger.warning("overwriting %s (%s)", self.folder,
                                       "; ".join(_diff(old, self.manifest)))
                    for p in self.folder.glob("shard-*.safetensors*"):
                        p.unlink()
                    self._write_manifest(self.manifest)
            comm.synchronize()
            return
        old = self._read_manifest()
        if old is None:
            if any(self.folder.glob("shard-*.safetensors")):
                raise ValueError(f"{self.folder} holds shards but no {MANIFEST_FILE}; remove the "
                                 "folder or pass overwrite")
            # Rank 0 normally writes it; a rank that finds it absent writes it too rather than
            # wait for rank 0: every rank builds the identical manifest and the write is an
            # atomic rename, so racing writers are harmless and no barrier is needed.
            self._write_manifest(self.manifest)
            return
        if not self._matches(old):
            raise ValueError(
                f"{self.folder} holds a {old.get('stage')!r} run that differs from the requested "
                f"one ({'; '.join(_diff(old, self.manifest)) or 'format'}); choose another output "
                "folder or pass overwrite (--overwrite) to recompute it")
        if "cost" in old:
            self.manifest["cost"] = old["cost"]

    def _read_manifest_or_none(self) -> dict | None:
        try:
            return self._read_manifest()
        except ValueError:
            return None

    def _write_manifest(self, manifest: dict) -> None:
        tmp = self.folder / (MANIFEST_FILE + f".tmp-{socket.gethostname()}-{os.getpid()}")  # unique per host
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, self.manifest_path)

    # ------------------------------------------------------------------ shards

    def shard_ids(self, k: int) -> list[int]:
        return self.image_ids[k * self.shard_size:(k + 1) * self.shard_size]

    def shard_path(self, k: int) -> Path:
        return self.folder / shard_name(k)

    def my_shards(self) -> list[int]:
        """Shards this rank owns: k with k % world_size == rank."""
        return [k for k in range(self.num_shards) if k % self.world_size == self.rank]

    def shard_ok(self, k: int) -> bool:
        """Whether shard k exists, parses, holds exactly its images and matches its digest.

        Reads the whole shard (they are small): this is what catches a corrupt file before a
        resumed run trusts it.
        """
        path = self.shard_path(k)
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != SHARDS_FORMAT or \
                        json.loads(meta.get("image_ids", "null")) != self.shard_ids(k):
                    return False
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            return tensors_digest(tensors) == meta.get("digest")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            logger.warning("shard %s is unreadable (%s); it will be recomputed", path, e)
            return False

    def write_shard(self, k: int, records: dict[int, Record], stats: dict[str, float]) -> Path:
        """Write shard k atomically.

        Args:
            k: shard index.
            records: image_id -> {name: tensor}; must cover exactly ``shard_ids(k)``.
            stats: per-shard counters stored in the metadata (summed into the manifest's cost).
        """
        if sorted(records) != sorted(self.shard_ids(k)):
            raise ValueError(f"shard {k}: records for {sorted(records)}, expected {self.shard_ids(k)}")
        tensors = {f"{image_id}/{name}": t.detach().cpu().contiguous()
                   for image_id, rec in records.items() for name, t in rec.items()}
        meta = {"format": SHARDS_FORMAT, "image_ids": json.dumps(self.shard_ids(k)),
                "digest": tensors_digest(tensors), "stats": json.dumps(stats)}
        tmp = self.folder / f"{shard_name(k)}.tmp-{socket.gethostname()}-{os.getpid()}"
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self.shard_path(k))
        return self.shard_path(k)

    # ------------------------------------------------------------------ the loop

    def todo_shards(self) -> list[int]:
        """The shards this rank still has to compute (missing or failing `shard_ok`), in order."""
        return [k for k in self.my_shards() if not self.shard_ok(k)]

    def image_ids_of(self, shards: Sequence[int]) -> list[int]:
        """The image ids of `shards`, in the order `run` computes them."""
        return [i for k in shards for i in self.shard_ids(k)]

    def run(self, compute: Callable[[int], tuple[Record, dict[str, float]]], *,
            desc: str, progress: ProgressFactory | None = None,
            todo: Sequence[int] | None = None) -> ShardReader:
        """Compute every missing shard this rank owns, then (rank 0) finalise the manifest.

        Args:
            compute: ``compute(image_id) -> (record, stats)``; stats are numbers summed per
                shard (e.g. {"clip_crops": 812}).
            desc: progress label.
            progress: optional progress factory; ``update(1, postfix)`` is called once per
                image, for a shard's last image only after that shard is on disk (so an
                exception raised by the callback never loses a computed shard).
            todo: `todo_shards()` when the caller already has it (each check reads a whole
                shard, so it is not done twice).

        Returns:
            A reader of the folder.
        """
        mine = self.my_shards()
        todo = self.todo_shards() if todo is None else list(todo)
        n_mine = sum(len(self.shard_ids(k)) for k in mine)
        n_done = n_mine - sum(len(self.shard_ids(k)) for k in todo)
        if n_done:
            logger.info("%s: %d/%d images of rank %d already done in %s", desc, n_done, n_mine,
                        self.rank, self.folder)
        update = progress(desc, n_mine, n_done) if progress else (lambda n, info=None: None)
        for k in todo:
            ids = self.shard_ids(k)
            t0 = time.time()
            records: dict[int, Record] = {}
            stats: dict[str, float] = {}
            for i, image_id in enumerate(ids):
                rec, image_stats = compute(image_id)
                records[image_id] = rec
                for key, value in image_stats.items():
                    stats[key] = stats.get(key, 0) + value
                if i == len(ids) - 1:
                    stats["seconds"] = round(time.time() - t0, 3)
                    stats["images"] = len(ids)
                    self.write_shard(k, records, stats)
                update(1, {"shard": f"{k + 1}/{self.num_shards}"})
        # No barrier: every rank (or job) tries to finalise when it ends, and the last to end
        # finds every shard present. A barrier would hold finished ranks idle behind slow or
        # resumed ones (and time out after 30 min); racing finalisers write the same manifest
        # through an atomic rename.
        self.finalise()
        return ShardReader(self.folder)

    def finalise(self) -> bool:
        """If every shard is present, sum the shards' counters into ``manifest["cost"]``.

        Returns:
            Whether the folder is complete.
        """
        missing = [k for k in range(self.num_shards) if not self.shard_path(k).is_file()]
        if missing:
            logger.info("%s: %d/%d shards still missing (other ranks still running?)",
                        self.folder, len(missing), self.num_shards)
            return False
        totals: dict[str, float] = {}
        for k in range(self.num_shards):
            with safe_open(str(self.shard_path(k)), "pt") as f:
                for key, value in json.loads((f.metadata() or {}).get("stats", "{}")).items():
                    totals[key] = totals.get(key, 0) + value
        n = max(1, len(self.image_ids))
        cost = {"totals": totals,
                "per_image": {k: round(v / n, 3) for k, v in totals.items() if k != "images"},
                "images_per_second": round(n / totals["seconds"], 4) if totals.get("seconds") else None}
        self.manifest["cost"] = cost
        self._write_manifest(self.manifest)
        for p in self.folder.glob("shard-*.safetensors.tmp*"):
            p.unlink(missing_ok=True)
        return True


class ShardReader:
    """Read-only, lazy access to a shard folder, by image id.

    Shards are opened with safetensors' ``safe_open`` (memory-mapped) on first use and kept in
    a small LRU; only the requested image's tensors are read. Picklable (open handles are
    dropped), so it can travel into DataLoader workers.

    Args:
        folder: a folder written by :class:`ShardStore`.
        cache_size: open shards kept per process.

    Raises:
        FileNotFoundError: no manifest in the folder.
        ValueError: the manifest is not a shard manifest.
    """

    def __init__(self, folder: str | Path, *, cache_size: int = 4):
        self.folder = Path(folder)
        path = self.folder / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder} is not a shard folder (missing {MANIFEST_FILE})")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != SHARDS_FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {SHARDS_FORMAT!r}")
        self.shard_size = int(self.manifest["shard_size"])
        self._index = {int(i): n // self.shard_size for n, i in enumerate(self.manifest["image_ids"])}
        self.cache_size = max(1, cache_size)
        self._cache: OrderedDict[int, object] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()
        return state

    def image_ids(self) -> list[int]:
        """All image ids of the manifest, in storage order."""
        return [int(i) for i in self.manifest["image_ids"]]

    def __len__(self) -> int:
        return len(self._index)

    def _shard_path(self, k: int) -> Path:
        return self.folder / shard_name(k)

    def __contains__(self, image_id: object) -> bool:
        """Whether the image is in the manifest and its shard is written."""
        try:
            k = self._index.get(int(image_id))  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        return k is not None and self._shard_path(k).is_file()

    def missing_shards(self) -> list[int]:
        return [k for k in range(int(self.manifest["num_shards"])) if not self._shard_path(k).is_file()]

    def complete(self) -> bool:
        """Whether every shard of the manifest is present."""
        return not self.missing_shards()

    def _handle(self, k: int):
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        handle = safe_open(str(self._shard_path(k)), "pt")
        self._cache[k] = handle
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return handle

    def __getitem__(self, image_id: int) -> Record:
        """The stored tensors of one image, ``{name: tensor}`` (dtypes as stored).

        Raises:
            KeyError: the image is not in the manifest, or its shard is not written yet.
        """
        k = self._index.get(int(image_id))
        if k is None:
            raise KeyError(f"image {image_id} is not in {self.folder}")
        if not self._shard_path(k).is_file():
            raise KeyError(f"image {image_id}: {self._shard_path(k)} is not written yet")
        handle = self._handle(k)
        prefix = f"{int(image_id)}/"
        return {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys()
                if key.startswith(prefix)}


class ReadAhead:
    """Images decoded ahead of their use by background threads, so decoding overlaps the
    CLIP's work on the previous image (PIL releases the GIL while it decodes).

    Args:
        read: ``read(image_id) -> image``.
        order: the ids in the order they will be asked for.
        depth: images decoded ahead (memory: this many decoded images).
    """

    def __init__(self, read: Callable[[int], torch.Tensor], order: Sequence[int], depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.read, self.order, self.depth = read, list(order), depth
        self.position = {image_id: i for i, image_id in enumerate(self.order)}
        self.pool = ThreadPoolExecutor(max_workers=max(1, depth), thread_name_prefix="read-ahead")
        self.pending: dict[int, object] = {}

    def __call__(self, image_id: int) -> torch.Tensor:
        """The decoded image (read now if it was not in the planned order)."""
        at = self.position.get(image_id)
        if at is None:
            return self.read(image_id)
        for next_id in self.order[at:at + self.depth + 1]:
            if next_id not in self.pending:
                self.pending[next_id] = self.pool.submit(self.read, next_id)
        return self.pending.pop(image_id).result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- launching

def launch_stage(main_func: Callable, args: argparse.Namespace, func_args: tuple = ()) -> None:
    """Run ``main_func(*func_args)`` in ``num_gpus * num_machines`` processes.

    With CUDA this is ``detectron2.engine.launch`` (NCCL, one GPU per process). Detectron2 0.6's
    launcher asserts CUDA, so without it the same spawning is done here with the gloo backend,
    and the torch threads are divided among the local processes.
    """
    from detectron2.engine import launch

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:  # started by torchrun
        _join_torchrun()
        main_func(*func_args)
        return
    nprocs = max(1, int(args.num_gpus))
    world = nprocs * int(args.num_machines)
    if world == 1:
        main_func(*func_args)
        return
    if torch.cuda.is_available():
        launch(main_func, nprocs, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=func_args)
        return
    import torch.multiprocessing as mp
    from detectron2.engine.launch import _find_free_port

    url = args.dist_url
    if url == "auto":
        if args.num_machines != 1:
            raise ValueError("--dist-url auto only works on one machine")
        url = f"tcp://127.0.0.1:{_find_free_port()}"
    mp.spawn(_cpu_worker, nprocs=nprocs, daemon=False,
             args=(main_func, world, nprocs, int(args.machine_rank), url, func_args))


def _cpu_worker(local_rank: int, main_func: Callable, world: int, nprocs: int, machine_rank: int,
                url: str, func_args: tuple) -> None:
    import torch.distributed as dist

    rank = machine_rank * nprocs + local_rank
    dist.init_process_group(backend="gloo", init_method=url, world_size=world, rank=rank)
    for i in range(world // nprocs):  # the per-machine group comm.get_local_rank() expects
        group = dist.new_group(list(range(i * nprocs, (i + 1) * nprocs)))
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))
    comm.synchronize()
    main_func(*func_args)


def _join_torchrun() -> None:
    """Join the process group torchrun describes (env://: RANK, WORLD_SIZE, MASTER_ADDR/PORT,
    LOCAL_RANK, LOCAL_WORLD_SIZE), with the per-machine group Detectron2's comm expects."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    for i in range(world // local):
        group = dist.new_group(list(range(i * local, (i + 1) * local)))
        if i == rank // local:
            comm._LOCAL_PROCESS_GROUP = group
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    comm.synchronize()


def stage_device() -> torch.device:
    """This process's device: its local GPU under a CUDA launch, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", comm.get_local_rank() if comm.get_world_size() > 1 else 0)
    return torch.device("cpu")
