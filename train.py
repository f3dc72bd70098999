"""How one run trains: its data on the device, the loop, evaluation, checkpoints, and the comparison afterwards.

run.py parses the flags and calls train_run once per run of the grid (or evaluate_saved_run for --eval).
"""
import math
import shutil
import time
from pathlib import Path

import torch

import datasource
import graphstep
import progressbar
import tools
import trainingmonitor
from bookkeeping import distributed, experiment, hardware, provenance, runfiles, runlock
from bookkeeping.checkpointing import (checkpoint_writer, epochs_done, load_state, resumable_checkpoint, rng_state,
                                       seed_everything, set_rng_state)
from nn import build_model, fit_problem
from tools import UserError

REDRAW_S = 10  # seconds between redraws of a run's figures (~0.3 s each); the last row always redraws
EVAL_BATCH = 1000  # images per evaluation step; no gradients, so larger than training's
READS_PER_EPOCH = 20  # device reads an epoch, for the progress bar and for torchrun's ranks to agree on stopping
EVAL_CHOICES = ("test_size", "precision")  # they choose how --eval evaluates, not which run it is (--device too)
COMMAND_ONLY = ("resume", "eval", "compare")  # what the command did, not what the run is: kept out of config.json


def train_run(args, run_dir=None):
    """Train one run of the grid (or continue it) under its lock; returns (its folder, its setup's name)."""
    device = distributed.local_device(hardware.pick_device(args.device))
    refused = args.cuda_graph and graphstep.refusal(device, distributed.world())
    if refused:
        raise UserError(refused)
    hardware.configure_determinism(args.deterministic, device)
    config, default_dir = identity(args, device)
    hardware.configure_precision(config["precision"])
    run_dir = run_dir or default_dir
    if not finished(run_dir, config, args):  # a finished run is skipped even where nothing can be written
        distributed.check_ranks(args.batch_size, args.sync_bn, device)
        tools.check_writable(run_dir.parent, advice="make it writable, or --resume a copy of the run in a "
                             "writable folder" if args.resume else None)
        with runlock.hold(run_dir, distributed.rank(), distributed.missing_on_every_rank(run_dir.parent)):
            if not finished(run_dir, config, args):  # another process may have finished it while we waited
                threads = torch.get_num_threads()  # a resumed run may take its own (resume_threads): not the next run
                try:
                    train(args, config, run_dir, device, None if args.overwrite else resumable_checkpoint(run_dir, config))
                finally:
                    torch.set_num_threads(threads)
    return run_dir, config["setup"]


def identity(args, device):
    """(the run's defining values, with its setup's name, and its folder under --output_dir)."""
    flags = {k: v for k, v in vars(args).items() if k not in COMMAND_ONLY}
    config = {**flags, "precision": precision_for(args, device), "data_source": datasource.data_source(args),
              "world_size": distributed.world()}
    run_name, config["setup"] = experiment.run_identity(config)  # the setup: which runs it is compared with
    return config, Path(args.output_dir) / run_name


def finished(run_dir, config, args):
    """Whether run_dir holds this run up to --epochs: by its checkpoint, or by its metrics alone (a committed run)."""
    epochs = 0 if args.overwrite else epochs_done(run_dir, config)
    if epochs >= args.epochs:
        afresh = "" if args.resume else ", --overwrite starts it afresh"  # --resume continues, so it takes no --overwrite
        say(f"{run_dir} already holds this run, finished at epoch {epochs}: nothing to do "
            f"(--epochs above {epochs} continues it{afresh})")
    return epochs >= args.epochs


def train(args, config, run_dir, device, checkpoint):
    """Set up, resume, then an epoch at a time: train, evaluate, save a row of metrics and a checkpoint."""
    # Data: the whole (sub)sets as uint8 tensors on the device; --data_seed alone picks the images.
    splits, num_classes = datasource.load_splits(args, device)
    (train_x, train_y), (valid_x, valid_y) = splits["train"], splits["valid"]
    steps = len(train_y) // args.batch_size
    if steps == 0:
        raise UserError(f"--batch_size {args.batch_size} is larger than the {len(train_y)} training images; lower it")
    seed_everything(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # shuffling and augmentation, the same on every rank
    model = make_model(args, num_classes, device, args.batch_size // distributed.world())  # the same weights on every rank
    distributed.seed_dropout(args.seed)
    forward = parallel(model, args, device)  # shares model's weights; model is what we save
    evaluator = model if distributed.world() > 1 else forward  # DDP's forward is a collective: ranks evaluate alone
    # foreach: one op for all tensors, the same bits. --cuda_graph: the lr a tensor and Adam's step count on the
    # device (capturable), so the captured step reads what each epoch sets
    optimizer = torch.optim.Adam(model.parameters(), lr=torch.tensor(args.lr, device=device) if args.cuda_graph
                                 else args.lr, foreach=True, capturable=args.cuda_graph)
    autocast = autocast_for(device, config["precision"], args.cuda_graph)
    prepare = datasource.input_transform(args.dataset, device)
    train_step = make_step(forward, optimizer, autocast, args.cuda_graph)
    logits_of = graphstep.GraphedForward(evaluator, prepare) if args.cuda_graph else None

    if args.overwrite and run_dir.exists() and distributed.is_main():
        shutil.rmtree(run_dir)
    history, first_epoch, resume_note = resume(checkpoint, model, optimizer, generator, run_dir, device)
    config.update(run_dir=str(run_dir), **provenance.trains_now(device, checkpoint), train_images=len(train_y),
                  valid_images=len(valid_y), test_images=len(splits["test"][1]))
    say(f"{run_dir}: {args.model}, dropout_num={args.dropout_num}, p={args.dropout_p}, "
        f"{f'rdrop_alpha={args.rdrop_alpha}, ' if args.rdrop_alpha else ''}seed={args.seed}, "
        f"{len(train_y)} train / {len(valid_y)} {'valid' if args.valid_split else 'test'} images, "
        f"{device}{f' x {distributed.world()} ranks' if distributed.world() > 1 else ''}, {config['precision']}"
        + resume_note)
    if distributed.is_main():
        progressbar.print_header()

    drawn_at = -math.inf  # when the figures were last drawn: the first epoch draws them
    for epoch in range(first_epoch, args.epochs + 1):
        if tools.STOP:  # a stop requested during evaluation or start-up
            raise tools.Interrupted(f"stopped by {tools.STOP['signal']} before epoch {epoch}; {kept_note(run_dir, epoch)}")
        start = time.perf_counter()
        lr = args.lr * (0.1 if args.lr_milestone and epoch > args.lr_milestone else 1.0)
        set_lr(optimizer, lr)
        batches = datasource.train_batches(train_x, train_y, args.batch_size, generator, args.augment, prepare,
                                           distributed.rank(), distributed.world())
        bar = progressbar.EpochBar(steps, epoch, args.epochs, show=distributed.is_main())
        # Reading from the device makes the host wait: only to show progress, or for the ranks to agree on stopping
        reads = READS_PER_EPOCH if bar.enabled or distributed.world() > 1 else 1
        try:
            train_loss, train_acc = train_epoch(forward, train_step, batches, steps, reads, bar)
        except (FloatingPointError, tools.Interrupted) as e:
            raise type(e)(f"{e} of epoch {epoch}; {kept_note(run_dir, epoch)}") from None
        distributed.share_buffers(model)
        valid_loss, valid_acc = evaluate(evaluator, valid_x, valid_y, autocast, prepare, logits_of)
        check_finite("valid" if args.valid_split else "test", valid_loss, run_dir, epoch)
        history.append({"epoch": epoch, "lr": lr, "train_loss": train_loss, "train_acc": train_acc,
                        "valid_loss": valid_loss, "valid_acc": valid_acc, "seconds": time.perf_counter() - start})
        test = evaluate(evaluator, *splits["test"], autocast, prepare, logits_of) if args.valid_split and epoch == args.epochs else None
        if test:
            check_finite("test", test[0], run_dir, epoch)
        redraw = epoch == args.epochs or time.perf_counter() - drawn_at >= REDRAW_S
        drawn_at = time.perf_counter() if redraw else drawn_at
        rank_rng = distributed.gather_on_main(rng_state(generator))  # every rank's, so a resume is exact
        if distributed.is_main():
            progressbar.print_row(history[-1])
            save_epoch(run_dir, config, history, test, redraw, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rank_rng": rank_rng,
                "history": history, "config": config})


def resume(checkpoint, model, optimizer, generator, run_dir, device):
    """(the rows so far, the first epoch to train, a note for the start line): the checkpoint's weights, optimizer
    and random state loaded, so the run goes on as if never stopped; ([], 1, '') for a run starting afresh."""
    if not checkpoint:
        return [], 1, ""
    load_state(model, checkpoint["model"], run_dir / "last.pt")
    load_state(optimizer, checkpoint["optimizer"], run_dir / "last.pt")
    for group in optimizer.param_groups:  # --cuda_graph's tensor lr, read on the device the graph runs on
        group["lr"] = group["lr"].to(device) if torch.is_tensor(group["lr"]) else group["lr"]
    set_rng_state(checkpoint["rank_rng"][distributed.rank()], generator)
    threads = provenance.resume_threads(checkpoint["config"], device)
    return checkpoint["history"], checkpoint["epoch"] + 1, f"; resumed from epoch {checkpoint['epoch']}{threads}"


def make_step(model, optimizer, autocast, cuda_graph=False):
    """One training step, step(images, labels) -> (logits, loss): the forward with every dropout sample, backward,
    Adam. With --cuda_graph, all of it captured once and replayed (graphstep.py)."""
    loss_fn = torch.nn.CrossEntropyLoss()
    if cuda_graph:
        return graphstep.GraphedStep(model, optimizer, loss_fn, autocast)

    def step(xb, yb):
        with autocast:
            logits, loss = model(xb, yb, loss_fn)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return logits, loss
    return step


def set_lr(optimizer, lr):
    """A tensor lr (--cuda_graph) is filled in place: the captured step reads that very tensor."""
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def train_epoch(model, train_step, batches, steps, reads=1, bar=None):
    """One pass over the `steps` batches through train_step (make_step's); returns (mean loss, accuracy) over every rank's
    images. The sums stay on the device and are read `reads` times (the last step's always): each read makes the host
    wait for the device. Raises FloatingPointError on a non-finite loss, tools.Interrupted on a stop request."""
    model.train()
    device = next(model.parameters()).device
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    bad_step = torch.full((), -1, device=device)  # the first step whose loss was not finite
    single = distributed.world() == 1
    every = max(1, steps // reads)  # steps between reads
    for step, (xb, yb) in enumerate(batches, 1):
        logits, loss = train_step(xb, yb)
        loss_sum += loss.detach().float() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()), step, bad_step)
        seen += len(yb)
        if step % every and step != steps and not (tools.STOP and single):
            continue
        stop, bad = distributed.max_across(torch.stack([torch.tensor(float(bool(tools.STOP)), device=device),
                                                        bad_step.float()])).tolist()
        if stop or bad >= 0:
            if bar:
                bar.close()
            if stop:
                raise tools.Interrupted(f"stopped by {tools.STOP.get('signal', 'a signal to another rank')} at step {step}")
            raise FloatingPointError(f"non-finite training loss at step {int(bad)}")
        if bar:
            bar.update(step, loss_sum.item() / seen, correct.item() / seen)
    if bar:
        bar.close()
    distributed.sum_across(loss_sum), distributed.sum_across(correct)
    seen *= distributed.world()  # every rank takes an equal slice of every batch
    return loss_sum.item() / seen, correct.item() / seen


def evaluate(model, x, y, autocast, prepare, logits_of=None):
    """(loss, accuracy) of the single eval-mode pass: dropout off, so comparable across dropout_num. Under
    torchrun each rank evaluates its shard and the sums are added up. logits_of: a graphstep.GraphedForward."""
    model.eval()
    logits_of = logits_of or (lambda images: model(prepare(images)))
    summed_loss = torch.nn.CrossEntropyLoss(reduction="sum")
    loss, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    mine = distributed.shard(len(y))
    xs, ys = x[mine], y[mine]
    with torch.inference_mode(), autocast:
        for i in range(0, len(ys), EVAL_BATCH):
            logits = logits_of(xs[i:i + EVAL_BATCH])
            loss += summed_loss(logits.float(), ys[i:i + EVAL_BATCH])
            correct += (logits.argmax(1) == ys[i:i + EVAL_BATCH]).sum()
    distributed.sum_across(loss), distributed.sum_across(correct)
    return loss.item() / len(y), correct.item() / len(y)


def save_epoch(run_dir, config, history, test, redraw, checkpoint):
    """Every file of the row written aside, then renamed into place together, the checkpoint last: so a run's
    metrics never stand without its checkpoint (but for a finished run's, committed without it), and a run stopped
    before its first row leaves no run. The curves follow. A full disk leaves the previous row whole."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        files = [(run_dir / "config.json", tools.json_writer(config)), *runfiles.metrics_files(run_dir, history)]
        if test:  # the test set, once, after the epochs were chosen on the validation set
            files.append((run_dir / "test.json", tools.json_writer({"epoch": history[-1]["epoch"], "test_loss": test[0],
                                                                    "test_acc": test[1]})))
            print(f"test set, once: loss {test[0]:.4f}, accuracy {test[1]:.4f}")
        tools.atomic_writes(files + [(run_dir / "last.pt", checkpoint_writer(checkpoint))])
        if redraw:
            trainingmonitor.plot_run(run_dir, history, config)
    except OSError as e:
        raise UserError(f"could not save epoch {history[-1]['epoch']} in {run_dir} ({e.strerror or e}); the last "
                        f"checkpoint there is intact: make room and rerun the command to resume from it") from None


def report_comparison(run_dir, setup):
    """Rank 0 redraws the comparison of run_dir's setup, beside it."""
    if distributed.is_main():
        try:
            compare_dir, count = trainingmonitor.compare_setup(run_dir.parent, setup)
        except OSError as e:  # only a run found finished gets here with an unwritable folder: a read-only copy
            return print(f"done: {run_dir}; comparison not redrawn ({e.strerror or e})")
        print(f"done: {run_dir}; comparison of {count} finished run(s) in {compare_dir}")


def say(message):
    if distributed.is_main():
        print(message)


def parallel(model, args, device):
    """What the training loop calls: DistributedDataParallel under torchrun, and compiled with --compile."""
    if distributed.world() > 1:
        if args.sync_bn:  # BatchNorm statistics over the global batch, not each rank's slice
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    return hardware.compiled(model) if args.compile else model


def evaluate_saved_run(args, checkpoint):
    """--eval: the checkpoint's test loss and accuracy. A defining flag that contradicts the run is refused, as
    for --resume: another data set's normalisation, say, would give a wrong answer, not an error."""
    source, saved = datasource.data_source(args), checkpoint["config"]["data_source"]
    if source != saved:
        raise UserError(f"--data_dir {args.data_dir} is {source}, but {args.eval} was trained on {saved}; "
                        f"pass --data_dir with that data")
    device = hardware.pick_device(args.device)
    config = {**vars(args), "precision": precision_for(args, device), "data_source": source}
    hardware.configure_precision(config["precision"])
    trained = checkpoint["config"]
    chosen = {flag: config[flag] for flag in EVAL_CHOICES if config[flag] != trained.get(flag)}
    experiment.check_same_experiment(trained, {**config, **{flag: trained.get(flag) for flag in chosen}},
                                     Path(args.eval) / "last.pt", "drop the flag: --eval evaluates the run as it was trained")
    for flag, value in chosen.items():
        print(f"--eval with --{flag} {value} (the run was trained with {trained.get(flag)})")
    splits, num_classes = datasource.load_splits(args, device)
    model = make_model(args, num_classes, device)
    load_state(model, checkpoint["model"], Path(args.eval) / "last.pt")
    autocast = autocast_for(device, config["precision"])
    loss, acc = evaluate(model, *splits["test"], autocast, datasource.input_transform(args.dataset, device))
    print(f"{args.eval}: epoch {checkpoint['epoch']}, {len(splits['test'][1])} test images: loss {loss:.4f}, "
          f"accuracy {acc:.4f}")
    return 0


def make_model(args, num_outputs, device, batch_size=0):
    """The run's network on the device, channels_last: the layout the CPU and GPU convolutions are fastest in; refused
    in one line, before anything is allocated, where its head cannot train a batch of batch_size there (0: evaluate)."""
    problem = fit_problem(args.model, num_outputs, args.dropout_num, args.head_hidden, args.pool, args.msd_heads,
                          batch_size, hardware.memory_bytes(device))
    if problem:
        raise UserError(problem)
    model = build_model(args.model, num_outputs, args.dropout_num, args.dropout_p, args.rdrop_alpha,
                        args.head_hidden, args.pool, args.diversity, args.msd_reduce, args.msd_heads)
    return model.to(device, memory_format=torch.channels_last)


def autocast_for(device, precision, cuda_graph=False):
    """bf16 autocast for --precision bf16, a no-op context for fp32. A CUDA graph replays its casts of the weights:
    autocast's cache of them, valid for one forward, must be off while capturing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=not cuda_graph)


def precision_for(args, device):
    """--precision resolved for this run: auto is the hardware's choice."""
    return hardware.resolve_precision(args.precision, device)


def check_finite(what, loss, run_dir, epoch):
    """A non-finite evaluation loss means the run diverged: it stops before the row is saved, so the last one stays."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"non-finite {what} loss ({loss}) after epoch {epoch}; {kept_note(run_dir, epoch)}")


def kept_note(run_dir, epoch):
    """What a stop during `epoch` leaves behind."""
    return f"the checkpoint of epoch {epoch - 1} in {run_dir} is intact" if epoch > 1 else "no checkpoint was written"
