"""``peft-persona push DIR user/repo``: upload saved persona mask adapters with a generated model card."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="push saved persona mask adapters to the Hugging Face Hub with a generated model card",
        description=(
            "Push the persona mask adapter(s) saved in DIR to the Hub repo REPO_ID in one commit, with a generated "
            "README.md model card. One adapter goes to the repo root; several go to one folder each."
        ),
    )
    parser.add_argument("directory", metavar="DIR", help="adapter directory (as written by save_pretrained or extract)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo, namespace/name")
    parser.add_argument("--private", action="store_true", help="create the repo private (ignored if it exists)")
    parser.add_argument("--revision", default=None, help="branch to commit to (created from main if missing)")
    parser.add_argument(
        "--adapter",
        dest="adapters",
        action="append",
        default=None,
        metavar="NAME",
        help="push only this adapter (repeatable; default: every adapter in DIR)",
    )
    parser.add_argument(
        "--eval-report", default=None, metavar="FILE", help="JSON report of `peft-persona eval` for the card"
    )
    parser.add_argument(
        "--license", default="apache-2.0", help="licence of the masks in the card (default: apache-2.0)"
    )
    parser.add_argument(
        "--base-model",
        default=None,
        metavar="HUB_ID",
        help="Hub id of the base model, written into the configs and card",
    )
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--commit-message", default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import push_to_hub

    info = push_to_hub(
        args.directory,
        args.repo_id,
        adapter_names=args.adapters,
        private=args.private,
        revision=args.revision,
        token=args.token,
        eval_report=args.eval_report,
        license=args.license,
        base_model=args.base_model,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.directory} to {args.repo_id} (commit {info.oid})", file=sys.stdout)
    return 0
