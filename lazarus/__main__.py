# The cyclic collector stays off through start-up's imports (cli.main turns it back on; see there).
import gc

gc.disable()

from lazarus.cli import entry  # noqa: E402

entry()
