from lazarus.cli import entry

entry()
