"""The command line's structure: one module per command, found by discovery, and a format
layer that knows nothing of it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import stalwart
import stalwart.cli as cli

PKG = os.path.dirname(stalwart.__file__)


def test_one_module_per_command():
    names = [m.__name__.rsplit(".", 1)[1] for m in cli.command_modules()]
    assert names == ["run", "store", "inspect", "verify", "diff", "convert"]
    help_text = cli.build_parser().format_help()
    for name in names:
        assert name in help_text


def test_adding_a_command_is_adding_a_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "hello.py").write_text(
        "ORDER = 99\n"
        "def register(sub):\n"
        "    p = sub.add_parser('hello', help='say hello')\n"
        "    p.set_defaults(func=lambda args: print('hello from a plug-in command') or 0)\n"
    )
    monkeypatch.setattr(cli, "__path__", [*cli.__path__, str(tmp_path)])
    try:
        assert cli.main(["hello"]) == 0
        assert "hello from a plug-in command" in capsys.readouterr().out
    finally:
        sys.modules.pop("stalwart.cli.hello", None)


def test_formats_never_import_the_cli():
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(PKG, "formats")):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            with open(path) as fh:
                tree = ast.parse(fh.read())
            for node in ast.walk(tree):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path}: {m}" for m in mods if m == "stalwart.cli" or m.startswith("stalwart.cli.")]
    assert not offenders


def test_python_dash_m_and_help_without_torch():
    code = "import sys, runpy; sys.argv = ['stalwart', '--help']\ntry:\n    runpy.run_module('stalwart.cli', run_name='__main__')\n" \
           "except SystemExit as e:\n    print('torch' in sys.modules, e.code)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "inspect" in res.stdout and res.stdout.strip().endswith("False 0"), res.stdout + res.stderr


def test_sources_detect_native_by_the_manifest_name_the_writer_uses():
    from stalwart.formats.manifest import MANIFEST_NAME as written
    from stalwart.formats.sources import MANIFEST_NAME as detected

    assert detected == written
