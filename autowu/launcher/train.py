"""Train a timm model on FFCV betons with DeepSpeed and the AutoWU scheduler.

    deepspeed --hostfile hosts launch/train.py --deepspeed_config ds_configs/resnet50_4k.json \
        --data_dir /data/imagenet_betons --out_dir runs/rn50_4k

    # the embedded default: scikit-learn's digits, 2 CPU ranks, a minute or two
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_digits.json
    # the same with a fixed warmup and cosine to a chosen peak LR instead of AutoWU, to compare
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_digits_cosine.json

The JSON holds DeepSpeed's settings (batch sizes, fp16, ZeRO-1, ``"optimizer": {"type": "AdamP"}``,
``"scheduler": {"type": "AutoWU"}``) and a ``"train"`` block (model, epochs, seed, data config;
``autowu/launcher/run_config.py``, whose ``cli`` settings are also options here). ``--data_dir`` holds
``train.beton`` and ``val.beton`` (``launch/write_betons.py``). The run directory gets the resolved config,
``log.jsonl`` (losses, LRs, every AutoWU test, validation), DeepSpeed's TensorBoard and CSV monitors,
checkpoints (``--resume`` continues from the latest one) and, once AutoWU has switched, ``warmup_cosine.json``:
the same run at AutoWU's peak with a fixed warmup and cosine, to train the recipe again without the search.
``launch/plot_run.py <out_dir>`` draws the run.
"""
import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist

import autowu.deepspeed as autowu_ds
from autowu import environment
from autowu.batchnorm import gather_batchnorm_statistics, load_batchnorm_statistics, sync_batchnorm_statistics
from autowu.data import train_loader, val_loader
from autowu.ds_config import half_precision, load_config, resolve
from autowu.errors import UserError
from autowu.jsonfile import write_durably
from autowu.launcher.checkpoints import Checkpoints
from autowu.launcher.console import captured_stdout
from autowu.launcher.nodes import NodeTable, PeerWatch
from autowu.launcher.preemption import StopRequests
from autowu.launcher.processes import at_exit, end_process, exit_now, remove_cpu_shm_buffers
from autowu.launcher.run_config import REPO, RunSettings, data_config_of, split_config, warmup_cosine_rerun
from autowu.launcher.runlog import RunLog
from autowu.launcher.training import (EpochProgress, build_model, check_batchnorm_statistics, describe_recipe,
                                      evaluate, num_classes_of, prepare_data, train_one_epoch)
from autowu.scheduler import AutoWU
from autowu.settings import add_cli_overrides, cli_overrides


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="folder with train.beton and val.beton")
    parser.add_argument("--out_dir", default=None, help="run directory (default: runs/<config name>)")
    add_cli_overrides(parser, RunSettings)  # --model, --epochs, --seed: declared with the "train" settings
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("--stop_after_epoch", type=int, default=None,
                        help="end this process after that epoch (checkpointed), as a preemption would")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="run an fp16/bf16 config on the CPU (otherwise a missing GPU is an error)")
    parser.add_argument("--dist_timeout_minutes", type=float, default=10.0,
                        help="how long a collective waits for a silent peer before the run stops")
    parser.add_argument("--stop_timeout_s", type=float, default=25.0,
                        help="after SIGTERM/SIGUSR1/SIGINT, how long the checkpoint may take before the process ends "
                             "at once (DeepSpeed's launcher kills its ranks 30 s after relaying a signal)")
    parser.add_argument("--verbose", action="store_true",
                        help="show DeepSpeed's and torch's own logs and warnings (quiet by default)")
    parser.add_argument("--local_rank", type=int, default=environment.local_rank())
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (a JSON file from ds_configs/)")
    return args


def setup_distributed(args):
    """Process group and device (and, on CPU ranks, the removal of DeepSpeed's shared-memory buffers however the
    process ends); returns the device."""
    if not environment.threads_set_by_user():  # DeepSpeed forwards few variables to other nodes: not this one
        torch.set_num_threads(max(1, environment.usable_cores() // environment.local_world_size()))
    with captured_stdout(not args.verbose):
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(minutes=args.dist_timeout_minutes))
    device = torch.device("cuda", args.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and environment.master_port() is not None:
        port, rank = environment.master_port(), environment.local_rank()
        at_exit(lambda: remove_cpu_shm_buffers(port, rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any collective: nccl's object collectives use the current device
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels (ffcv-imagenet)
    return device


def watch_peers():
    """Every rank's node, one line from each node, and heartbeats that name a lost node (none on one rank)."""
    nodes = NodeTable()
    if len(nodes.nodes) > 1 and environment.local_rank() == 0:
        print(f"[train] {nodes.describe_node(environment.node_rank())} of {len(nodes.nodes)} nodes", flush=True)
    return PeerWatch(nodes) if dist.get_world_size() > 1 else None


def load_settings(args, device):
    """The config's DeepSpeed part and run settings (command-line overrides applied), and the data config."""
    ds_config, run = split_config(args.deepspeed_config)
    half = half_precision(ds_config)
    if half and device.type != "cuda" and not args.allow_cpu:
        # A CUDA build of torch on a driver too old for it reports no GPU: without this, a GPU job would
        # silently train on the CPU.
        raise UserError(f"{args.deepspeed_config} asks for {half} but CUDA is not available "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); check the driver, or "
                           "pass --allow_cpu to run on the CPU on purpose")
    run = dataclasses.replace(run, **cli_overrides(args, RunSettings))
    return ds_config, run, data_config_of(run)


def route_monitors(ds_config, out_dir):
    """DeepSpeed's TensorBoard and CSV monitors write into the run directory."""
    for monitor in ("tensorboard", "csv_monitor"):
        if ds_config.get(monitor, {}).get("enabled"):
            ds_config[monitor] = {**ds_config[monitor], "output_path": os.path.join(out_dir, "monitor"),
                                  "job_name": ds_config[monitor].get("job_name", "autowu")}


def build_loaders(data_dir, run, data_config, micro_batch, accumulation, device):
    """The betons' loaders, and what the run needs to know of them: (beton infos, train loader, val loader,
    optimizer steps an epoch, classes)."""
    paths, infos = prepare_data(data_dir, run)
    num_classes = run.num_classes or num_classes_of(paths["train"])
    distributed = dist.get_world_size() > 1
    loader = train_loader(paths["train"], data_config.train, micro_batch, device=device, distributed=distributed,
                          seed=run.seed)
    steps_per_epoch = len(loader) // accumulation
    if steps_per_epoch < 1:
        raise UserError(f"{paths['train']}: {len(loader)} micro-batches a rank, fewer than one optimizer step of "
                         f"{accumulation} accumulated micro-batches")
    val = val_loader(paths["val"], data_config.val, device=device, distributed=distributed)
    return infos, loader, val, steps_per_epoch, num_classes


def end_on_lost_peer(err, watch, checkpoints):
    """A rank or a node is gone (killed, crashed, unreachable): its peers' collectives fail. Name it, end this
    process now (no teardown that would wait on the dead peer), and leave the last checkpoint. Returns if every
    peer lives on (the error is this rank's own)."""
    lost = watch.lost_ranks() if watch else []
    if lost == []:
        return
    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    print(f"[train] rank {dist.get_rank()} (node {environment.node_rank()}): {watch.describe(lost)}. This run stops "
          f"here ({type(err).__name__}: {first_line}); continue from the last checkpoint in {checkpoints.dir} with "
          "--resume", flush=True)
    exit_now(1)


def main(argv=None):
    args = parse_args(argv)
    device = setup_distributed(args)
    world = dist.get_world_size()
    watch = watch_peers()

    ds_config, run, data_config = load_settings(args, device)
    out_dir = args.out_dir or os.path.join(REPO, "runs", os.path.splitext(os.path.basename(args.deepspeed_config))[0])
    os.makedirs(out_dir, exist_ok=True)
    log = RunLog(out_dir)
    route_monitors(ds_config, out_dir)
    checkpoints = Checkpoints(out_dir, ds_config, args.deepspeed_config, log)
    resume_tag = checkpoints.prepare_resume(ds_config) if args.resume else None
    # The whole config checked once, now (before the data): what it asks of AutoWU and AdamP, the batch.
    resolved = resolve(ds_config, source=args.deepspeed_config, total_epochs=run.epochs, seed=run.seed,
                       world_size=world)
    micro_batch, accumulation = resolved.micro_batch, resolved.accumulation

    infos, loader, val, steps_per_epoch, num_classes = build_loaders(args.data_dir, run, data_config, micro_batch,
                                                                     accumulation, device)
    # Installed once the data is built: a process forked after it (the image check's pool) inherits it.
    stop = StopRequests(run.stop_check_every, timeout_s=args.stop_timeout_s)
    resolved = resolved.with_steps_per_epoch(steps_per_epoch)

    # The model and the engine: the optimizer (AdamP, ZeRO-aware) and AutoWU (or a reference schedule) from the JSON.
    torch.manual_seed(run.seed)
    model = build_model(run, num_classes, device, world > 1)
    engine, _, _, scheduler = autowu_ds.initialize(model=model, config=resolved)
    log.monitor = engine.monitor
    dtype = check_batchnorm_statistics(engine, device)
    recipe = describe_recipe(engine, device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=run.label_smoothing)
    start_epoch, progress = resume(engine, checkpoints, resume_tag, loader, device, log) if resume_tag else (0, None)

    log.write_run_config({"deepspeed": resolved.deepspeed, "train": dataclasses.asdict(run),
                          "data": data_config.to_dict(), "args": vars(args), "world_size": world,
                          "gradient_accumulation_steps": accumulation, "steps_per_epoch": steps_per_epoch,
                          "num_classes": num_classes, "betons": infos, "recipe": recipe})
    log.line(f"{run.model} ({num_classes} classes) on {world} rank(s) ({device.type}, {dtype}); global batch "
             f"{resolved.deepspeed['train_batch_size']} = {micro_batch} x {world} x {accumulation}; {steps_per_epoch} "
             f"steps an epoch, {run.epochs} epochs; {infos['train']['num_samples']} train / "
             f"{infos['val']['num_samples']} val images")
    log.line("recipe: " + "; ".join(f"{k} {v}" for k, v in recipe.items()))

    autowu = scheduler if isinstance(scheduler, AutoWU) else None  # else a reference schedule from the config
    result = None
    try:
        for epoch in range(start_epoch, run.epochs):
            started = time.perf_counter()
            trained = train_one_epoch(engine, loader, criterion, steps_per_epoch, accumulation, dtype, log,
                                      run.log_every, autowu, description=f"epoch {epoch + 1}/{run.epochs}",
                                      progress=progress, stop=stop)
            progress = None
            if trained.stopped_by:
                stop_now(engine, checkpoints, stop, log, epoch, trained.progress, watch)
            # One set of BatchNorm statistics (DeepSpeed never syncs buffers): what is evaluated, checkpointed and
            # reported is the same model on every rank.
            sync_batchnorm_statistics(engine.module)
            result = evaluate(engine, val, infos["val"]["num_samples"], dtype)
            log_epoch(log, engine, epoch, run.epochs, trained, result, time.perf_counter() - started, autowu)
            last = epoch + 1 == run.epochs
            stopping = args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch
            saved = None
            if last or stopping or (epoch + 1) % run.checkpoint_every == 0:
                saved = checkpoints.save(engine, epoch + 1)
            if not last and stop.agreed(engine.global_steps, force=True):
                stop_now(engine, checkpoints, stop, log, epoch + 1, None, watch, saved)
            if stopping and not last:
                log.line(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
                break
    except Exception as err:
        end_on_lost_peer(err, watch, checkpoints)
        raise
    if watch:
        watch.stop()
    stop.restore()
    log_final(log, out_dir, result or evaluate(engine, val, infos["val"]["num_samples"], dtype), scheduler, autowu,
              stopped_early=args.stop_after_epoch is not None,
              rerun=write_rerun_config(log, out_dir, args.deepspeed_config, run, autowu))
    log.close()
    end_process(0)


def resume(engine, checkpoints, tag, loader, device, log):
    """Load ``tag``; set the loader where the run stood. Returns (epochs completed, the epoch's progress or None)."""
    state = checkpoints.load(engine, tag)
    epoch, progress = int(state["epoch"]), None
    loader.next_epoch = epoch  # FFCV does not checkpoint its epoch: the same order as an unbroken run
    if "progress" in state:  # stopped inside epoch + 1
        progress = EpochProgress.from_state_dict(state["progress"], device)
        loader.skip_next(progress.batches_done)
        by_rank = state.get("batchnorm_by_rank") or []
        if len(by_rank) == dist.get_world_size():  # each rank's own running statistics, as they were
            load_batchnorm_statistics(engine.module, by_rank[dist.get_rank()])
    log.line(f"resumed from {checkpoints.dir}/{tag} at epoch {epoch}" +
             (f", batch {progress.batches_done} of epoch {epoch + 1}" if progress else "") +
             f" (step {engine.global_steps})")
    return epoch, progress


def stop_now(engine, checkpoints, stop, log, epoch, progress, watch, saved=None):
    """The ranks agreed to stop on a signal: checkpoint where the run stands (unless ``saved`` is that
    checkpoint's tag already), say so, exit 128 + the signal."""
    tag, state = saved, None
    if progress is not None:  # inside epoch + 1: where it stood, and every rank's BatchNorm statistics
        state = {"progress": progress.state_dict(), "batchnorm_by_rank": gather_batchnorm_statistics(engine.module)}
    if tag is None:
        tag = checkpoints.save(engine, epoch, client_state=state, mid_epoch=progress is not None)
    stop.done()
    log.line(f"stopped by {signal.Signals(stop.signum).name} at step {engine.global_steps}: checkpoint "
             f"{checkpoints.dir}/{tag} committed; exit {stop.exit_code}; continue with --resume")
    log.close()
    if watch:
        watch.stop()
    exit_now(stop.exit_code)


def log_epoch(log, engine, epoch, epochs, trained, result, seconds, autowu):
    log.line(f"epoch {epoch + 1}/{epochs}: loss {trained.mean_loss:.3f}, val top-1 {result.top1 * 100:.2f}% top-5 "
             f"{result.top5 * 100:.2f}%, lr {engine.get_lr()[0]:.3g}" + (f" ({autowu.phase})" if autowu else "") +
             f", {trained.images_per_s:,.0f} img/s, {seconds:.1f} s")
    log.record("val", epoch=epoch + 1, step=engine.global_steps, top1=result.top1, top5=result.top5,
               images=result.images, seconds=seconds)
    log.scalars([("Val/top1", result.top1, engine.global_steps), ("Val/top5", result.top5, engine.global_steps)])


def write_rerun_config(log, out_dir, config_path, run, autowu):
    """Rank 0: once AutoWU has switched, ``warmup_cosine.json`` in the run directory: this run's config (its
    "train" block as run, command-line overrides included) with AutoWU replaced by a fixed warmup and cosine to
    the peak it found (``autowu.launcher.run_config.warmup_cosine_rerun``), to train the recipe again without the search.
    Returns its path, or None."""
    # (A peak that is not a positive number writes nothing: the end of a finished run is no place for an error.)
    if not (autowu and autowu.switch_step is not None and log.is_writer and (autowu.peak_lr or 0) > 0):
        return None
    config = load_config(config_path)
    config["train"] = dataclasses.asdict(run)
    path = os.path.join(out_dir, "warmup_cosine.json")
    write_durably(path, json.dumps(warmup_cosine_rerun(config, autowu.peak_lr), indent=2))  # never half-written
    return path


def log_final(log, out_dir, result, scheduler, autowu, stopped_early, rerun=None):
    top1, top5 = result.top1, result.top5
    if autowu and autowu.switch_step is None and not stopped_early:
        log.line("AutoWU did not switch during this run")
    schedule = (f"AutoWU switch step {autowu.switch_step}, peak LR {autowu.peak_lr}" if autowu else
                f"schedule {type(scheduler).__name__} (from the config)")
    log.line(f"final: top-1 {top1 * 100:.2f}% top-5 {top5 * 100:.2f}%; {schedule}; run directory {out_dir}")
    if rerun:
        log.line(f"to train this recipe again at AutoWU's peak LR without its search (5% warmup, cosine): "
                 f"--deepspeed_config {rerun}")
    # The rerun config's name within the run directory: the log stays the same wherever the run directory is.
    log.record("final", top1=top1, top5=top5, switch_step=autowu.switch_step if autowu else None,
               peak_lr=autowu.peak_lr if autowu else None, schedule=type(scheduler).__name__,
               rerun_config=os.path.relpath(rerun, out_dir) if rerun else None)


def cli(argv=None):
    """The launcher's command: a user's error (a config, a path, a world size, a checkpoint: ``UserError``) is one
    line and exit 2, not a traceback from every rank; anything else is the package's bug and keeps its traceback
    (as does a user's error with ``--verbose``)."""
    try:
        main(argv)
    except UserError as err:
        if "--verbose" in (argv if argv is not None else sys.argv):
            raise
        report_user_error(err)


def report_user_error(err):
    """Rank 0 says it; another rank says it only if it is still alive a moment later (the error was its own:
    when every rank fails alike, DeepSpeed's launcher ends the others as soon as rank 0 exits). Then exit 2."""
    rank = dist.get_rank() if dist.is_initialized() else environment.rank()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    message = " ".join(str(err).split()) or type(err).__name__
    if rank != 0:
        time.sleep(3)
    print(f"[train] error{f' on rank {rank}' if rank else ''}: {message}", file=sys.stderr, flush=True)
    exit_now(2, run_atexit=True)


if __name__ == "__main__":
    cli()
