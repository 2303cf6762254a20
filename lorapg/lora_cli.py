"""``python -m lorapg lora list|info|rm|restore|rename|trash``: the LoRA manager from the command line.

The same ``LoraManager`` the LoRAs tab and ``/api/v1/loras`` use, built without the engines (no
model is loaded, so these commands stay quick). A running app's queued training runs live in its
process and are not seen here; the Generate tab's selection is (it is saved to a file).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

COMMANDS = ("list", "info", "rm", "restore", "rename", "trash")


def add_lora_parser(commands: argparse._SubParsersAction, add_settings: Callable[[argparse.ArgumentParser], None]):
    lora = commands.add_parser("lora", help="list, inspect, rename, delete (to the trash) or restore LoRAs")
    actions = lora.add_subparsers(dest="lora_command", required=True)
    listing = actions.add_parser("list", help="every LoRA: name, family, format, size, hash, trigger words")
    info = actions.add_parser("info", help="one LoRA: files, hashes, training settings, tag counts, civitai data")
    remove = actions.add_parser("rm", help="move a LoRA and its sidecar and per-epoch files into the trash")
    restore = actions.add_parser("restore", help="move a LoRA back from the trash (by name or trash id)")
    rename = actions.add_parser("rename", help="rename a LoRA with its sidecar and per-epoch files")
    trash = actions.add_parser("trash", help="what the trash holds, newest first")
    for action in (info, remove, rename):
        action.add_argument("name", help="LoRA name as `lora list` shows it")
    restore.add_argument("name", help="LoRA name or trash id as `lora trash` shows it")
    rename.add_argument("new_name", help="the new name (a path inside the LoRA folder, without .safetensors)")
    for action in (listing, info, remove, restore, rename, trash):
        add_settings(action)


def run_lora(args: argparse.Namespace, settings) -> int:
    from lorapg.services.build import build_services
    from lorapg.services.lora_manager import build_lora_manager

    manager = build_lora_manager(build_services(settings, engines=False, prompts=False))
    command = args.lora_command
    if command == "list":
        listing = manager.list()
        for lora in listing["loras"]:
            print(_row(lora))
        for problem in listing["problems"]:
            print(f"skipped: {problem}", file=sys.stderr)
        if not listing["loras"]:
            print(f"no LoRAs in {manager.folder}", file=sys.stderr)
    elif command == "info":
        _print_info(manager.info(args.name))
    elif command == "rm":
        entry = manager.delete(args.name)
        print(f"moved {entry['name']} to the trash ({entry['id']}); `lora restore {entry['name']}` brings it back")
    elif command == "restore":
        print(f"restored {manager.restore(args.name)['name']}")
    elif command == "rename":
        print(f"renamed {args.name} to {manager.rename(args.name, args.new_name)['name']}")
    elif command == "trash":
        for entry in manager.trash():
            print(f"{entry['id']}\t{entry['name']}\t{len(entry['files'])} file(s)")
    return 0


def _row(lora: dict[str, Any]) -> str:
    words = ", ".join(lora["trigger_words"]) or "-"
    epochs = f"\t{len(lora['epochs'])} epoch file(s)" if lora["epochs"] else ""
    return (
        f"{lora['name']}\t{lora['family'] or '?'}\t{lora['format']}\t{_size(lora['size_bytes'])}\t"
        f"{lora['hash'] or '-'}\t{words}{epochs}"
    )


def _print_info(lora: dict[str, Any]) -> None:
    print(f"{lora['name']}: {lora['format']} for {lora['family'] or 'an unknown family'}")
    print(f"file: {lora['path']} ({_size(lora['size_bytes'])})")
    print(f"hash: {lora['hash']}  sha256: {lora['sha256']}")
    print(f"trigger words: {', '.join(lora['trigger_words']) or '-'}")
    print(f"preview: {lora['preview'] or '-'}")
    for epoch in lora["epochs"]:
        print(f"epoch file: {epoch['name']} ({_size(epoch['size_bytes'])})")
    groups = lora["groups"]
    for title in ("training", "modelspec", "other"):
        for key, value in groups[title].items():
            print(f"{title}: {key} = {value}")
    if groups["tag_frequency"]:
        print("tags: " + ", ".join(f"{t['tag']} ({t['count']})" for t in groups["tag_frequency"][:20]))
    civitai = lora["civitai"]
    if civitai:
        print(f"civitai: {civitai['model'] or '-'} / {civitai['version'] or '-'} {civitai['url'] or ''}".rstrip())


def _size(size: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"
