"""The `streamer` command line: demo, broker, replay, pretrain, update, serve, snapshots."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__
from .errors import StreamerError
from .settings import Settings

logger = logging.getLogger(__name__)

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "fraud-handbook"


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiokafka logs every group join and fetch reset at INFO; keep the worker log readable.
    logging.getLogger("aiokafka").setLevel(max(logging.WARNING, logging.getLogger().level))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", help="Kafka bootstrap servers host:port (env STREAMER_KAFKA_BOOTSTRAP)")
    parser.add_argument("--data-dir", type=Path, help="folder for checkpoints, snapshots, reports (env STREAMER_DATA_DIR)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _settings(args: argparse.Namespace) -> Settings:
    settings = Settings.from_env().replace(kafka_bootstrap=args.bootstrap, data_dir=args.data_dir)
    if getattr(args, "source", None) is not None:
        settings = settings.replace(source_checkpoint=args.source)
    return settings


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from .pretrain import PretrainConfig, pretrain

    paths = _data_files(args.files)
    checkpoint = pretrain(PretrainConfig(
        paths=tuple(paths), start=args.start, end=args.end, output=args.output,
        label_delay_days=args.label_delay_days, epochs=args.epochs,
    ))
    metrics = checkpoint.metadata["metrics"]
    print(f"source model written to {args.output} (sha256 {checkpoint.sha256[:12]}…): "
          f"validation AUC {metrics['validation_auc']:.3f}, AP {metrics['validation_average_precision']:.3f}")
    return 0


def _data_files(given: list[Path]) -> list[Path]:
    """Expand folders into their sorted *.csv / *.csv.gz files."""
    files: list[Path] = []
    for path in given or [DEFAULT_DATA]:
        if not path.exists():
            raise StreamerError(f"input {path} not found; give handbook CSV files or a folder of them")
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.name.endswith((".csv", ".csv.gz")))
        else:
            files.append(path)
    if not files:
        raise StreamerError(f"no CSV files found in {given or [DEFAULT_DATA]}")
    return files


def _cmd_update(args: argparse.Namespace) -> int:
    from .apps import create_updater_app

    return _run_faust_worker(create_updater_app(_settings(args)), args.log_level)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .apps import create_inference_app

    return _run_faust_worker(create_inference_app(_settings(args)), args.log_level)


def _run_faust_worker(app, log_level: str) -> int:
    import faust

    worker = faust.Worker(app, loglevel=log_level, redirect_stdouts=False)
    worker.execute_from_commandline()  # returns through SystemExit when the worker stops
    return 0


def _cmd_broker(args: argparse.Namespace) -> int:
    from .broker import EmbeddedBroker, graceful_signals

    with graceful_signals(), EmbeddedBroker() as broker:
        print(f"embedded broker listening; export STREAMER_KAFKA_BOOTSTRAP={broker.bootstrap} "
              "STREAMER_EMBEDDED_BROKER=1 (Ctrl-C stops it)", flush=True)
        try:
            broker.wait()
        except (KeyboardInterrupt, SystemExit):
            pass
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(
        data=_data_files(args.files), work_dir=args.work_dir, limit=args.limit,
        pretrain_start=args.pretrain_start, pretrain_end=args.pretrain_end,
        replay_start=args.replay_start, replay_end=args.replay_end,
    )
    return run_demo(config, Settings.from_env().replace(kafka_bootstrap=args.bootstrap))


def build_parser() -> argparse.ArgumentParser:
    from . import replay, snapshots_cli

    parser = argparse.ArgumentParser(prog="streamer", description=__doc__)
    parser.add_argument("--version", action="version", version=f"streamer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="pretrain, then replay July-August through both workers, and report")
    demo.add_argument("files", nargs="*", type=Path, help=f"handbook CSV files or folders (default: {DEFAULT_DATA})")
    demo.add_argument("--work-dir", type=Path, default=Path("streamer-demo"), help="output folder (default streamer-demo)")
    demo.add_argument("--limit", type=int, help="replay at most this many transactions (for a quick look)")
    demo.add_argument("--pretrain-start", default="2018-04-01")
    demo.add_argument("--pretrain-end", default="2018-07-01", help="exclusive")
    demo.add_argument("--replay-start", default="2018-07-01")
    demo.add_argument("--replay-end", default="2018-09-01", help="exclusive")
    _common(demo)
    demo.set_defaults(func=_cmd_demo)

    broker = sub.add_parser("broker", help="run the embedded Kafka-wire broker on 127.0.0.1 until Ctrl-C")
    broker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    broker.set_defaults(func=_cmd_broker)

    rep = sub.add_parser("replay", help="produce CSV transactions and delayed labels to Kafka")
    replay.add_arguments(rep)
    _common(rep)
    rep.set_defaults(func=lambda a: replay.run(a, _settings(a)))

    pre = sub.add_parser("pretrain", help="train the source model offline on a period of the data")
    pre.add_argument("files", nargs="*", type=Path, help=f"handbook CSV files or folders (default: {DEFAULT_DATA})")
    pre.add_argument("--start", default="2018-04-01", help="first day, inclusive (ISO date)")
    pre.add_argument("--end", default="2018-07-01", help="last day, exclusive (ISO date)")
    pre.add_argument("--output", type=Path, default=Path("streamer-data/models/source.pt"),
                     help="checkpoint to write; NAME.json and NAME.features.npz go beside it "
                          "(default: %(default)s)")
    pre.add_argument("--label-delay-days", type=float, default=7.0,
                     help="event-time days between a transaction and its label (default: %(default)s)")
    pre.add_argument("--epochs", type=int, default=10, help="passes over the training period (default: %(default)s)")
    pre.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    pre.set_defaults(func=_cmd_pretrain)

    upd = sub.add_parser("update", help="run the updater worker (a faust worker)")
    upd.add_argument("--source", type=Path, help="source model checkpoint (env STREAMER_SOURCE_CHECKPOINT)")
    _common(upd)
    upd.set_defaults(func=_cmd_update)

    srv = sub.add_parser("serve", help="run the inference worker (a faust worker)")
    srv.add_argument("--source", type=Path, help="source model checkpoint whose feature state the worker starts "
                                                 "from (env STREAMER_SOURCE_CHECKPOINT)")
    _common(srv)
    srv.set_defaults(func=_cmd_serve)

    snap = sub.add_parser("snapshots", help="list, show, pin, unpin or roll back the snapshots in the store")
    snapshots_cli.add_arguments(snap, _common)
    snap.set_defaults(func=lambda a: snapshots_cli.run(a, _settings(a)))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return args.func(args)
    except StreamerError as exc:
        logger.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        return 130
