"""`fedcap`: the command-line front door."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .flower_runtime import eval_beam_size


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help ("(default: X)"), descriptions and epilogs as written.
    Options whose default is None or False (absent, off) say what that means in their own words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


BEAM_HELP = "beam width; 1 = greedy decoding. The default is the run config's eval-beam-size, the decoding the " \
            "server scores every round with, so a checkpoint gets the same score here as in summary.md"


def _common(args: argparse.Namespace) -> dict:
    """CentralizedConfig fields shared by `train` and `pretrain`."""
    model = {k: v for k, v in {"decoder": args.decoder, "fusion": args.fusion, "encoder": args.encoder,
                               "encoder_weights": args.encoder_weights, "image_size": args.image_size}.items()
             if v is not None}
    for folder in args.data or ():
        if not Path(folder).expanduser().is_dir():
            raise FileNotFoundError(f"--data folder not found: {folder}")
    return dict(train_size=args.train_size, test_size=args.test_size, epochs=args.epochs, batch_size=args.batch_size,
                lr=args.lr, lr_schedule=args.lr_schedule, precision=args.precision, beam_size=args.beam_size,
                meteor=not args.no_meteor,
                seed=args.seed, device=args.device, model=model,
                data=[str(Path(f).expanduser().absolute()) for f in args.data or ()], data_format=args.format,
                vocab_file=str(args.vocab_file or ""), init_from=str(args.init_from or ""))


def _train(args: argparse.Namespace) -> int:
    from .centralized import CentralizedConfig, run_centralized

    cfg = CentralizedConfig(**_common(args), source=args.source, dp=args.dp, target_epsilon=args.target_epsilon,
                            noise_multiplier=args.noise_multiplier, target_delta=args.target_delta,
                            max_grad_norm=args.max_grad_norm, grad_sample_mode=args.grad_sample_mode)
    out = args.out or Path("runs") / time.strftime(f"centralized-{'dp' if args.dp else 'nodp'}-%Y%m%d-%H%M%S")
    run_centralized(cfg, out)
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from .pretrain import pretrain_config, run_pretrain

    cfg = pretrain_config(**_common(args), source=args.source)
    run_pretrain(cfg, args.out or Path("runs") / time.strftime("pretrained-%Y%m%d-%H%M%S"))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from shared_model.evaluation.evaluator import decoding, evaluate
    from shared_model.model.checkpoint import load_checkpoint

    from shared_model.model.devices import resolve_device
    from .sources import evaluation_data

    device = resolve_device(args.device)
    model, vocab, _ = load_checkpoint(args.checkpoint, device=device)
    data = evaluation_data(args.data, args.format, image_size=model.config.image_size, split=args.split,
                           limit=args.limit)
    metrics, predictions = evaluate(model, data, vocab, beam_size=args.beam_size, device=device,
                                    meteor=not args.no_meteor)
    print(f"{args.checkpoint} on {args.data} ({len(data)} images, {decoding(args.beam_size)})")
    for name, value in metrics.items():
        print(f"{name:10} {value:.4f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": str(args.checkpoint), "data": str(args.data),
                                               "images": len(data), "beam_size": args.beam_size,
                                               "decoding": decoding(args.beam_size), "metrics": metrics,
                                               "examples": dict(list(predictions.items())[:10])}, indent=2) + "\n")
    return 0


def _training_options(p: argparse.ArgumentParser, d) -> None:
    """Options of `train` and `pretrain`, with `d` (a CentralizedConfig) giving the defaults."""
    p.add_argument("--data", type=Path, nargs="+", metavar="DIR",
                   help="dataset folders (docs/data.md), all in --format, trained on as one (each folder's own "
                        "held-out split goes to the test set), instead of the embedded data")
    p.add_argument("--format", default=d.data_format, choices=("coco", "karpathy", "csv", "jsonl"),
                   help="format of --data")
    p.add_argument("--vocab-file", type=Path, help="fedcap-vocab/1 JSON (default: embedded, or built from --data)")
    p.add_argument("--init-from", type=Path, help="a checkpoint to start from (same model and vocabulary)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training records")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="records per step (with --dp: expected "
                                                                          "Poisson batch)")
    p.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.lr_schedule,
                   help="cosine: decays to 0 over the planned steps")
    p.add_argument("--train-size", type=int, default=d.train_size, help="embedded records (ignored with --data)")
    p.add_argument("--test-size", type=int, default=d.test_size, help="at most this many held-out records scored")
    p.add_argument("--beam-size", type=int, default=d.beam_size, help=BEAM_HELP)
    from shared_model.model.config import CaptionerConfig as M

    p.add_argument("--decoder", choices=("lstm", "transformer"), help=f"(default: {M.decoder})")
    p.add_argument("--fusion", choices=("concat", "add", "attention"), help=f"(default: {M.fusion})")
    from shared_model.model.config import ENCODERS

    p.add_argument("--encoder", choices=ENCODERS, help=f"(default: {M.encoder})")
    p.add_argument("--encoder-weights", help="a local torchvision state_dict file of --encoder (not cnn; nothing is "
                                             "downloaded)")
    p.add_argument("--image-size", type=int, help=f"side in pixels the images are resized and cropped to; with "
                   f"--init-from it must be the checkpoint's (default: {M.image_size})")
    p.add_argument("--no-meteor", action="store_true", default=not d.meteor, help="skip METEOR (Java start-up)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds data and model init (0 when not given); with --dp it also fixes the DP noise, "
                        "which is then replayable: experiments only (not given: the noise comes from the OS)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default=d.precision,
                   help="bf16: autocast (per-sample norms stay float32; not with ghost); auto: bf16 on a GPU")
    p.add_argument("--out", type=Path, help="run folder (default runs/<kind>-<time>)")


def _caption(args: argparse.Namespace) -> int:
    from shared_model.data.datasets import image_tensor
    from shared_model.data.loaders import load_dataset_folder, load_images
    from shared_model.model.checkpoint import load_checkpoint

    if not args.images and not args.data:
        raise ValueError("give image files or --data DIR (a dataset folder), got neither")
    if args.gallery and not args.data:
        raise ValueError("--gallery needs --data DIR: a gallery shows each image's reference captions")
    model, vocab, _ = load_checkpoint(args.checkpoint)
    if args.images:
        images = load_images(args.images, image_size=model.config.image_size)
        for path, text in zip(args.images, model.caption(image_tensor(images), vocab, beam_size=args.beam_size)):
            print(f"{path}\t{text}")
    if args.data:
        from shared_model.evaluation.evaluator import generate_captions
        from shared_model.evaluation.gallery import write_gallery

        data = load_dataset_folder(args.format, args.data, split=args.split, image_size=model.config.image_size)
        if args.gallery:
            label = checkpoint_label(args.checkpoint)
            path = write_gallery(model, data, vocab, args.gallery, label=label, size=args.gallery_size,
                                 beam_size=args.beam_size)
            print(f"gallery of {min(args.gallery_size, len(data))} images: {path}", file=sys.stderr)
        else:
            for image_id, text in generate_captions(model, data, vocab, beam_size=args.beam_size).items():
                print(f"{image_id}\t{text}")
    return 0


def checkpoint_label(path: Path) -> str:
    """A checkpoint folder as a short label: run-7/round-0002 (a federated round), pre/checkpoint
    (a `fedcap train`/`pretrain` run folder's), else its folder name."""
    path = path.resolve()
    parent = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return f"{parent.name}/{path.name}" if path.name == "checkpoint" or path.parent.name == "checkpoints" else path.name


CHECKPOINT_HELP = ("a checkpoint folder. From a federated run: runs/run-<id>/checkpoints/$(cat "
                   "runs/run-<id>/checkpoints/BEST), the best round on the server's validation set, to deploy "
                   "(checkpoints/LATEST names the last trained round: the one to continue training from)")

AUDIT_EXIT_CODES = """exit codes:
  0  every ledger verified; no failure (warnings allowed unless --strict)
  1  a failure: a record's recomputed epsilon (site's accountant) above its budget, a ledger line whose
     recorded epsilon is below the recomputed one, or (with --federation-state) a witnessed ledger
     head (only each --site's, if given) that no audited ledger holds (deleted, rolled back,
     rewritten); with --strict also any warning (accountants that disagree beyond --tolerance,
     budget fields that change)
  2  a ledger that cannot be audited (malformed, hash chain broken: edited, removed, reordered or
     torn line; a membership file missing or altered), no ledger found, a missing path or a bad argument
     (a --site the federation state does not name)
"""


def _audit(args: argparse.Namespace) -> int:
    from shared_model.audit.audit_report import format_table, to_json, write_report
    from shared_model.audit.ledger_audit import audit

    from .progress import Progress

    accountants = [a.strip() for a in args.accountants.split(",") if a.strip()]
    bar = Progress(0, label="auditing", stream=sys.stderr, bar=False)  # one line per site, with an estimate

    def progress(done: int, total: int, site: str) -> None:
        bar.total, bar.done = total, done
        bar.line(f"audited {site} ({done}/{total})")

    result = audit(args.paths, accountants=accountants, tolerance=args.tolerance,
                   federation_state=args.federation_state, witness_sites=args.site, progress=progress)
    print(format_table(result), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(to_json(result, strict=args.strict), indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    if args.report:
        print(f"report: {write_report(result, args.report)}", file=sys.stderr)
    return result.exit_code(strict=args.strict)


def _migrate(args: argparse.Namespace) -> int:
    from shared_model.data.loaders import load_dataset_folder
    from shared_model.audit.migrate import migrate_v1

    data = load_dataset_folder(args.format, args.data_dir, image_size=args.image_size)
    path, n = migrate_v1(args.state_dir, data.record_ids())
    print(f"migrated {n} event(s) of {args.state_dir / 'ledger.v1.jsonl'} into {path}, each charged to all "
          f"{len(set(data.record_ids()))} current records")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`fedcap` and its subcommands; every subcommand's --help shows its defaults (HelpFormatter)."""
    from shared_model.privacy.dp import GRAD_SAMPLE_MODES

    from .centralized import CentralizedConfig
    from .pretrain import NO_BUDGET, pretrain_config
    from .plan_cmd import add_plan_parser
    from .rehearse_cmd import add_rehearse_parser
    from .vocab_cmd import add_vocab_parser

    parser = argparse.ArgumentParser(prog="fedcap", description="Federated DP image captioning.")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="centralized training on the embedded dataset or data folders",
                       formatter_class=HelpFormatter)
    d = CentralizedConfig()  # the one place the centralized defaults live
    from .sources import SOURCES

    t.add_argument("--source", choices=SOURCES, default=d.source,
                   help="embedded source when no --data is given (embedded: the sites' data; shifted: the shifted "
                        "scenario's, its centralized baseline)")
    t.add_argument("--dp", action="store_true", help="train with DP-SGD (Opacus)")
    t.add_argument("--target-epsilon", type=float, default=d.target_epsilon,
                   help="with --dp: noise calibrated to reach this over all epochs")
    t.add_argument("--noise-multiplier", type=float, default=d.noise_multiplier, help="instead of --target-epsilon")
    t.add_argument("--target-delta", type=float, default=d.target_delta, help="with --dp")
    t.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="with --dp: per-example clipping "
                                                                                 "bound")
    t.add_argument("--grad-sample-mode", choices=GRAD_SAMPLE_MODES, default=d.grad_sample_mode,
                   help="with --dp: per-example clipping by Opacus hooks (any decoder) or ghost clipping "
                        "(transformer decoder only; docs/privacy.md)")
    _training_options(t, d)
    t.set_defaults(func=_train)

    pre = sub.add_parser("pretrain", help="non-private pretraining on public data (no site budget spent)",
                         description=f"Train the captioner without DP on public data: the embedded generator's "
                                     f"public variant (default) or --data DIR. Writes an ordinary checkpoint "
                                     f"(weights, config, vocabulary) to start federations from (init-from). "
                                     f"{NO_BUDGET}.", formatter_class=HelpFormatter)
    p = pretrain_config()  # the one place the pretraining defaults live
    pre.add_argument("--source", choices=SOURCES, default=p.source,
                     help="embedded source when no --data is given (public: the public variant; shifted-public: "
                          "the shifted scenario's)")
    _training_options(pre, p)
    pre.set_defaults(func=_pretrain)

    e = sub.add_parser("evaluate", help="score a checkpoint on a data folder (BLEU, METEOR, ROUGE-L, CIDEr-D)",
                       formatter_class=HelpFormatter)
    e.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    e.add_argument("data", help="a dataset folder, or 'embedded' for the embedded test split")
    e.add_argument("--format", default="coco", choices=("coco", "karpathy", "csv", "jsonl"), help="data's format")
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="karpathy split")
    e.add_argument("--limit", type=int, help="score the first N records only")
    e.add_argument("--beam-size", type=int, default=eval_beam_size(), help=BEAM_HELP)
    e.add_argument("--no-meteor", action="store_true", help="skip METEOR (saves the Java start-up)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    e.add_argument("--json", metavar="FILE", help="also write the metrics as JSON")
    e.set_defaults(func=_evaluate)

    c = sub.add_parser("caption", help="print captions for image files or a dataset folder; write a gallery",
                       description="Caption image files, or every image of a dataset folder (--data); with "
                                   "--gallery, write OUT/gallery.md and OUT/images/ instead: the folder's first "
                                   "images, their reference captions and the checkpoint's captions (the run "
                                   "summary's gallery, for any checkpoint).",
                       epilog="exit codes:\n  0  captions printed or gallery written\n  2  a bad argument, "
                              "checkpoint, image or folder", formatter_class=HelpFormatter)
    c.add_argument("checkpoint", type=Path, help=CHECKPOINT_HELP)
    c.add_argument("images", nargs="*", type=Path, help="image files to caption")
    c.add_argument("--data", type=Path, help="a dataset folder (docs/data.md) to caption")
    c.add_argument("--format", default="coco", choices=("coco", "karpathy", "csv", "jsonl"), help="--data's format")
    c.add_argument("--split", default="test", help="karpathy split of --data")
    c.add_argument("--gallery", type=Path, metavar="OUT", help="write OUT/gallery.md with OUT/images/ (needs --data)")
    c.add_argument("--gallery-size", type=int, default=6, help="images in the gallery")
    c.add_argument("--beam-size", type=int, default=eval_beam_size(), help=BEAM_HELP)
    c.set_defaults(func=_caption)

    a = sub.add_parser("audit", help="recompute and check the privacy budget spent in site ledgers",
                       description="Verify site ledgers (hash chain) and recompute each dataset's spent epsilon\n"
                                   "from its recorded DP-SGD events; recorded epsilons are never trusted.",
                       epilog=AUDIT_EXIT_CODES, formatter_class=HelpFormatter)
    a.add_argument("paths", nargs="+", metavar="PATH",
                   help="a ledger file, a site/state folder holding ledger.jsonl, a run folder (sites/*/ledger.jsonl) "
                        "or a folder of site folders (*/ledger.jsonl); several = a federation")
    a.add_argument("--accountants", default="prv,rdp,pld", help="comma-separated, among prv, rdp, pld, dp-rdp")
    a.add_argument("--json", metavar="FILE", help="write the full result as JSON to FILE, or - for stdout "
                                                  "(the table then goes to stderr)")
    a.add_argument("--report", type=Path, metavar="DIR", help="write DIR/audit.md and DIR/epsilon.png")
    a.add_argument("--tolerance", type=float, default=0.02,
                   help="relative tolerance between accountants (prv vs pld; rdp below them)")
    a.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    a.add_argument("--federation-state", type=Path, metavar="FILE",
                   help="the server's federation-state.json: flag every witnessed site whose ledger is missing or "
                        "behind its witnessed head")
    a.add_argument("--site", action="append", metavar="NAME",
                   help="with --federation-state: check only this site's witnessed head (its node_config "
                        "site-name; repeat for several), e.g. a site auditing its own ledger")
    a.set_defaults(func=_audit)

    add_vocab_parser(sub)
    add_plan_parser(sub)
    add_rehearse_parser(sub)

    g = sub.add_parser("ledger", help="site ledger maintenance (migrate a fedcap-ledger/1 ledger)",
                       formatter_class=HelpFormatter)
    gsub = g.add_subparsers(dest="ledger_command", required=True)
    m = gsub.add_parser("migrate", help="rewrite a fedcap-ledger/1 ledger per record, charging every old event to "
                                        "every current record (conservative)",
                        epilog="exit codes: 0 migrated; 2 bad arguments, no or tampered ledger, already migrated",
                        formatter_class=HelpFormatter)
    m.add_argument("state_dir", type=Path, metavar="STATE_DIR", help="the site's state-dir (holds ledger.jsonl)")
    m.add_argument("--data-dir", type=Path, required=True, help="the site's data-dir (its current records)")
    m.add_argument("--format", default="coco", help="coco | karpathy | csv | jsonl")
    m.add_argument("--image-size", type=int, default=64, help="image side the records are decoded at")
    m.set_defaults(func=_migrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"fedcap {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
