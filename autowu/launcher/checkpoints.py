"""Where a run's checkpoints live, which one to resume from, and saving and loading them through DeepSpeed.

``<out_dir>/checkpoints/<tag>/`` are DeepSpeed checkpoints: ``epoch<N>`` at an epoch's end, ``epoch<N>_step<S>``
when a run is stopped inside epoch N+1 (preemption); ``client_state`` carries where the run stood.

A checkpoint counts only once it is committed. DeepSpeed's ``save_checkpoint`` has rank 0 write ``latest`` right
after its own files, before the other ranks finish theirs: a rank that dies mid-write (or a machine that crashes
before its page cache is flushed) leaves ``latest`` naming a torn checkpoint, and resuming stops in torch's
"failed finding central directory". Here every rank writes its files (DeepSpeed's save, without ``latest``), a
barrier, then one process per disk flushes every file to the disk, writes the commit record ``commit.json``
(each file's size, written to a temporary name and renamed into place, as orbax commits by renaming) and then
``latest``. ``--resume`` takes the newest checkpoint whose commit record every rank finds and whose files match
it on every rank's disk, and says on one line which newer ones it skipped and why.

When ``out_dir`` is each node's own disk (checked with a marker file, not assumed), DeepSpeed's
``use_node_local_storage`` makes every node write the model states too, and each node commits its own files
(its local rank 0), so that every node holds what it needs to resume; all nodes agree on the tag, and a node
resumes only from a record its own node number wrote (a changed hostfile order would hand it another node's
optimizer shards).

A checkpoint of the launcher's saved before autowu wrote commit records has none: ``python -m
autowu.launcher.checkpoints <out_dir>/checkpoints/<tag>`` (``--node N`` on each node, for node-local storage)
loads every file of it once (a torn file fails to load) and then commits it. DeepSpeed's asynchronous checkpoint writers (``checkpoint.writer.decoupled``,
``datastates_ckpt``) return before their files exist: the launcher refuses them rather than commit files not
yet written.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch.distributed as dist

from ..environment import local_rank, node_rank
from ..errors import ConfigError, MissingFileError
from ..jsonfile import write_durably
from .nodes import is_shared_path

COMMIT_RECORD = "commit.json"
_TAG = re.compile(r"^epoch(\d+)(?:_step(\d+))?$")


@dataclass
class Verdict:
    tag: str
    problem: Optional[str]   # None: committed and whole on this rank's disk


class Checkpoints:
    def __init__(self, out_dir: str, ds_config: Dict[str, Any], source: str, log):
        """Decide the storage (before the engine is built: it edits ``ds_config``'s checkpoint block)."""
        self.dir = os.path.join(out_dir, "checkpoints")
        self.log = log
        writer = (ds_config.get("checkpoint") or {}).get("writer") or {}
        datastates = ds_config.get("datastates_ckpt") not in (None, False)  # DeepSpeed: on unless false
        if (isinstance(writer, dict) and writer.get("decoupled")) or datastates:
            what = "datastates_ckpt" if datastates else "checkpoint.writer.decoupled"
            raise ConfigError(f"{source}: {what}: DeepSpeed's asynchronous checkpoint writer returns before the "
                              "checkpoint's files exist, and the launcher commits a checkpoint only once every file "
                              "is on disk; remove it (checkpoint.writer without decoupled writes synchronously)")
        self.node_local = not is_shared_path(out_dir)
        if self.node_local:
            # DeepSpeed writes the model states on global rank 0 alone unless told otherwise: another node's
            # disk would hold its optimizer shards but no model to resume.
            if ds_config.get("checkpoint", {}).get("use_node_local_storage") is False:
                raise ConfigError(f"--out_dir {out_dir} is each node's own disk, and {source} sets "
                                 "checkpoint.use_node_local_storage false: no node but the first could resume; "
                                 "remove that setting or use a shared --out_dir")
            ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
            log.line(f"{out_dir} is node-local: every node keeps its own checkpoints (DeepSpeed's "
                     "use_node_local_storage)")

    @property
    def commits_here(self) -> bool:
        """Whether this process writes the commit record of its disk."""
        return local_rank() == 0 if self.node_local else dist.get_rank() == 0

    # ---------------------------------------------------------------- saving
    def save(self, engine, epoch: int, client_state: Optional[Dict[str, Any]] = None, mid_epoch: bool = False) -> str:
        """Save and commit; every rank calls it (DeepSpeed's save is collective). ``epoch``: epochs completed.
        Returns the tag."""
        tag = f"epoch{epoch}_step{engine.global_steps}" if mid_epoch else f"epoch{epoch}"
        state = {"epoch": epoch, **(client_state or {})}
        record = os.path.join(self.dir, tag, COMMIT_RECORD)
        if self.commits_here and os.path.exists(record):
            os.unlink(record)  # saving over an older one: uncommitted until the new files are all written
        engine.save_checkpoint(self.dir, tag=tag, client_state=state, save_latest=False)  # ends with a barrier
        if self.commits_here:
            self._commit(tag, epoch, engine.global_steps)
        dist.barrier()  # no rank goes on (or exits) before the checkpoint is committed on every disk
        return tag

    def _commit(self, tag: str, epoch: int, global_step: int, latest: bool = True) -> None:
        folder = os.path.join(self.dir, tag)
        files = _flushed_files(folder)
        record = {"tag": tag, "epoch": epoch, "global_step": global_step, "world_size": dist.get_world_size(),
                  "node": node_rank() if self.node_local else None, "files": files}
        write_durably(os.path.join(folder, COMMIT_RECORD), json.dumps(record, indent=1))
        if latest:  # DeepSpeed's pointer, for its own tools (zero_to_fp32, ds_to_universal)
            write_durably(os.path.join(self.dir, "latest"), tag)

    # ---------------------------------------------------------------- resuming
    def resume_tag(self) -> str:
        """The newest checkpoint committed and whole on every rank's disk; one line names those skipped."""
        names = [self._candidates()] if dist.get_rank() == 0 else [None]
        dist.broadcast_object_list(names, src=0)
        verdicts = [self._verdict(tag) for tag in names[0]]
        everyone: List[Optional[List[Verdict]]] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, verdicts)
        skipped = []
        for i, tag in enumerate(names[0]):
            problems = [(rank, v[i].problem) for rank, v in enumerate(everyone) if v[i].problem]
            if not problems:
                if skipped:
                    self.log.line(f"resume: skipped {'; '.join(skipped)}; taking {tag}")
                return tag
            rank, problem = problems[0]
            skipped.append(f"{tag} ({problem}" + (f", seen by rank {rank}" if dist.get_world_size() > 1 else "")
                           + ")")
        raise MissingFileError(f"--resume: no complete checkpoint in {self.dir}"
                                + (f"; skipped {'; '.join(skipped)}" if skipped else " (none saved yet)"))

    def _candidates(self) -> List[str]:
        """Checkpoint folders on this disk, newest first."""
        if not os.path.isdir(self.dir):
            return []
        tags = []
        for name in os.listdir(self.dir):
            match = _TAG.match(name)
            if match and os.path.isdir(os.path.join(self.dir, name)):
                # Order by (epochs completed, steps): a mid-epoch checkpoint is newer than its epoch's start.
                tags.append(((int(match.group(1)), int(match.group(2) or 0)), name))
        return [name for _, name in sorted(tags, reverse=True)]

    def _verdict(self, tag: str) -> Verdict:
        folder = os.path.join(self.dir, tag)
        try:
            record = self.record(tag)
        except FileNotFoundError:
            if glob.glob(os.path.join(folder, "*model_states.pt")):
                return Verdict(tag, "no commit record: its save never finished, or it was saved before autowu wrote "
                                    "them; if it finished, commit it with: python -m autowu.launcher.checkpoints "
                                    f"{folder}")
            return Verdict(tag, "no commit record: its save never finished")
        except (OSError, ValueError) as err:
            return Verdict(tag, f"unreadable commit record ({err})")
        if self.node_local and record.get("node") is None:
            return Verdict(tag, "its commit record names no node, and with node-local storage a node holds its "
                                "own ranks' shards: commit it on each node with python -m "
                                f"autowu.launcher.checkpoints {folder} --node <that node's number>")
        if self.node_local and record["node"] != node_rank():
            return Verdict(tag, f"committed on node {record['node']}'s disk, read by node {node_rank()}: with "
                                "node-local storage a node holds its own ranks' shards; start the job with the "
                                "hostfile in the order it was saved with")
        world, match = dist.get_world_size(), _TAG.match(tag)
        if match is None:  # a universal checkpoint (converted): any number of ranks loads it
            world = record["world_size"]
        if record["world_size"] != world and match.group(2):
            # Mid-epoch, the ranks' shares of the epoch's remaining batches depend on their number.
            return Verdict(tag, f"stopped mid-epoch on {record['world_size']} ranks, resumes on "
                                f"{record['world_size']} only")
        if record["world_size"] != world and self.node_local:
            return Verdict(tag, f"made on {record['world_size']} ranks with node-local storage: each node holds "
                                "its own ranks' optimizer shards only; to resume on another number of ranks, copy "
                                "every node's checkpoint files into one shared --out_dir")
        for name, size in record["files"].items():
            path = os.path.join(folder, name)
            if not os.path.isfile(path):
                return Verdict(tag, f"{name} is missing")
            if os.path.getsize(path) != size:
                return Verdict(tag, f"{name} has {os.path.getsize(path):,} bytes, its commit record says {size:,}")
        return Verdict(tag, None)

    def record(self, tag: str) -> Dict[str, Any]:
        with open(os.path.join(self.dir, tag, COMMIT_RECORD)) as f:
            return json.load(f)

    def prepare_resume(self, ds_config: Dict[str, Any]) -> str:
        """The tag to load (before the engine is built). A checkpoint made on another number of ranks is
        converted once into DeepSpeed's universal checkpoint (``ds_to_universal``, next to it as
        ``<tag>_universal``), which ``"checkpoint": {"load_universal": true}`` loads on any number of ranks:
        model, AdamP's moments and step, AutoWU's state."""
        tag = self.resume_tag()
        record = self.record(tag)
        made_on, world = record["world_size"], dist.get_world_size()
        if made_on == world:
            return tag
        converted = f"{tag}_universal"
        if self.commits_here and self._verdict(converted).problem:
            self.log.line(f"resume: {tag} was saved on {made_on} rank(s), this run has {world}: converting it to "
                          f"DeepSpeed's universal checkpoint {converted}")
            _to_universal(os.path.join(self.dir, tag), os.path.join(self.dir, converted))
            self._commit(converted, record["epoch"], record["global_step"], latest=False)
        dist.barrier()
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
        return converted

    def load(self, engine, tag: str) -> Dict[str, Any]:
        """Load ``tag`` into the engine (model, optimizer, scheduler); return its client state."""
        _, client_state = engine.load_checkpoint(self.dir, tag=tag)
        if client_state is None:
            raise MissingFileError(f"--resume: DeepSpeed could not load {self.dir}/{tag}")
        return client_state


def _files_to_commit(folder: str) -> Dict[str, str]:
    """Every file of a checkpoint folder but its commit record and temporary files: relative name -> path."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != COMMIT_RECORD and ".tmp" not in name:
                files[relative] = path
    return files


def _flushed_files(folder: str) -> Dict[str, int]:
    """Each file of the folder flushed to the disk (before the record says it is there: a crash cannot tear it),
    and its size."""
    sizes = {}
    for relative, path in _files_to_commit(folder).items():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        sizes[relative] = os.path.getsize(path)
    return sizes


def commit_existing(folder: str, node: Optional[int] = None) -> Dict[str, Any]:
    """Commit a launcher checkpoint folder that has no commit record (saved before autowu wrote them), once every
    file in it loads: a torn file (a save that never finished) fails here, not at resume. ``node``: the node whose
    disk this is, for node-local storage. Returns the record written."""
    import torch

    folder = os.path.normpath(folder)
    model_states = sorted(glob.glob(os.path.join(folder, "*model_states.pt")))
    if not model_states:
        raise MissingFileError(f"{folder}: no DeepSpeed model states (*model_states.pt): not a checkpoint folder")
    for path in _files_to_commit(folder).values():
        if path.endswith(".pt"):
            try:
                torch.load(path, map_location="cpu", weights_only=False)
            except Exception as err:  # noqa: BLE001  (any failure to load: the file is not whole)
                raise MissingFileError(f"{path} does not load ({type(err).__name__}: {err}); this checkpoint is "
                                       "not whole, resume from an older one") from None
    files = _flushed_files(folder)
    # DeepSpeed keeps the client state (the launcher's epoch) beside its own counters in the model states
    states = torch.load(model_states[0], map_location="cpu", weights_only=False)
    match = _TAG.match(os.path.basename(folder))
    record = {"tag": os.path.basename(folder), "epoch": int(states.get("epoch", match.group(1) if match else 0)),
              "global_step": int(states.get("global_steps", 0)), "world_size": int(states.get("dp_world_size", 1)),
              "node": node, "files": files, "committed_after_the_fact": True}
    write_durably(os.path.join(folder, COMMIT_RECORD), json.dumps(record, indent=1))
    return record


def _to_universal(source: str, target: str) -> None:
    """DeepSpeed's own converter, in a process of its own (it starts worker pools and prints a lot)."""
    import shutil
    import subprocess
    import sys
    shutil.rmtree(target, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", source,
                           "--output_folder", target, "--num_extract_workers", "1", "--num_merge_workers", "1",
                           "--inject_missing_state"], capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise MissingFileError(f"--resume: converting {source} to a universal checkpoint failed: {last}")


if __name__ == "__main__":
    import argparse
    import sys
    parser = argparse.ArgumentParser(description="Commit a launcher checkpoint saved without a commit record, once "
                                                 "every file of it loads.")
    parser.add_argument("folder", help="<out_dir>/checkpoints/<tag>")
    parser.add_argument("--node", type=int, default=None, help="this disk's node (node-local checkpoints only)")
    cli = parser.parse_args()
    try:
        committed = commit_existing(cli.folder, cli.node)
    except MissingFileError as err:
        sys.exit(f"error: {err}")
    print(f"committed {cli.folder}: {len(committed['files'])} files, epoch {committed['epoch']}, "
          f"step {committed['global_step']}, {committed['world_size']} rank(s)")
