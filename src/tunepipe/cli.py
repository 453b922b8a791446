"""The `tunepipe` command: parse, call, print, exit code.

Exit codes: 0 done · 1 unexpected error · 2 bad config or data · 3 a stage gate failed ·
75 stopped early (time budget or signal) with a complete checkpoint saved.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .config import ConfigError, load_config
from .redaction import redact_text

EXIT_OK, EXIT_ERROR, EXIT_BAD_INPUT, EXIT_GATE, EXIT_STOPPED = 0, 1, 2, 3, 75

console = Console(highlight=False, soft_wrap=True)  # long paths stay whole in piped logs
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help=(
        "One YAML file, one command: data -> SFT -> DPO (or GRPO, KTO: `pipeline:`) -> eval -> report.\n\n"
        "Every config value can be overridden as section.key=value after the config path, e.g.\n"
        "  tunepipe run tunepipe.yaml sft.learning_rate=1e-4 sft.max_steps=50\n\n"
        "Exit codes: 0 done, 1 unexpected error, 2 bad config or data, 3 a stage gate failed, "
        "75 stopped early with a checkpoint saved."
    ),
)

ConfigArg = Annotated[Path, typer.Argument(help="the project config (tunepipe.yaml)", show_default=False)]
Overrides = Annotated[
    list[str] | None, typer.Argument(help="section.key=value overrides", show_default=False)
]
SmokeOpt = Annotated[
    bool, typer.Option("--smoke", help="tiny subset, few steps, same code path; writes to <output_dir>-smoke")
]
VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="also show library warnings and the trainers' raw log lines (always in logs/)"
    ),
]

NodeRankOpt = Annotated[
    int | None,
    typer.Option(
        "--node-rank",
        help="this machine's rank with hardware.nodes > 1 (0 runs data and report; default: NODE_RANK "
        "or SLURM_NODEID)",
        show_default=False,
    ),
]
MasterAddrOpt = Annotated[
    str | None,
    typer.Option(
        "--master-addr",
        help="node 0's address, with hardware.nodes > 1 (default: MASTER_ADDR or the Slurm job's first node)",
        show_default=False,
    ),
]
MasterPortOpt = Annotated[
    int | None,
    typer.Option(
        "--master-port",
        help="node 0's rendezvous port; tunepipe also uses the next one (default: MASTER_PORT or 29500; "
        "a free port on one machine)",
        show_default=False,
    ),
]


def _nodes(node_rank: int | None, master_addr: str | None, master_port: int | None) -> dict[str, object]:
    """The several-nodes options of run/train/eval, as run_pipeline takes them."""
    return {"node_rank": node_rank, "master_addr": master_addr, "master_port": master_port}


def _echo(msg: str) -> None:
    console.print(msg, markup=False)


def _bad_input_types() -> tuple[type[BaseException], ...]:
    from .data.chat import TemplateError
    from .data.prepare import DataError
    from .preflight import PreflightFailed
    from .quickstart.model import EmbeddedModelMissing
    from .runfolder import RunFolderBusy

    return ConfigError, DataError, TemplateError, EmbeddedModelMissing, PreflightFailed, RunFolderBusy


def _write_error_message(e: OSError) -> str:
    where = e.filename or "the run folder"
    return (
        f"cannot write {where}: {e.strerror or e}. Free disk space there, fix its permissions, or set "
        "project.output_dir (output_dir=...) to another folder; then run the same command again "
        "(finished stages and complete checkpoints are kept)"
    )


def _run(config: Path, overrides: list[str] | None, **kw: object) -> None:
    from .stages import GateFailed, StageStopped

    bad_input = _bad_input_types()
    try:
        cfg = load_config(config, overrides or [])
        from .pipeline import run_dir_for, run_pipeline

        run_pipeline(cfg, echo=_echo, **kw)  # type: ignore[arg-type]
        run_dir = run_dir_for(cfg, bool(kw.get("smoke")))
        report = run_dir / "report" / "report.md"
        if report.is_file():
            console.print(f"report: {report}", markup=False)
    except bad_input as e:
        err_console.print(f"error: {redact_text(str(e))}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except GateFailed as e:
        err_console.print(f"gate failed: {e}", markup=False)
        raise typer.Exit(EXIT_GATE) from None
    except StageStopped as e:
        err_console.print(f"stopped: {e}", markup=False)
        raise typer.Exit(EXIT_STOPPED) from None
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        raise typer.Exit(130) from None
    except OSError as e:
        from .runfolder import is_write_error

        if not is_write_error(e):
            _unexpected(e)
        err_console.print(f"error: {_write_error_message(e)}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except Exception as e:
        _unexpected(e)


def _unexpected(e: BaseException) -> None:
    """Exit 1 for an error nobody planned for: where it happened, and where the whole story is."""
    import traceback

    tb = traceback.extract_tb(e.__traceback__)
    where = next((f for f in reversed(tb) if "tunepipe" in f.filename), tb[-1] if tb else None)
    err_console.print(f"unexpected error: {type(e).__name__}: {redact_text(str(e))}", markup=False)
    if where:
        err_console.print(f"  at {where.filename}:{where.lineno} in {where.name}", markup=False)
    log = getattr(e, "tunepipe_log", None)
    if log:
        diagnosis = Path(log).with_suffix(".diagnosis.txt")
        err_console.print(
            f"  the full traceback is in {log}"
            + (f", the diagnosis in {diagnosis}" if diagnosis.is_file() else ""),
            markup=False,
        )
    err_console.print("  paste any log into `tunepipe diagnose -` for the cause and the fix", markup=False)
    raise typer.Exit(EXIT_ERROR) from None


@app.command()
def run(
    config: ConfigArg,
    overrides: Overrides = None,
    smoke: SmokeOpt = False,
    from_stage: Annotated[
        str | None,
        typer.Option("--from", help="rerun from this stage on (data, a stage of `pipeline:`, eval, report)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="rerun every stage even if up to date")] = False,
    verbose: VerboseOpt = False,
    node_rank: NodeRankOpt = None,
    master_addr: MasterAddrOpt = None,
    master_port: MasterPortOpt = None,
) -> None:
    """Run the whole pipeline; stages already done with the same inputs are skipped.

    One command on one GPU, many GPUs and many nodes: with several GPUs visible (or
    hardware.processes: N; on CPU N processes over gloo) the training and eval stages run as process
    groups that tunepipe launches itself (torch's elastic launcher; hardware.sharding: ddp, fsdp,
    zero2, zero3). With hardware.nodes: N run the same command on every node with --node-rank and
    --master-addr (or under Slurm, read from SLURM_*). Under torchrun / accelerate launch it
    launches nothing.

    Before the first stage a preflight checks, in seconds, the packages each stage needs, the data
    files, the model and the run folder (writable, not overlapping any input, free disk); a problem
    there stops with exit 2 and its fix. One run at a time writes a run folder (a second one exits 2
    naming the first one's PID)."""
    _run(
        config,
        overrides,
        smoke=smoke,
        from_stage=from_stage,
        force=force,
        verbose=verbose,
        **_nodes(node_rank, master_addr, master_port),
    )


@app.command()
def data(
    config: ConfigArg,
    overrides: Overrides = None,
    smoke: SmokeOpt = False,
    preview: Annotated[
        int, typer.Option("--preview", help="print N prepared examples with the trained tokens marked")
    ] = 0,
    verbose: VerboseOpt = False,
) -> None:
    """Load, detect, convert, validate and tokenize the data.

    Writes data/: the prepared splits, stats.json and rejects.jsonl. With --preview N, trained
    tokens are highlighted (marked [[like this]] when the output is not a terminal).
    """
    _run(config, overrides, stages=["data"], smoke=smoke, verbose=verbose)
    if preview > 0:
        _preview(config, overrides, smoke, preview)


def _preview(config: Path, overrides: list[str] | None, smoke: bool, n: int) -> None:
    from .data.prepare import read_split
    from .data.preview import preview as render_preview
    from .modeling import load_tokenizer
    from .pipeline import run_dir_for

    cfg = load_config(config, overrides or [])
    data_dir = run_dir_for(cfg, smoke) / "data"
    tok = load_tokenizer(cfg, log=lambda _m: None)
    from .stages import registry

    splits = {
        registry.get(s).train_split: read_split(data_dir, registry.get(s).train_split)[:n]
        for s in registry.trained(cfg)
    }
    tty = console.is_terminal
    for block in render_preview(tok, splits, n, "bold green" if tty else None, cfg.model.enable_thinking):
        if tty:
            console.print(block)
        else:
            console.print(block, markup=False, soft_wrap=True)


@app.command()
def train(
    config: ConfigArg,
    stage: Annotated[
        str, typer.Option("--stage", help="a training stage of the config's pipeline: sft, dpo, ...")
    ],
    overrides: Overrides = None,
    smoke: SmokeOpt = False,
    verbose: VerboseOpt = False,
    node_rank: NodeRankOpt = None,
    master_addr: MasterAddrOpt = None,
    master_port: MasterPortOpt = None,
) -> None:
    """Run one training stage (the data stage, and the stages before it in `pipeline:`, must be done).

    Launches one process per GPU (or hardware.processes) itself, like `tunepipe run`."""
    _run(
        config,
        overrides,
        stages=[stage],
        smoke=smoke,
        verbose=verbose,
        **_nodes(node_rank, master_addr, master_port),
    )


@app.command("eval")
def eval_(
    config: ConfigArg,
    overrides: Overrides = None,
    smoke: SmokeOpt = False,
    verbose: VerboseOpt = False,
    node_rank: NodeRankOpt = None,
    master_addr: MasterAddrOpt = None,
    master_port: MasterPortOpt = None,
) -> None:
    """Evaluate the base model and each trained stage's model; writes eval/metrics.json and eval/samples/.

    Each model's sets are split across the processes (one per GPU, or hardware.processes) and
    gathered: the same metrics as one process."""
    _run(
        config,
        overrides,
        stages=["eval"],
        smoke=smoke,
        verbose=verbose,
        **_nodes(node_rank, master_addr, master_port),
    )


@app.command()
def report(
    config: Annotated[
        Path, typer.Argument(help="the project config (with --compare: a run folder)", show_default=False)
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(
            help="section.key=value overrides (with --compare: more run folders)", show_default=False
        ),
    ] = None,
    smoke: SmokeOpt = False,
    compare: Annotated[
        bool,
        typer.Option("--compare", help="compare run folders: report --compare RUN_DIR RUN_DIR ..."),
    ] = False,
    out: Annotated[
        Path | None, typer.Option("--out", help="with --compare: the folder to write (default ./compare)")
    ] = None,
) -> None:
    """Write report/report.md and a self-contained report/report.html: run summary, warnings, metrics
    (base vs SFT vs DPO with deltas), training curves, data, sample generations.

    With --compare, the arguments are run folders (project.output_dir of each run) and one
    comparison report (compare.md, compare.html) is written to --out.
    """
    if not compare:
        _run(config, overrides, stages=["report"], smoke=smoke)
        return
    from .stages.report import compare_runs

    dirs = [config, *(Path(o) for o in overrides or [])]
    if len(dirs) < 2:
        err_console.print("error: --compare needs at least two run folders", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        page = compare_runs(dirs, out or Path("compare"))
    except FileNotFoundError as e:
        err_console.print(f"error: {e}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    console.print(f"report: {page}", markup=False)


@app.command()
def chat(
    target: Annotated[
        Path, typer.Argument(help="a project config, or a model / adapter folder", show_default=False)
    ],
    overrides: Overrides = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="one question, print the answer, exit")
    ] = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="base or a trained stage, e.g. sft (default: the latest finished)"),
    ] = None,
    system: Annotated[str | None, typer.Option("--system", help="a system message")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="reply length limit")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy")] = 0.0,
    smoke: SmokeOpt = False,
) -> None:
    """Talk to a model through its chat template; the conversation history is kept.

    Interactive by default (/reset clears the history, /exit or Ctrl-D quits); --prompt for one shot.
    With a config it loads the run's latest finished stage in pipeline order (e.g. DPO, else SFT, else
    the base model).
    """
    from .chat import ChatError, Conversation, load_from_config, load_from_folder

    try:
        if target.is_dir():
            if overrides:
                raise ChatError(
                    f"KEY=VALUE overrides ({' '.join(overrides)}) need a config, not a model folder"
                )
            model = load_from_folder(target)
        elif target.is_file():
            model = load_from_config(target, overrides or [], stage, smoke)
        else:
            raise ChatError(f"{target}: no such config file or model folder")
    except (ChatError, *_bad_input_types()) as e:
        err_console.print(f"error: {e}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    conv = Conversation(model, system=system, max_new_tokens=max_new_tokens, temperature=temperature)
    if prompt is not None:
        console.print(conv.ask(prompt), markup=False)
        return
    err_console.print(
        f"chatting with the {model.label}; /reset clears the history, /exit quits", markup=False
    )
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            err_console.print("", markup=False)
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            conv.reset()
            continue
        if text:
            console.print(f"model> {conv.ask(text)}", markup=False)


def _last_trained(cfg: object) -> str:
    from .config import ConfigError
    from .stages import registry

    trained = registry.trained(cfg)  # type: ignore[arg-type]
    if not trained:
        raise ConfigError("this config trains no stage (pipeline empty or all disabled): nothing to export")
    return trained[-1]


@app.command()
def export(
    config: ConfigArg,
    overrides: Overrides = None,
    stage: Annotated[
        str | None, typer.Option("--stage", help="a trained stage (default: the last one of `pipeline:`)")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", help="folder to write (default <output_dir>/export-<stage>, or export-<stage>-gguf)"
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf: a safetensors model folder; gguf: one .gguf file and an Ollama Modelfile "
            "(Llama 3, SmolLM2, Qwen2/2.5, Qwen3)",
        ),
    ] = "hf",
    quant: Annotated[
        str | None,
        typer.Option(
            "--quant",
            help="GGUF weight type: f16, bf16 or q8_0 (default: bf16 for a bf16 model, else f16)",
            show_default=False,
        ),
    ] = None,
    smoke: SmokeOpt = False,
) -> None:
    """Merge the run's adapters into a standalone model: a safetensors folder with its tokenizer
    (--format hf), or a GGUF file for llama.cpp/Ollama with an Ollama Modelfile (--format gguf)."""
    from .export import StageNotDone, default_out, export_model
    from .gguf_export import GGUFExportError
    from .pipeline import run_dir_for

    try:
        cfg = load_config(config, overrides or [])
        stage = stage or _last_trained(cfg)
        run_dir = run_dir_for(cfg, smoke)
        export_model(
            cfg, run_dir, stage, out or default_out(run_dir, stage, fmt), log=_echo, fmt=fmt, quant=quant
        )
    except FileNotFoundError as e:
        err_console.print(f"error: {e}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (StageNotDone, GGUFExportError, *_bad_input_types()) as e:
        err_console.print(f"error: {e}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command()
def init(
    dest: Annotated[Path, typer.Argument(help="the project folder to create", show_default=False)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="take the defaults without asking")] = False,
    name: Annotated[str | None, typer.Option(help="project name (default: the folder's name)")] = None,
    goal: Annotated[str | None, typer.Option(help="what the fine-tuning is for")] = None,
    gpu_type: Annotated[
        str | None, typer.Option("--gpu-type", help="H100, A100, L4, ... or cpu (default: what is here)")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs per machine, 0 = CPU (default: those here)")] = None,
    time_limit: Annotated[
        str | None, typer.Option("--time-limit", help="e.g. 24h (default 30m on CPU, 24h on GPUs)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="base model: hub id or local folder (default: the embedded model)")
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="the training stages in pipeline order: sft,dpo (default), sft,grpo, sft,dpo,grpo, "
            "sft,kto, ... (any of sft, dpo, grpo, kto or a registered stage)"
        ),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="training data of a stage: STAGE=PATH, e.g. sft=chats.jsonl, grpo=questions.jsonl "
            "(comma-separated paths/globs/hub ids; repeatable; default: sample files)"
        ),
    ] = None,
    benchmarks: Annotated[
        str | None, typer.Option(help="lm-evaluation-harness task names, e.g. gsm8k,ifeval (default none)")
    ] = None,
    qlora: Annotated[
        bool | None,
        typer.Option("--qlora/--no-qlora", help="default: on for 3B+ models on a GPU (works on CPU too)"),
    ] = None,
    nodes: Annotated[
        int | None, typer.Option(help="machines the run spans (default 1; GPUs get a Slurm script)")
    ] = None,
    sharding: Annotated[
        str | None,
        typer.Option(help="ddp, fsdp, zero2 or zero3 (default: ddp, fsdp when the weights fill a GPU)"),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="write into a folder that is not empty")] = False,
) -> None:
    """Start a project: tunepipe.yaml (every section, commented; `pipeline:` the chosen training
    stages), README.md with the brief and the stage checklist, sample data for each stage given none,
    a pinned requirements.txt, accelerate/DeepSpeed configs and, for GPUs, slurm.sbatch (one
    `tunepipe run` per node).

    Asks for the brief unless --yes; flags answer questions ahead of time. Then:
    tunepipe run DIR/tunepipe.yaml --smoke
    """
    from .scaffold import (
        ScaffoldError,
        ask_brief,
        brief_with,
        default_brief,
        parse_data_flags,
        relative_listing,
        scaffold,
        split_list,
    )

    try:
        paths = parse_data_flags(data or [])
        brief = brief_with(
            default_brief(dest, detect_hardware=True),
            name=name,
            goal=goal,
            gpu_type=gpu_type,
            gpus=gpus,
            time_limit=time_limit,
            base_model=model,
            methods=split_list(methods) if methods else None,
            data=paths or None,
            benchmarks=split_list(benchmarks) if benchmarks is not None else None,
            qlora=qlora,
            nodes=nodes,
            sharding=sharding,
        )
        if not yes:
            brief = ask_brief(brief, lambda q, d: typer.prompt(q, default=d))
        written = scaffold(dest, brief, overwrite=force)
    except ScaffoldError as e:
        err_console.print(f"error: {e}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    for rel in relative_listing(dest, written):
        console.print(f"  {rel}", markup=False)
    console.print(f"next: tunepipe doctor {dest / 'tunepipe.yaml'}", markup=False)
    console.print(f"      tunepipe run {dest / 'tunepipe.yaml'} --smoke", markup=False)


@app.command()
def doctor(
    config: Annotated[
        Path | None, typer.Argument(help="the project config (optional)", show_default=False)
    ] = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object, for machines")] = False,
) -> None:
    """Check this machine; with a config, also print the resolved plan for the hardware it declares
    (attention, dtype, quantization, device map, checkpointing, effective batch), memory and time
    estimates per stage, and every incompatible option with a one-line fix.

    Exit code 0 when nothing blocks a run here (warnings allowed), 2 when something does.
    """
    from .doctor import run_doctor

    # typer.echo, not the rich console: rich would wrap long lines and break --json.
    raise typer.Exit(run_doctor(config, overrides or [], as_json, typer.echo))


@app.command()
def diagnose(
    logfile: Annotated[
        str, typer.Argument(help="the log file, or - to read it from stdin (paste, then Ctrl-D)")
    ] = "-",
    as_json: Annotated[bool, typer.Option("--json", help='{"id", "where", "cause", "fix", ...}')] = False,
) -> None:
    """Read an error log and say where it failed, why, and how to fix it.

    Works on tunepipe logs and on your own scripts' logs: several ranks interleaved, ANSI colours,
    chained exceptions, a cut head. The known issues are data: src/tunepipe/diagnose/knowledge.yaml.
    Exit code 0 when the error is known, 1 when it is not.
    """
    import json

    from .diagnose import diagnose_text, diagnosis_json, format_diagnosis

    if logfile == "-":
        text = sys.stdin.read()
    else:
        path = Path(logfile)
        if not path.is_file():
            err_console.print(f"error: {logfile}: no such file", markup=False)
            raise typer.Exit(EXIT_BAD_INPUT)
        text = path.read_text(encoding="utf-8", errors="replace")
    d = diagnose_text(text)
    if as_json:
        console.print_json(json.dumps(diagnosis_json(d)))
    else:
        console.print(format_diagnosis(d), markup=False, soft_wrap=True)
    raise typer.Exit(EXIT_OK if d.id else EXIT_ERROR)


@app.command()
def ui(
    runs_dir: Annotated[
        Path,
        typer.Argument(help="the folder whose run folders to show (default: ./runs)", show_default=False),
    ] = Path("runs"),
    host: Annotated[
        str, typer.Option("--host", help="address to bind; anything but loopback requires a token")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port (0: any free one)")] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="require this token on every request (generated and printed for a non-loopback --host)",
            show_default=False,
        ),
    ] = None,
) -> None:
    """A local web dashboard: the runs list, a run's stage timeline with gates, live training curves
    (updated as steps are logged), ETA against the time budget, warnings, data statistics and
    rejects, metrics with deltas, samples side by side, the report, a chat panel streaming any
    trained stage's replies, and Start / Stop / Resume.

    It reads the run folders and runs the tunepipe command as a subprocess: Stop sends SIGTERM (the
    run saves a checkpoint and exits 75), Resume runs the run's recorded command again. Configs are
    read from the current folder. Binds 127.0.0.1 by default; another --host needs a token, checked
    on every request. Ctrl-C stops the dashboard; the runs it started go on."""
    from .ui.server import make_server, url_of

    try:
        server, app_state = make_server(runs_dir, Path.cwd(), host=host, port=port, token=token)
    except OSError as e:
        err_console.print(f"error: cannot listen on {host}:{port}: {e.strerror or e}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    # The token is printed on purpose: it is the way in (it stays out of logs and the run folders).
    typer.echo(f"tunepipe ui: {url_of(server, app_state)}  (runs folder: {app_state.root})", err=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"  bound to {host}: every request needs the token above", err=False)
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        typer.echo("tunepipe ui: stopped (runs it started go on)")
    finally:
        server.server_close()


@app.command()
def serve(
    target: Annotated[
        Path,
        typer.Argument(help="a project config, or a model / adapter / export folder", show_default=False),
    ],
    overrides: Overrides = None,
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="base or a trained stage, e.g. sft (default: the latest finished)"),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="address to bind; anything but loopback requires --api-key")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port (0: any free one)")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="TUNEPIPE_API_KEY",
            help="require `Authorization: Bearer KEY` on every request",
            show_default=False,
        ),
    ] = None,
    max_tokens_limit: Annotated[
        int, typer.Option("--max-tokens-limit", help="the most max_tokens a request may ask for", min=1)
    ] = 1024,
    max_prompt_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-prompt-tokens",
            help="the longest prompt accepted, in tokens (default: the config's data.max_length; for "
            "a folder, the model's max_position_embeddings)",
            min=1,
            show_default=False,
        ),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option("--max-batch-size", help="requests decoded together (1: one at a time)", min=1)
    ] = 8,
    backend: Annotated[
        str, typer.Option("--backend", help="auto (vLLM when installed with a CUDA GPU), transformers, vllm")
    ] = "auto",
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name",
            help="the model id clients send (default: <project.name>-<stage>, or the folder name)",
        ),
    ] = None,
    smoke: SmokeOpt = False,
) -> None:
    """An OpenAI-compatible API over a run's model: /v1/models, /v1/chat/completions (streamed or not)
    and /v1/completions, through the run's chat template.

    A chat reply is what `tunepipe chat --prompt` prints for the same stage (greedy when temperature
    is 0 or absent). vLLM serves when it is installed and a CUDA GPU is visible (the run's adapter
    as a LoRA module); otherwise transformers, with waiting requests decoded together in batches.
    Binds 127.0.0.1 by default; another --host refuses to start without an API key. Ctrl-C stops it."""
    from .chat import ChatError
    from .serve import Limits, ServeApp, ServeError, check_bind, is_loopback, load_served, make_server, url_of

    api_key = api_key or None
    try:
        check_bind(host, api_key)
        try:  # bind before the model loads: a busy port fails in a second
            server = make_server(None, host, port)  # type: ignore[arg-type]
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        served = load_served(
            target, overrides or [], stage, smoke, backend, max_batch_size, model_name, log=_echo
        )
    except (ServeError, ChatError, *_bad_input_types()) as e:
        err_console.print(f"error: {redact_text(str(e))}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    limits = Limits(max_tokens_limit, max_prompt_tokens or served.default_prompt_limit)
    server.RequestHandlerClass.app = ServeApp(served, limits, api_key, is_loopback(host))  # type: ignore[attr-defined]
    # Never the key itself: it stays out of terminals and logs.
    typer.echo(
        f"tunepipe serve: {url_of(server)}  (model: {served.model_id}, {served.label}, "
        f"backend: {served.engine.name})"
    )
    if api_key:
        typer.echo("  every request needs `Authorization: Bearer <the --api-key>`")
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        typer.echo("tunepipe serve: stopped")
    finally:
        server.server_close()


@app.command()
def push(
    config: ConfigArg,
    overrides: Overrides = None,
    repo: Annotated[
        str, typer.Option("--repo", help="the Hub model repo, e.g. your-name/my-model", show_default=False)
    ] = "",
    private: Annotated[
        bool, typer.Option("--private", help="create the repo private (an existing repo keeps its setting)")
    ] = False,
    stage: Annotated[
        str | None, typer.Option("--stage", help="a trained stage (default: the last one of `pipeline:`)")
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", help="hf: the safetensors folder; gguf: the GGUF file and Modelfile")
    ] = "hf",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="list the files and sizes that would be uploaded; upload nothing"),
    ] = False,
    smoke: SmokeOpt = False,
) -> None:
    """Upload a trained stage's export with its model card (README.md) to a Hugging Face Hub repo.

    The export (`tunepipe export`) is made first unless a current one exists; the card is written
    from the run folder: base model, stages and hyperparameters, data, metrics base vs each stage,
    time and hardware, limitations, license. The token is huggingface_hub's: HF_TOKEN or
    `hf auth login`; it is never printed or written. --dry-run needs no token."""
    from .export import StageNotDone
    from .gguf_export import GGUFExportError
    from .modelcard import ModelCardError
    from .pipeline import run_dir_for
    from .push import PushError, UploadFailed, human_size
    from .push import push as push_to_hub

    try:
        if not repo:
            raise PushError("--repo is required: the Hub model repo, e.g. --repo your-name/my-model")
        cfg = load_config(config, overrides or [])
        stage = stage or _last_trained(cfg)
        res = push_to_hub(
            cfg, run_dir_for(cfg, smoke), stage, repo, private=private, fmt=fmt, dry_run=dry_run, log=_echo
        )
    except (PushError, StageNotDone, GGUFExportError, FileNotFoundError, *_bad_input_types()) as e:
        err_console.print(f"error: {redact_text(str(e))}", markup=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (UploadFailed, ModelCardError) as e:
        err_console.print(f"error: {redact_text(str(e))}", markup=False)
        raise typer.Exit(EXIT_ERROR) from None
    except Exception as e:
        _unexpected(e)
    total = sum(f.size for f in res.files)
    head = "dry run: would upload" if dry_run else "uploaded"
    console.print(
        f"{head} {len(res.files)} files ({human_size(total)}) from {res.folder} to {res.repo_id}:",
        markup=False,
    )
    for f in res.files:
        console.print(f"  {f.path_in_repo}  {f.size} bytes", markup=False)
    if res.url:
        console.print(f"commit: {res.url}", markup=False)
    elif dry_run:
        console.print("nothing uploaded (--dry-run)", markup=False)


@app.command("quickstart-data")
def quickstart_data(
    out: Annotated[Path, typer.Argument(help="folder for the generated JSONL files")],
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Generate the quickstart skills data (SFT conversations, preference pairs, held-out sets)."""
    from .quickstart.skills import write_skills_data

    for split, path in write_skills_data(out, seed).items():
        console.print(f"{split:10s} {path}", markup=False)


def main() -> None:
    from . import runfolder

    runfolder.INVOCATION = sys.argv[1:]
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
