"""Train a timm model on FFCV betons with DeepSpeed and the AutoWU scheduler.

    deepspeed --hostfile hosts launch/train.py --deepspeed_config ds_configs/resnet50_4k.json \
        --data_dir /data/imagenet_betons --out_dir runs/rn50_4k

    # the embedded default: scikit-learn's digits, 2 CPU ranks, a minute or two
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_digits.json
    # the same with a fixed warmup and cosine to a chosen peak LR instead of AutoWU, to compare
    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/cpu_digits_cosine.json

The JSON holds DeepSpeed's settings (batch sizes, fp16, ZeRO-1, ``"optimizer": {"type": "AdamP"}``,
``"scheduler": {"type": "AutoWU"}``) and a ``"train"`` block (model, epochs, data config; ``autowu/run_config.py``). ``--data_dir`` holds
``train.beton`` and ``val.beton`` (``launch/write_betons.py``). The run directory gets the resolved config,
``log.jsonl`` (losses, LRs, every AutoWU test, validation), DeepSpeed's TensorBoard and CSV monitors, and
checkpoints; ``--resume`` continues from the latest one. ``launch/plot_run.py <out_dir>`` draws the run.
"""
import argparse
import atexit
import dataclasses
import json
import math
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autowu.console import captured_stdout, quiet_third_party  # noqa: E402

if "--verbose" not in sys.argv:  # read before deepspeed is imported: its import already logs
    quiet_third_party(torch.cuda.is_available())

import deepspeed  # noqa: E402

import autowu.deepspeed as autowu_ds  # noqa: E402
from autowu.batchnorm import batchnorm_statistics, convert_sync_batchnorm, sync_batchnorm_statistics  # noqa: E402
from autowu.data import DataConfig, beton_info, train_loader, val_loader, write_betons  # noqa: E402
from autowu.data.digits import build_digits_folder  # noqa: E402
from autowu.nodes import NodeTable, PeerWatch, collective_device, is_shared_path, local_rank, node_rank  # noqa: E402
from autowu.run_config import resolve_batch, resolve_schedule_steps, split_config  # noqa: E402
from autowu.scheduler import AutoWU  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="folder with train.beton and val.beton")
    parser.add_argument("--out_dir", default=None, help="run directory (default: runs/<config name>)")
    parser.add_argument("--model", default=None, help="timm model name (overrides the config)")
    parser.add_argument("--epochs", type=int, default=None, help="overrides the config")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("--stop_after_epoch", type=int, default=None,
                        help="end this process after that epoch (checkpointed), as a preemption would")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allow_cpu", action="store_true",
                        help="run an fp16/bf16 config on the CPU (otherwise a missing GPU is an error)")
    parser.add_argument("--dist_timeout_minutes", type=float, default=10.0,
                        help="how long a collective waits for a silent peer before the run stops")
    parser.add_argument("--verbose", action="store_true",
                        help="show DeepSpeed's and torch's own logs and warnings (quiet by default)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    if not args.deepspeed_config:
        parser.error("--deepspeed_config is required (a JSON file from ds_configs/)")
    return args


def log(message):
    """One line from rank 0, above the progress bar if one is showing."""
    if dist.get_rank() == 0:
        from tqdm import tqdm
        tqdm.write(f"[train] {message}", file=sys.stdout)
        sys.stdout.flush()


class JsonLog:
    """JSON lines on rank 0: one object a record, flushed at once so that a crash loses nothing."""

    def __init__(self, path, enabled):
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, **record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def prepare_data(args, run, out_dir):
    """The betons to train on: ``--data_dir`` (the same path on every node, each node's own copy or a shared
    disk), or the embedded digits dataset, built once per node-local disk (each node's local rank 0), or once
    (rank 0) when the disk is shared."""
    if args.data_dir:
        data_dir = args.data_dir
    elif run.default_data == "digits":
        data_dir = os.path.join(REPO, "data", "digits", "betons")
        builder = dist.get_rank() == 0 if is_shared_path(os.path.dirname(data_dir)) else local_rank() == 0
        if builder and not os.path.exists(os.path.join(data_dir, "val.beton")):
            print("[train] no --data_dir: building the embedded dataset (scikit-learn's digits as JPEGs)", flush=True)
            folders = build_digits_folder(os.path.join(REPO, "data", "digits", "folders"))
            write_betons(folders, data_dir, DataConfig.from_json(os.path.join(REPO, run.data_config)).write)
        dist.barrier()
    else:
        raise ValueError("--data_dir is required: a folder with train.beton and val.beton "
                         "(write them with launch/write_betons.py)")
    paths = {split: os.path.join(data_dir, f"{split}.beton") for split in ("train", "val")}
    infos = {split: beton_info(path) for split, path in paths.items()}  # one clear error if missing
    return paths, infos


def num_classes_of(path):
    from ffcv.reader import Reader
    reader = Reader(path)
    labels = reader.metadata[f"f{list(reader.field_names).index('label')}"]
    return int(labels.max()) + 1


def build_model(run, num_classes, device, distributed):
    import timm
    try:
        model = timm.create_model(run.model, num_classes=num_classes)
    except RuntimeError as err:
        if "Unknown model" not in str(err):
            raise
        close = timm.list_models(f"*{run.model.split('_')[0]}*")[:8]
        raise ValueError(f"unknown model {run.model!r} (timm); similar names: {close}") from None
    if run.sync_bn and distributed:
        if device.type != "cuda":
            raise ValueError("train.sync_bn: torch's SyncBatchNorm runs on GPUs only; set it false for a CPU run "
                             "(each rank then normalises its own batch, and the running statistics are averaged "
                             "before every evaluation and checkpoint)")
        model = convert_sync_batchnorm(model)  # timm's: keeps BatchNormAct2d's activation
    model = model.to(device)
    if run.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def describe_recipe(engine, ds_config, device):
    """What actually runs, read from the engine (not the config): for the log and run_config.json."""
    from timm.layers import SyncBatchNormAct
    basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
    modules = list(engine.module.modules())
    sync = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in modules)
    norm = (f"SyncBatchNorm in {sync} layers ({sum(isinstance(m, SyncBatchNormAct) for m in modules)} with their "
            "activation, timm's)" if sync else "per-rank BatchNorm, running statistics averaged over ranks "
            "before each evaluation and checkpoint")
    convs = [m.weight for m in modules if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    channels_last = sum(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    return {"optimizer": f"{type(basic).__module__}.{type(basic).__name__}",
            "conv_weights": f"{channels_last} of {len(convs)} channels_last" + (
                " (ZeRO binds them to NCHW views of its flat buffer)" if convs and autowu_ds.zero_stage(ds_config)
                and channels_last < len(convs) else ""),
            "zero_stage": autowu_ds.zero_stage(ds_config),
            "precision": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
            "batchnorm": norm, "device": device.type,
            "fp16_loss_scaler": ("dynamic, skips overflowing steps at its minimum scale instead of ending the run"
                                 if engine.fp16_enabled() and not getattr(engine.optimizer.loss_scaler,
                                                                          "raise_error_at_min_scale", True)
                                 else "DeepSpeed's" if engine.fp16_enabled() else "none (fp32/bf16)")}


def evaluate(engine, loader, num_samples, dtype):
    """Top-1/top-5 over the whole validation set, all-reduced; the padding duplicates are not counted."""
    world, rank = dist.get_world_size(), dist.get_rank()
    pad = math.ceil(num_samples / world) * world - num_samples
    # DistributedSampler pads by repeating the first samples; they land last on ranks >= N mod world.
    my_count = math.ceil(num_samples / world) - (1 if pad and rank >= num_samples % world else 0)
    totals = torch.zeros(3, dtype=torch.float64, device=engine.device)
    seen = counted = 0
    engine.eval()
    with torch.no_grad():
        for images, labels in loader:
            keep = min(len(labels), my_count - seen)
            seen += len(labels)
            if keep <= 0:
                continue
            logits = engine(images.to(dtype))[:keep].float()
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:keep, None]
            totals[:2] += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum()]).to(totals)
            counted += keep  # counted on the host: no tensor made from a Python number per batch
    engine.train()
    totals[2] = counted
    dist.all_reduce(totals)
    return (totals[0] / totals[2]).item(), (totals[1] / totals[2]).item(), int(totals[2].item())


def latest_checkpoint(checkpoint_dir):
    """The tag to resume from: rank 0's 'latest', which every rank's disk must hold (node-local or shared)."""
    latest = os.path.join(checkpoint_dir, "latest")
    tag = [open(latest).read().strip() if dist.get_rank() == 0 and os.path.isfile(latest) else None]
    dist.broadcast_object_list(tag, src=0)
    if tag[0] is None:
        raise FileNotFoundError(f"--resume: no checkpoint in {checkpoint_dir} (no 'latest' file)")
    here = torch.tensor([int(os.path.isdir(os.path.join(checkpoint_dir, tag[0])))], device=collective_device())
    everywhere = here.clone()
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    if not everywhere.item():
        raise FileNotFoundError(f"--resume: checkpoint {tag[0]} (rank 0's latest) is missing on "
                                f"{'this node' if not here.item() else 'another node'}: {checkpoint_dir}/{tag[0]}")
    return tag[0]


def main(argv=None):
    args = parse_args(argv)
    if "OMP_NUM_THREADS" not in os.environ:  # DeepSpeed forwards few variables to other nodes: not this one
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_SIZE", "1"))))
    with captured_stdout(not args.verbose):
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=timedelta(minutes=args.dist_timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", args.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu" and "MASTER_PORT" in os.environ:
        atexit.register(autowu_ds.remove_cpu_shm_buffers, os.environ["MASTER_PORT"], local_rank())
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any collective: nccl's object collectives use the current device
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels (ffcv-imagenet)
    nodes = NodeTable()
    watch = PeerWatch(nodes) if world > 1 else None
    if len(nodes.nodes) > 1 and local_rank() == 0:  # one line from each node
        print(f"[train] {nodes.describe_node(node_rank())} of {len(nodes.nodes)} nodes", flush=True)

    # ---- config: DeepSpeed's part, the run's part, the data's
    ds_config, run = split_config(args.deepspeed_config)
    half = autowu_ds.half_precision(ds_config)
    if half and device.type != "cuda" and not args.allow_cpu:
        # A CUDA build of torch on a driver too old for it reports no GPU: without this, a GPU job would
        # silently train on the CPU.
        raise RuntimeError(f"{args.deepspeed_config} asks for {half} but CUDA is not available "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); check the driver, or "
                           "pass --allow_cpu to run on the CPU on purpose")
    if args.model:
        run = dataclasses.replace(run, model=args.model)
    if args.epochs:
        run = dataclasses.replace(run, epochs=args.epochs)
    accumulation = resolve_batch(ds_config, world, args.deepspeed_config)
    data_config = DataConfig.from_json(os.path.join(REPO, run.data_config))
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    out_dir = args.out_dir or os.path.join(REPO, "runs", os.path.splitext(os.path.basename(args.deepspeed_config))[0])
    os.makedirs(out_dir, exist_ok=True)
    for monitor in ("tensorboard", "csv_monitor"):
        if ds_config.get(monitor, {}).get("enabled"):
            ds_config[monitor] = {**ds_config[monitor], "output_path": os.path.join(out_dir, "monitor"),
                                  "job_name": ds_config[monitor].get("job_name", "autowu")}

    # ---- data
    paths, infos = prepare_data(args, run, out_dir)
    num_classes = run.num_classes or num_classes_of(paths["train"])
    if data_config.train.batch_size not in (None, micro_batch):
        raise ValueError(f"{run.data_config}: train.batch_size {data_config.train.batch_size} disagrees with "
                         f"{args.deepspeed_config}'s train_micro_batch_size_per_gpu {micro_batch}; remove it from "
                         "the data config (the DeepSpeed config sets the per-rank batch)")
    train_config = dataclasses.replace(data_config.train, batch_size=micro_batch)
    checkpoint_dir = os.path.join(out_dir, "checkpoints")
    node_local_checkpoints = not is_shared_path(out_dir)
    if node_local_checkpoints:
        # DeepSpeed writes the model states on global rank 0 alone unless told otherwise: another node's
        # disk would hold its optimizer shards but no model to resume.
        if ds_config.get("checkpoint", {}).get("use_node_local_storage") is False:
            raise ValueError(f"--out_dir {out_dir} is each node's own disk, and {args.deepspeed_config} sets "
                             "checkpoint.use_node_local_storage false: no node but the first could resume; "
                             "remove that setting or use a shared --out_dir")
        ds_config.setdefault("checkpoint", {})["use_node_local_storage"] = True
        log(f"{out_dir} is node-local: every node keeps its own checkpoints (DeepSpeed's use_node_local_storage)")
    start_epoch = 0
    resume_tag = latest_checkpoint(checkpoint_dir) if args.resume else None
    loader = train_loader(paths["train"], train_config, device=device, distributed=world > 1, seed=args.seed)
    steps_per_epoch = len(loader) // accumulation
    if steps_per_epoch < 1:
        raise ValueError(f"{paths['train']}: {len(loader)} micro-batches a rank, fewer than one optimizer step of "
                         f"{accumulation} accumulated micro-batches")
    val = val_loader(paths["val"], data_config.val, device=device, distributed=world > 1)

    # ---- model, engine: the optimizer (AdamP, ZeRO-aware) and AutoWU (or a reference schedule) from the JSON
    resolve_schedule_steps(ds_config, steps_per_epoch * run.epochs, args.deepspeed_config)
    torch.manual_seed(args.seed)
    model = build_model(run, num_classes, device, world > 1)
    engine, _, _, scheduler = autowu_ds.initialize(model=model, config=ds_config,
                                                   steps_per_epoch=steps_per_epoch, total_epochs=run.epochs)
    dtype = next(engine.module.parameters()).dtype
    half_statistics = [b for b in batchnorm_statistics(engine.module) if b.dtype != torch.float32]
    if half_statistics:
        # DeepSpeed before 0.19.2 (module.half()) or a "buffer_dtype" setting: SyncBatchNorm would count the
        # rank's 3.2M elements a channel in fp16 (inf, then NaN) and running statistics would lose precision.
        raise ValueError(f"{len(half_statistics)} BatchNorm statistics are {half_statistics[0].dtype} after "
                         f"DeepSpeed's initialize (DeepSpeed {deepspeed.__version__}); they must stay fp32: use "
                         "DeepSpeed >= 0.19.2 and no buffer_dtype in the config")
    if dtype != torch.float32 and device.type == "cpu":
        for buffer in engine.module.buffers():  # CPU BatchNorm wants its running stats in the weights' dtype
            if buffer.is_floating_point():
                buffer.data = buffer.data.to(dtype)
    recipe = describe_recipe(engine, ds_config, device)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=run.label_smoothing)
    if args.resume:
        _, client_state = engine.load_checkpoint(checkpoint_dir, tag=resume_tag)
        start_epoch = client_state["epoch"]
        loader.next_epoch = start_epoch  # FFCV does not checkpoint its epoch: the same order as an unbroken run
        log(f"resumed from {checkpoint_dir} at epoch {start_epoch} (step {engine.global_steps})")

    json_log = JsonLog(os.path.join(out_dir, "log.jsonl"), rank == 0)
    if rank == 0:
        resolved = {"deepspeed": ds_config, "train": json.loads(json.dumps(run, default=lambda o: o.__dict__)),
                    "data": data_config.to_dict(), "args": vars(args), "world_size": world,
                    "gradient_accumulation_steps": accumulation, "steps_per_epoch": steps_per_epoch,
                    "num_classes": num_classes, "betons": infos, "recipe": recipe}
        with open(os.path.join(out_dir, "run_config.json"), "w", encoding="utf-8") as f:
            json.dump(resolved, f, indent=1, default=str)
    log(f"{run.model} ({num_classes} classes) on {world} rank(s) ({device.type}, {dtype}); global batch "
        f"{ds_config['train_batch_size']} = {micro_batch} x {world} x {accumulation}; {steps_per_epoch} steps an "
        f"epoch, {run.epochs} epochs; {infos['train']['num_samples']} train / {infos['val']['num_samples']} val images")
    log("recipe: " + "; ".join(f"{k} {v}" for k, v in recipe.items()))

    # ---- train
    from tqdm import tqdm
    autowu = scheduler if isinstance(scheduler, AutoWU) else None  # else a reference schedule from the config
    tests_logged = len(autowu.history) if autowu else 0
    top1 = top5 = float("nan")
    try:
        for epoch in range(start_epoch, run.epochs):
            # Rank 0's bar on a terminal only, cleared at the epoch's end: a log file gets the epoch's line alone.
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{run.epochs}", leave=False,
                       disable=rank != 0 or not sys.stdout.isatty(), dynamic_ncols=True, file=sys.stdout)
            loss_sum, loss_count, started, interval_start = None, 0, time.perf_counter(), time.perf_counter()
            epoch_loss_sum, epoch_loss_count = None, 0
            for micro_step, (images, labels) in enumerate(loader):
                if micro_step >= steps_per_epoch * accumulation:
                    break
                loss = criterion(engine(images.to(dtype)).float(), labels)
                engine.backward(loss)
                engine.step()
                detached = loss.detach()
                loss_sum = detached if loss_sum is None else loss_sum + detached  # stays on the device
                epoch_loss_sum = detached if epoch_loss_sum is None else epoch_loss_sum + detached
                loss_count += 1
                epoch_loss_count += 1
                if (micro_step + 1) % accumulation:
                    continue
                bar.update()
                step = engine.global_steps
                if step % run.log_every == 0 or micro_step + 1 == steps_per_epoch * accumulation:
                    mean_loss = (loss_sum / loss_count).item()  # one host sync every log_every steps
                    rate = loss_count * micro_batch * world / (time.perf_counter() - interval_start)
                    lr = engine.get_lr()[0]
                    bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                    json_log.write(kind="train", step=step, epoch=step / steps_per_epoch, loss=mean_loss,
                                   lr=lr, images_per_s=rate)
                    engine.monitor.write_events([("Train/loss", mean_loss, step)]) if rank == 0 else None
                    loss_sum, loss_count, interval_start = None, 0, time.perf_counter()
                for record in (autowu.history[tests_logged:] if autowu else ()):  # each AutoWU test, as it happens
                    json_log.write(kind="autowu_test", **record)
                    if rank == 0:
                        engine.monitor.write_events([
                            (f"AutoWU/{k}", float(record[k]), record["step"])
                            for k in ("probability", "votes", "argmin_lr", "passed", "switched")])
                    if record["switched"]:
                        log(f"AutoWU switched at step {record['step']} (epoch {record['epoch']:.1f}): "
                            f"peak LR {autowu.peak_lr:.4g}" + (" (warmup cap)" if record["at_cap"] else ""))
                        json_log.write(kind="autowu_switch", **autowu.switch_curve,
                                       peak_lr=autowu.peak_lr, total_steps=autowu.total_steps)
                tests_logged = len(autowu.history) if autowu else 0
            bar.close()

            # One set of BatchNorm statistics (DeepSpeed never syncs buffers): what is evaluated, checkpointed and
            # reported is the same model on every rank.
            sync_batchnorm_statistics(engine.module)
            train_seconds = time.perf_counter() - started
            top1, top5, counted = evaluate(engine, val, infos["val"]["num_samples"], dtype)
            epoch_seconds = time.perf_counter() - started
            epoch_loss = (epoch_loss_sum / epoch_loss_count).item() if epoch_loss_count else float("nan")
            log(f"epoch {epoch + 1}/{run.epochs}: loss {epoch_loss:.3f}, val top-1 {top1 * 100:.2f}% top-5 "
                f"{top5 * 100:.2f}%, lr {engine.get_lr()[0]:.3g}" + (f" ({autowu.phase})" if autowu else "") +
                f", {epoch_loss_count * micro_batch * world / train_seconds:,.0f} img/s, {epoch_seconds:.1f} s")
            json_log.write(kind="val", epoch=epoch + 1, step=engine.global_steps, top1=top1, top5=top5,
                           images=counted, seconds=epoch_seconds)
            if rank == 0:
                engine.monitor.write_events([("Val/top1", top1, engine.global_steps),
                                             ("Val/top5", top5, engine.global_steps)])
            last = epoch + 1 == run.epochs
            stopping = args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch
            if last or stopping or (epoch + 1) % run.checkpoint_every == 0:
                engine.save_checkpoint(checkpoint_dir, tag=f"epoch{epoch + 1}", client_state={"epoch": epoch + 1})
                if node_local_checkpoints and local_rank() == 0 and rank != 0:
                    # DeepSpeed writes 'latest' on global rank 0 only; this node's copy of the run needs its own.
                    with open(os.path.join(checkpoint_dir, "latest"), "w") as f:
                        f.write(f"epoch{epoch + 1}")
            if stopping and not last:
                log(f"stopping after epoch {epoch + 1} as asked; continue with --resume")
                break
    except Exception as err:
        if watch is None:
            raise
        # A rank or a node is gone (killed, crashed, unreachable): its peers' collectives fail. Name it, end
        # this process now (no teardown that would wait on the dead peer), and leave the last checkpoint.
        lost = watch.lost_ranks()
        if lost == []:  # every peer lives on: this rank's own error
            raise
        first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        print(f"[train] rank {rank} (node {node_rank()}): {watch.describe(lost)}. This run stops here ({type(err).__name__}: "
              f"{first_line}); continue from the last checkpoint in {checkpoint_dir} with --resume", flush=True)
        sys.stdout.flush()
        if device.type == "cpu" and "MASTER_PORT" in os.environ:
            autowu_ds.remove_cpu_shm_buffers(os.environ["MASTER_PORT"], local_rank())
        os._exit(1)
    if watch:
        watch.stop()

    if autowu and autowu.switch_step is None and not args.stop_after_epoch:
        log("AutoWU did not switch during this run")
    schedule = (f"AutoWU switch step {autowu.switch_step}, peak LR {autowu.peak_lr}" if autowu else
                f"schedule {type(scheduler).__name__} (from the config)")
    log(f"final: top-1 {top1 * 100:.2f}% top-5 {top5 * 100:.2f}%; {schedule}; run directory {out_dir}")
    json_log.write(kind="final", top1=top1, top5=top5, switch_step=autowu.switch_step if autowu else None,
                   peak_lr=autowu.peak_lr if autowu else None, schedule=type(scheduler).__name__)
    dist.barrier()


if __name__ == "__main__":
    main()
