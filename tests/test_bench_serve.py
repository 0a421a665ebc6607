"""bench serve --against transformers: where transformers serve cannot start, one line says what to install."""

import argparse
import shutil

import pytest

from flaxformer_lite.bench import serve


def test_against_transformers_without_its_command_names_the_install(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    parser = argparse.ArgumentParser()
    serve.add_serve_arguments(parser)
    with pytest.raises(SystemExit, match=r"transformers serve cannot start here: .*pip install transformers fastapi"):
        serve.run_serve(parser.parse_args(["--against", "transformers"]))
