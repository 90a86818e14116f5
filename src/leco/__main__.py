from leco.cli import entry

entry()
