"""The paper's figures, and where multi-sample dropout helps: named studies of many runs, paired by seed.

    python study.py samples --data_dir ../shared/data/cifar10-jpeg.tar.gz   # error against M = 1 .. 64
    python study.py samples --compare docs/study-converged                    # redraw from the committed runs

A study is data: the runs it needs (a setting's folder, its dropout_num and dropout_p values), the paired
comparisons it reports, and its figure. The studies of one protocol share one folder, one subfolder per
setting, so a run that two studies need (dropout_num 1 and 8 at p = 0.5, say) trains once. Each run is one
run.py command: rerunning skips finished runs and resumes unfinished ones; --workers K trains K at once, each
taking the next run that no process holds. Then NAME.png and NAME.md, from the finished runs alone.
--more_seeds applies the rule fixed before the runs: a comparison whose interval excludes zero gets five more
seeds, for its two points only.
"""
import collections
import shlex
import sys
from pathlib import Path

import tools

if __name__ == "__main__":  # a stop during the imports that take seconds: one line, not a traceback
    tools.quiet_start("study.py")
import run  # noqa: E402
from bookkeeping import experiment  # noqa: E402
from bookkeeping import runfiles  # noqa: E402
from bookkeeping import runlock  # noqa: E402
from bookkeeping.provenance import kind_and_precision, where, where_pair  # noqa: E402
from studies import stats  # noqa: E402
from studies.catalogue import MORE_SEEDS, PROTOCOLS, SETTINGS, STUDIES, Point, own_seeds, study_points  # noqa: E402
from studies.workers import train_in_workers  # noqa: E402
from tools import UserError  # noqa: E402

# A paired comparison of final valid accuracies over every shared seed (difference), over the study's own seeds
# (first: None until all of them are paired; the rule decides on it) and over the seeds after them (later: the
# rule's more seeds, the test of what first found; None without any), with a Counter of where the pairs ran.
Comparison = collections.namedtuple("Comparison", "label point reference difference first later ran_on")
Planned = collections.namedtuple("Planned", "number command args config device")  # a run to train or skip, parsed


def parse_args(argv):
    studies = "; ".join(f"{name}: {s.about} ({s.seeds} seeds)" for name, s in STUDIES.items())
    protocols = "; ".join(f"{name}: {about}" for name, (_, about) in PROTOCOLS.items())
    p = run.Parser(prog="study.py", description=__doc__.split("\n")[0], formatter_class=run.HelpFormatter,
                   allow_abbrev=False)  # the --compare check below reads the flags as typed
    p.add_argument("study", choices=list(STUDIES), metavar="STUDY", help=f"which study: {studies}")
    p.add_argument("--data_dir", default="data", help="as for run.py: torchvision's root, or an image-folder copy")
    p.add_argument("--protocol", choices=list(PROTOCOLS), default="converged", help=protocols)
    p.add_argument("--output_dir", help="one folder per setting, and STUDY.png, STUDY.md (default: outputs/study-PROTOCOL)")
    p.add_argument("--seed", type=int, nargs="+", help="seeds of every run (default: 42 and up, as many as the "
                   "study's); a subset lets several processes or machines share a study")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, each a run.py process taking the next "
                   "run no process holds (a GPU fits several; on a CPU they share the cores)")
    p.add_argument("--more_seeds", action="store_true", help=f"the rule: {MORE_SEEDS} more seeds (47 to 51 for a "
                   "5-seed study, or --seed's) for the two points of each comparison whose interval over the study's "
                   "seeds excludes zero, as the finished runs in --output_dir give it; nothing else trains")
    p.add_argument("--compare", metavar="DIR", help="draw STUDY.png and STUDY.md from the finished runs under DIR "
                   "(config.json and metrics.json are enough) into DIR, or --output_dir, without training; no other flag")
    args = p.parse_args(argv)
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if args.compare is not None and (args.compare == "" or given - {"--compare", "--output_dir"}):
        raise UserError("--compare takes the folder of a study and no other flag but --output_dir, e.g. "
                        "--compare docs/study-converged")
    args.drawn_into = args.output_dir or args.compare  # --compare: where its figure and table go
    for flag in ("data_dir", "output_dir", "compare"):
        tools.require_path(getattr(args, flag), f"--{flag}")
    if args.workers < 1:
        raise UserError(f"--workers must be 1 or more, got {args.workers}")
    args.output_dir = args.output_dir or f"outputs/study-{args.protocol}"
    own = own_seeds(STUDIES[args.study])
    if args.more_seeds and set(args.seed or []) & set(own):
        raise UserError(f"--more_seeds adds seeds after the study's own ({own[0]} to {own[-1]}); "
                        "leave out --seed, or give others")
    more = range(own[-1] + 1, own[-1] + 1 + MORE_SEEDS)
    args.seed = args.seed or list(more if args.more_seeds else own)
    return args


def run_commands(args, points):
    """{run's name: run.py's argv} for the runs of the points, seeds outermost: the pairs of a seed complete together.
    The name (blog-head-m8-p0.5-s42) is the run's within the protocol's folder, whichever study trains it."""
    return {f"{point.setting}-m{point.dropout_num}-p{point.dropout_p}-s{seed}":
            ["--data_dir", args.data_dir, "--output_dir", str(Path(args.output_dir) / point.setting),
             *PROTOCOLS[args.protocol][0], *SETTINGS[point.setting][1], "--seed", str(seed),
             "--dropout_num", str(point.dropout_num), "--dropout_p", str(point.dropout_p)]
            for seed in args.seed for point in points}


def points_by_the_rule(args):
    """The two points of each comparison whose interval over the study's own seeds excludes zero, as the finished
    runs give it; each comparison says what the rule makes of it."""
    study, chosen = STUDIES[args.study], []
    points = collect(args.output_dir, study)
    if not points:
        raise UserError(f"{args.output_dir} holds no finished runs of the {args.study} study, and --more_seeds decides "
                        "from them: run the study first (or give its --output_dir)")
    own, undecided = own_seeds(study), 0
    for c in compare(points, study.pairs, own):
        if c.first is None:
            verdict = f"not all of seeds {own[0]}-{own[-1]} are paired yet: undecided"
            undecided += 1
        elif stats.excludes_zero(c.first):
            verdict = f"excludes zero: seeds {' '.join(map(str, args.seed))} for both"
            chosen += [c.point, c.reference]
        else:
            verdict = "includes zero: no more seeds"
        first = f"{stats.format_difference(c.first)} over seeds {own[0]}-{own[-1]} " if c.first else ""
        print(f"study.py: {c.label}: {first}{verdict}", flush=True)
    if not chosen:
        print(f"study.py: the rule adds no seeds now: no decided comparison excludes zero, and {undecided} wait for the "
              f"study's own seeds (python study.py {args.study})" if undecided else
              "study.py: no comparison's interval excludes zero: the rule adds no seeds", flush=True)
    return list(dict.fromkeys(chosen))  # one reference serves several comparisons


def train_all(args, argv):
    """Every run of the study (with --more_seeds, the rule's), --workers at a time; a run another process holds is
    left to it."""
    resume = f"python study.py {shlex.join(argv)}"
    points = points_by_the_rule(args) if args.more_seeds else study_points(STUDIES[args.study])
    if not points:  # the rule chose none, and said why
        return 0
    commands = run_commands(args, points)
    tools.check_writable(Path(args.output_dir))
    left, elsewhere = to_train(commands, STUDIES[args.study].pairs)
    if left:
        import datasource  # torch: not for --help
        datasource.download(args.data_dir)  # here, before the plan: offline, one line and no worker started
    print(f"study.py: {len(commands) - len(left) - elsewhere} of {len(commands)} runs are finished"
          f"{f', {elsewhere} left to another machine' if elsewhere else ''}; {len(left)} to train, {args.workers} at a "
          "time", flush=True)
    if args.workers == 1:  # in this process, its output in the terminal
        for i, _, command in left:
            print(f"study.py: run {i}/{len(commands)}", flush=True)
            status = run.main(command, resume_command=resume)
            if status not in (0, runlock.HELD):
                return status  # run.py said why
        return 0
    return train_in_workers(left, len(commands), args.workers, Path(args.output_dir) / "logs", resume)


def to_train(commands, pairs):
    """The (number, name, command) runs still to train, and how many are left to another machine.

    A finished run its folder holds is done in either precision where the protocol leaves --precision to auto,
    so a study rerun on a machine that resolves auto otherwise trains nothing twice. A missing run whose pairs
    (the runs of its seed it is compared with) are finished trains in their precision, so both runs of a pair share
    it; where this machine lacks that precision natively or picks another kind of device, it is named and left."""
    planned = plan(commands)
    finished = {}
    for folder in {Path(p.args.output_dir) for p in planned.values()}:
        for r in runfiles.finished_runs(folder):
            finished.setdefault(without_precision(r["config"]), []).append(r)
    left, elsewhere = [], 0
    for name, p in planned.items():
        if finished_run(p, finished):
            continue
        places = {kind_and_precision(r["config"]) for r in its_pairs(p, planned, pairs, finished)}
        precision, why_not = pair_precision(p, places)
        command = p.command + ["--precision", precision] * (precision not in (None, p.config["precision"]))
        if why_not:
            anyway = f"; to train it here all the same, several times slower: python run.py {shlex.join(command)}"
            print(f"study.py: {name} is left to another machine: {why_not}{anyway if precision else ''}", flush=True)
            elsewhere += 1
        else:
            left.append((p.number, name, command))
    return left, elsewhere


def plan(commands):
    """{name: Planned} for the runs; run.py's checks of their flags come first: a bad one is one line, not K workers
    failing."""
    import train
    from bookkeeping import distributed  # torch: not for --help
    from bookkeeping import hardware
    planned = {}
    for number, (name, command) in enumerate(commands.items(), 1):
        (args,) = run.grid(run.parse_args(command)[0])
        run.check_args(args)
        device = distributed.local_device(hardware.pick_device(args.device))
        planned[name] = Planned(number, command, args, train.identity(args, device)[0], device)
    return planned


def without_precision(config):
    """A run's defining flags but its precision, as a key: the same run, whichever precision trained it."""
    return tuple(sorted((k, v) for k, v in experiment.defining_flags(config).items() if k != "precision"))


def finished_run(p, finished):
    """The folder's finished run of this command, to its --epochs (any precision under auto, else its own), or None."""
    return next((r for r in finished.get(without_precision(p.config), []) if r["history"][-1]["epoch"] >= p.args.epochs
                 and p.args.precision in ("auto", r["config"]["precision"])), None)


def its_pairs(p, planned, pairs, finished):
    """The finished runs the run is compared with: its seed's runs of the points it pairs with."""
    mine = point_of(p.args)
    partners = {b if a == mine else a for _, a, b in pairs if mine in (a, b)}
    runs = (finished_run(q, finished) for q in planned.values()
            if q.args.seed == p.args.seed and point_of(q.args) in partners)
    return [r for r in runs if r]


def point_of(args):
    return Point(Path(args.output_dir).name, args.dropout_num, args.dropout_p)  # run_commands: a folder per setting


def pair_precision(p, places):
    """(the precision to train in, None), or (None, why not here), given its pairs' (device kind, precision)s; where
    only the speed stands in the way (a precision this CPU emulates), (that precision, why not here)."""
    if p.args.precision != "auto" or not places:
        return p.config["precision"], None
    seed = p.args.seed
    if len(places) > 1:
        return None, f"its pairs of seed {seed} ran on {' and '.join(map(', '.join, sorted(places)))}"
    ((kind, precision),) = places
    if "+" in kind:  # resumed on another kind of device: no run of one kind can pair with it
        return None, f"its pairs of seed {seed} ran on a {kind} in turn; retrain them in one place (--overwrite) to pair"
    if kind != p.device.type:
        return None, f"its pairs of seed {seed} ran on a {kind}, and --device {p.args.device} picks {p.device.type} here"
    if precision not in ("fp32", p.config["precision"]):  # bf16 where it is not native: several times slower
        return precision, f"its pairs of seed {seed} ran in {precision}, which this {kind} lacks natively"
    return precision, None


def collect(output_dir, study):
    """{Point: {seed: finished run}} for every point of the study that has runs; one run per seed and point."""
    found = {}
    for setting, samples, rates in study.runs:
        for r in runfiles.finished_runs(Path(output_dir) / setting):
            c = r["config"]
            point = Point(setting, c["dropout_num"], c["dropout_p"])
            if c["dropout_num"] not in samples or c["dropout_p"] not in rates or c.get("rdrop_alpha"):
                continue
            other = found.setdefault(point, {}).get(c["seed"])
            if other:
                raise UserError(f"{other['dir']} and {r['dir']} are two runs of {setting}, dropout_num {point.dropout_num}, "
                                f"p {point.dropout_p}, seed {c['seed']}: the study pairs by seed, so keep one protocol's "
                                "runs per folder")
            found[point][c["seed"]] = r
    lengths = {r["config"]["epochs"]: r["dir"] for runs in found.values() for r in runs.values()}
    if len(lengths) > 1:  # --epochs is not in a run's name: a continued run would be compared at another epoch
        raise UserError(f"runs of different lengths ({', '.join(f'{e} epochs: {d}' for e, d in sorted(lengths.items()))}): "
                        "a study compares runs of one protocol; move the others out of the folder")
    order = lambda point: (list(SETTINGS).index(point.setting), point.dropout_num, point.dropout_p)
    return {point: found[point] for point in sorted(found, key=order)}


def compare(points, pairs, own):
    """[Comparison] for the pairs: the differences are None where no seed (or not all of own, for first) is paired."""
    found = []
    for label, point, reference in pairs:
        mine, theirs = points.get(point, {}), points.get(reference, {})
        seeds = sorted(mine.keys() & theirs.keys())
        for seed in seeds:  # both runs of a pair on one kind of device in one precision: else, two draws
            a, b = mine[seed]["config"], theirs[seed]["config"]
            if kind_and_precision(a) != kind_and_precision(b):
                raise UserError(f"{mine[seed]['dir']} ran on {where(mine[seed])} and {theirs[seed]['dir']} on "
                                f"{where(theirs[seed])}: a pair must share its kind of device and precision")
            if experiment.step_of(a) != experiment.step_of(b):  # another step draws other masks, or rounds otherwise
                raise UserError(f"{mine[seed]['dir']} trained with the {experiment.step_of(a)} step and "
                                f"{theirs[seed]['dir']} with the {experiment.step_of(b)} one: a pair must share its step")
        ran_on = collections.Counter(where_pair(mine[s], theirs[s]) for s in seeds)
        accuracies = runfiles.final_accuracies(mine), runfiles.final_accuracies(theirs)
        first = stats.paired_by_seed(*({s: a[s] for s in own if s in a} for a in accuracies))
        later = stats.paired_by_seed(*({s: acc for s, acc in a.items() if s > own[-1]} for a in accuracies))
        found.append(Comparison(label, point, reference, stats.paired_by_seed(*accuracies),
                                first if first and first["n"] == len(own) else None, later, ran_on))
    return found


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    tools.started()
    drawing = False
    try:
        args = parse_args(argv)
        status = 0 if args.compare else train_all(args, argv)
        if status:
            return status
        with tools.interrupts():
            drawing = True
            return draw(Path(args.compare or args.output_dir), args.study, Path(args.drawn_into or args.output_dir))
    except UserError as e:
        print(f"study.py: error: {e}", file=sys.stderr)
        return 2
    except tools.Interrupted as e:
        print(f"study.py: {e}", file=sys.stderr)
        return tools.stopped_status()
    except KeyboardInterrupt:  # a run stops itself and says how to go on; this is a stop outside any run
        into = f" --output_dir {args.drawn_into}" if args.compare and args.drawn_into != args.compare else ""
        then = (f"while drawing; no file was left half-written; draw again with: python study.py {args.study} --compare "
                f"{args.compare or args.output_dir}{into}" if drawing else "outside a run (planning, fetching data or between "
                f"runs); the finished runs are kept; go on with: python study.py {shlex.join(argv)}")
        print(f"study.py: stopped by {tools.STOP.get('signal', 'SIGINT')} {then}", file=sys.stderr)
        return tools.stopped_status()


def draw(runs_dir, name, output_dir):
    """output_dir/NAME.png and NAME.md from the finished runs under runs_dir."""
    from studies import figures
    study = STUDIES[name]
    points = collect(runs_dir, study)
    pairs = [c for c in compare(points, study.pairs, own_seeds(study)) if c.difference]
    if not pairs:
        raise UserError(f"{runs_dir} holds no finished pair of runs for the {name} study; run it first")
    caption = figures.caption(points, protocol_of(points))
    run_times = collections.defaultdict(list)  # where a run ran: its seconds, epochs summed
    for runs in points.values():
        for r in runs.values():
            run_times[where(r)].append(sum(row["seconds"] for row in r["history"]))
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        figures.FIGURES[study.figure](output_dir / f"{name}.png", points, pairs, caption)
        tools.atomic_write(output_dir / f"{name}.md", tools.text_writer(
            figures.table(name, study, points, pairs, caption, MORE_SEEDS, run_times, own_seeds(study))))
    except OSError as e:
        raise UserError(f"cannot write the study's figure or table in {output_dir} ({e.strerror or e}); choose another folder")
    print(f"study.py: wrote {output_dir / (name + '.png')} and {output_dir / (name + '.md')}")
    return 0


def protocol_of(points):
    """The protocol whose flags every run matches, by its own config (or 'custom')."""
    configs = [r["config"] for runs in points.values() for r in runs.values()]
    for name, (flags, _) in PROTOCOLS.items():
        wanted = vars(run.build_parser().parse_args(flags))
        keys = ("train_size", "test_size", "epochs", "lr_milestone", "batch_size")
        if all(c.get(k) == wanted[k] for c in configs for k in keys):
            return name
    return "custom"


if __name__ == "__main__":
    sys.exit(main())
